"""Instance tools under names every client accepts.

Anthropic's API rejects a tool list holding any name outside `^[a-zA-Z0-9_-]{1,64}$`, so one
oddly named instance tool would break the whole session. Such tools are listed under a safe alias
and calls to the alias are routed back to the original name. Entries no client can use at all
(not an object, no string name, no object inputSchema) are left out: the SDK clients reject a
whole tool list for one of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

VALID_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_INVALID = re.compile(r"[^a-zA-Z0-9_-]")
MAX_LENGTH = 64


@dataclass(frozen=True, slots=True)
class NamedTools:
    tools: list[dict[str, Any]]
    """The instance's tools as listed to the client (renamed where needed)."""
    originals: dict[str, str] = field(default_factory=dict)
    """Alias → the instance's own name, for the renamed ones only."""


def usable_tools(tools: Iterable[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The entries of an instance's tool list a client can use, and why each other one is not."""
    usable: list[dict[str, Any]] = []
    dropped: list[str] = []
    for index, tool in enumerate(tools):
        problem = _unusable(tool)
        if problem is None:
            usable.append(tool)
        else:
            dropped.append(f"entry {index}: {problem}")
    return usable, dropped


def _unusable(tool: Any) -> str | None:
    if not isinstance(tool, dict):
        return f"not an object but {_json_type(tool)}"
    if "name" not in tool:
        return "no name"
    if not isinstance(tool["name"], str):
        return f"a name that is {_json_type(tool['name'])}, not a string"
    if not isinstance(tool.get("inputSchema"), dict):
        return f"tool {tool['name'][:MAX_LENGTH]!r} has no inputSchema object"
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def safe_name(name: str, taken: set[str]) -> str:
    """A valid name for `name`, unique among `taken` (which it is added to)."""
    base = _INVALID.sub("_", name)[:MAX_LENGTH] or "tool"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        suffix = f"_{n}"
        candidate = base[: MAX_LENGTH - len(suffix)] + suffix
    taken.add(candidate)
    return candidate


def name_tools(tools: Sequence[dict[str, Any]], reserved: Iterable[str]) -> NamedTools:
    """List `tools` next to `reserved` names (which win a clash: such tools are left out).

    Unusable entries are left out here too, whichever path the list came by (the supervisor
    has already dropped them from its cache, and said so).
    """
    tools, _ = usable_tools(tools)
    reserved = set(reserved)
    taken = set(reserved) | {str(t.get("name")) for t in tools if VALID_NAME.match(str(t.get("name")))}
    listed: list[dict[str, Any]] = []
    originals: dict[str, str] = {}
    for tool in tools:
        name = str(tool.get("name"))
        if name in reserved:
            continue
        if VALID_NAME.match(name):
            listed.append(tool)
            continue
        alias = safe_name(name, taken)
        originals[alias] = name
        listed.append({**tool, "name": alias})
    return NamedTools(listed, originals)
