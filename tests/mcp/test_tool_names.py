"""Instance tool names the client would reject are listed under valid aliases."""

from __future__ import annotations

from fsm_hub.mcp.tool_names import VALID_NAME, name_tools, safe_name


def test_valid_names_pass_through_untouched() -> None:
    tools = [{"name": "run_script", "inputSchema": {"type": "object"}}, {"name": "logs-search"}]
    named = name_tools(tools, {"instances_list"})
    assert named.tools == tools
    assert named.tools[0] is tools[0]
    assert named.originals == {}


def test_invalid_names_get_unique_valid_aliases_that_map_back() -> None:
    tools = [
        {"name": "fs.read", "description": "dotted"},
        {"name": "fs/read"},
        {"name": "fs_read"},
        {"name": "x" * 80},
        {"name": ""},
        {"name": "日本語"},
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
    named = name_tools([{"name": "hub_status"}, {"name": "echo"}], {"hub_status"})
    assert [t["name"] for t in named.tools] == ["echo"]


def test_an_alias_never_takes_a_reserved_name() -> None:
    named = name_tools([{"name": "hub.status"}], {"hub_status"})
    assert named.tools[0]["name"] != "hub_status"
    assert named.originals[named.tools[0]["name"]] == "hub.status"


def test_safe_name_truncates_with_room_for_the_suffix() -> None:
    taken = {"a" * 64}
    alias = safe_name("a" * 70, taken)
    assert len(alias) == 64 and alias.endswith("_2") and alias in taken
