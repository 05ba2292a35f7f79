"""Instance tool names the client would reject are listed under valid aliases."""

from __future__ import annotations

from typing import Any

from fsm_hub.mcp.protocol import usable_tools
from fsm_hub.mcp.tool_names import VALID_NAME, name_tools, safe_name

S = {"type": "object"}


def tool(name: Any, **rest: Any) -> dict[str, Any]:
    return {"name": name, "inputSchema": S, **rest}


def test_valid_names_pass_through_untouched() -> None:
    tools = [{"name": "run_script", "inputSchema": {"type": "object"}}, tool("logs-search")]
    named = name_tools(tools, {"instances_list"})
    assert named.tools == tools
    assert named.tools[0] is tools[0]
    assert named.originals == {}


def test_invalid_names_get_unique_valid_aliases_that_map_back() -> None:
    tools = [
        tool("fs.read", description="dotted"),
        tool("fs/read"),
        tool("fs_read"),
        tool("x" * 80),
        tool(""),
        tool("日本語"),
    ]
    named = name_tools(tools, set())
    names = [t["name"] for t in named.tools]
    assert all(VALID_NAME.match(n) for n in names), names
    assert len(set(names)) == len(names)
    assert names[2] == "fs_read"  # the valid one keeps its name; aliases step around it
    assert named.originals[names[0]] == "fs.read"
    assert named.originals[names[1]] == "fs/read"
    assert named.originals[names[3]] == "x" * 80
    assert named.tools[0]["description"] == "dotted"
    assert "fs_read" not in named.originals


def test_reserved_names_win_a_clash() -> None:
    named = name_tools([tool("hub_status"), tool("echo")], {"hub_status"})
    assert [t["name"] for t in named.tools] == ["echo"]


def test_an_alias_never_takes_a_reserved_name() -> None:
    named = name_tools([tool("hub.status")], {"hub_status"})
    assert named.tools[0]["name"] != "hub_status"
    assert named.originals[named.tools[0]["name"]] == "hub.status"


def test_safe_name_truncates_with_room_for_the_suffix() -> None:
    taken = {"a" * 64}
    alias = safe_name("a" * 70, taken)
    assert len(alias) == 64 and alias.endswith("_2") and alias in taken


GARBAGE: list[Any] = [
    "just a string",
    None,
    42,
    ["a", "list"],
    {"description": "no name", "inputSchema": S},
    {"name": 7, "inputSchema": S},
    {"name": None, "inputSchema": S},
    {"name": ["x"], "inputSchema": S},
    {"name": "no_schema"},
    {"name": "schema_is_a_string", "inputSchema": "object"},
]
"""Entries of a tool list no client can use: each would make the SDK client reject the list."""


def test_unusable_entries_are_dropped_and_each_is_said_why() -> None:
    good = [tool("echo"), tool("fs.read")]
    usable, dropped = usable_tools([GARBAGE[0], good[0], *GARBAGE[1:], good[1]])
    assert usable == good
    assert usable[0] is good[0]  # kept entries are passed on untouched
    assert len(dropped) == len(GARBAGE)
    assert dropped[0] == "entry 0: not an object but a string"
    assert "entry 6: a name that is a number, not a string" in dropped
    assert "entry 5: no name" in dropped
    assert "entry 9: tool 'no_schema' has no inputSchema object" in dropped


def test_name_tools_never_lists_an_unusable_entry() -> None:
    named = name_tools([*GARBAGE, tool("echo"), tool("a b")], {"instances_list"})
    assert [t["name"] for t in named.tools] == ["echo", "a_b"]
    assert named.originals == {"a_b": "a b"}
