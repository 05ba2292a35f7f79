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

from fsm_hub.mcp.protocol import usable_tools

VALID_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_INVALID = re.compile(r"[^a-zA-Z0-9_-]")
MAX_LENGTH = 64


@dataclass(frozen=True, slots=True)
class NamedTools:
    tools: list[dict[str, Any]]
    """The instance's tools as listed to the client (renamed where needed)."""
    originals: dict[str, str] = field(default_factory=dict)
    """Alias → the instance's own name, for the renamed ones only."""


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
