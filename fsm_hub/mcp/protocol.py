"""MCP itself, apart from JSON-RPC: versions, HTTP headers, capabilities, result shapes, loopback.

Both directions use this one module: the client towards instances (`mcp.upstream`), the
downstream sessions (`mcp.session`), the transports and the bridge.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import quote

from fsm_hub import __version__
from fsm_hub.discovery.directory import is_loopback_host
from fsm_hub.errors import TransportError

PROTOCOL_VERSIONS: Final = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
"""Versions we speak, newest first; the wire format we use is the same for all of them."""
LATEST: Final = PROTOCOL_VERSIONS[0]
"""The version we offer in ``initialize`` and answer a client asking for one we don't know."""

SESSION_HEADER: Final = "Mcp-Session-Id"
VERSION_HEADER: Final = "MCP-Protocol-Version"
JSON: Final = "application/json"
SSE: Final = "text/event-stream"
POST_HEADERS: Final = {"Accept": f"{JSON}, {SSE}", "Content-Type": JSON}
"""What a client sends with every POST."""

SERVER_INFO: Final = {"name": "fsm-hub", "title": "fsm-hub", "version": __version__}
CLIENT_INFO: Final = {"name": "fsm-hub", "version": __version__}
SERVER_CAPABILITIES: Final = {
    "tools": {"listChanged": True},
    "resources": {"listChanged": True},
    "prompts": {"listChanged": True},
}

def instance_url(mcp_url: str, ref: str) -> str:
    """The per-instance endpoint beside a hub's ``.../mcp``: ``.../instances/<ref>/mcp``."""
    base = mcp_url[: -len("/mcp")] if mcp_url.endswith("/mcp") else mcp_url.rstrip("/")
    return f"{base}/instances/{quote(ref, safe='')}/mcp"


REQUESTS_BEFORE_INITIALIZE: Final = frozenset({"initialize", "ping"})
"""The only requests a session answers before ``initialize`` (the spec allows ping at any time)."""


def negotiate(requested: str) -> str:
    """The version a server answers a client's ``initialize`` with."""
    return requested if requested in PROTOCOL_VERSIONS else LATEST


def as_call_tool_result(result: Any) -> dict[str, Any]:
    """A CallToolResult (or a task-augmented call's CreateTaskResult) unchanged; a raw result
    (no content list, as brummer sends: an array, a string, a number, null) wrapped as text."""
    if isinstance(result, dict) and (
        isinstance(result.get("content"), list) or isinstance(result.get("task"), dict)
    ):
        return result
    wrapped: dict[str, Any] = {
        "content": [{"type": "text", "text": json.dumps(result, allow_nan=False)}],
        "isError": False,
    }
    if isinstance(result, dict):
        wrapped["structuredContent"] = result
    return wrapped


# -- where a request comes from ---------------------------------------------------------------


def usable_tools(tools: Iterable[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The entries of an instance's tool list a client can use, and why each other one is not.

    Not an object, no string `name`, no object `inputSchema`: the SDK clients refuse a whole
    tools/list result for any one such entry, so the hub never passes one on.
    """
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
        return f"tool {tool['name'][:64]!r} has no inputSchema object"
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


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address, bracketed or not, IPv4-mapped included.

    ``0.0.0.0`` and ``::`` are not: they mean "all interfaces". The address test itself is
    discovery's (an earlier layer, which checks instance URLs with it): one check, two users.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return is_loopback_host(host)


_HOST = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?))"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


def split_host(value: str) -> str | None:
    """The host of a ``Host`` header value (``[::1]:8080`` → ``::1``); None if it is not one.

    Strict: a name or IPv4 address, or a bracketed IPv6 address, then an optional port, and
    nothing else — ``127.0.0.1:80@evil.example`` is not a host.
    """
    match = _HOST.fullmatch(value.strip())
    if match is None:
        return None
    port = match.group("port")
    if port is not None and int(port) > 65535:
        return None
    ipv6 = match.group("ipv6")
    if ipv6 is not None:
        try:
            ipaddress.IPv6Address(ipv6)
        except ValueError:
            return None
        return ipv6
    return match.group("name")


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def accepts(accept: str, media_type: str) -> bool:
    """Whether an ``Accept`` header value admits ``media_type`` (wildcards count)."""
    kind = media_type.split("/")[0]
    for item in accept.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if "q=0" in params.replace(" ", "") and not re.search(r"q=0\.\d*[1-9]", params):
            continue
        if name in (media_type, f"{kind}/*", "*/*"):
            return True
    return False


MAX_TOOL_PAGES: Final = 1000
"""A server whose tools/list pages go on longer than this is looping or hostile."""


async def list_all_tools(
    request: Callable[[dict[str, Any] | None], Awaitable[dict[str, Any]]], who: str
) -> list[dict[str, Any]]:
    """Every tool of a server, following ``nextCursor`` (refusing loops and endless pages)."""
    tools: list[dict[str, Any]] = []
    seen: set[str] = set()
    params: dict[str, Any] | None = None
    for _ in range(MAX_TOOL_PAGES):
        result = await request(params)
        page = result.get("tools")
        if not isinstance(page, list):
            raise TransportError(f"{who} answered tools/list without a tools list")
        tools.extend(page)
        cursor = result.get("nextCursor")
        if not cursor:
            return tools
        if cursor in seen:
            raise TransportError(f"{who} tools/list pagination loops (cursor {cursor!r})")
        seen.add(cursor)
        params = {"cursor": cursor}
    raise TransportError(f"{who} tools/list has more than {MAX_TOOL_PAGES} pages")


def call_tool_params(
    name: str, arguments: Mapping[str, Any] | None, meta: Mapping[str, Any] | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments or {}}
    if meta:
        params["_meta"] = meta
    return params
