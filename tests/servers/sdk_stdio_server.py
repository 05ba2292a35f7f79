"""The SDK test server (tests/servers/sdk_server.py) over stdio, with session state of its own.

Run as ``python -m tests.servers.sdk_stdio_server`` from the repository root.

Over stdio the server has one client (its session), and keeps for it what an MCP server keeps
per session: ``resources/subscribe`` / ``resources/unsubscribe`` and ``logging/setLevel``
(handshake-era requests, served by the SDK's low-level server). Tools to drive it:

- ``touch(uris)``: ``notifications/resources/updated`` for each of ``uris`` subscribed to;
- ``log(level, data)``: ``notifications/message`` at ``level``, unless below the level set;
- ``change_resources()``: ``notifications/resources/list_changed``;
- ``state()``: the subscriptions, the level and every subscribe, unsubscribe and setLevel
  received, as JSON.
"""

from __future__ import annotations

import json
from typing import Any

import mcp_types
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer

from tests.servers.sdk_server import build_server

LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


def build_stdio_server() -> MCPServer[object]:
    server = build_server()
    subscribed: set[str] = set()
    level: list[str] = []
    received: list[list[str]] = []

    async def subscribe(ctx: ServerRequestContext[Any], params: mcp_types.SubscribeRequestParams) -> Any:
        received.append(["resources/subscribe", params.uri])
        subscribed.add(params.uri)
        return mcp_types.EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext[Any], params: mcp_types.UnsubscribeRequestParams) -> Any:
        received.append(["resources/unsubscribe", params.uri])
        subscribed.discard(params.uri)
        return mcp_types.EmptyResult()

    async def set_level(ctx: ServerRequestContext[Any], params: mcp_types.SetLevelRequestParams) -> Any:
        received.append(["logging/setLevel", params.level])
        level[:] = [params.level]
        return mcp_types.EmptyResult()

    lowlevel = server._lowlevel_server
    lowlevel.add_request_handler("resources/subscribe", mcp_types.SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", mcp_types.UnsubscribeRequestParams, unsubscribe)
    lowlevel.add_request_handler("logging/setLevel", mcp_types.SetLevelRequestParams, set_level)

    @server.tool()
    async def touch(uris: list[str], ctx: Context) -> str:
        """Send resources/updated for each subscribed URI of `uris`."""
        for uri in uris:
            if uri in subscribed:
                await ctx.session.send_resource_updated(uri)
        return "touched"

    @server.tool()
    async def log(level: mcp_types.LoggingLevel, data: str, ctx: Context) -> str:
        """Send notifications/message at `level`, unless below the level set."""
        if not level_set() or LEVELS.index(level) >= LEVELS.index(level_set()):
            await ctx.session.send_log_message(level, data)
        return "logged"

    @server.tool()
    async def change_resources(ctx: Context) -> str:
        """Send notifications/resources/list_changed."""
        await ctx.session.send_resource_list_changed()
        return "changed"

    @server.tool()
    def state() -> str:
        """The subscriptions, the log level and the session requests received, as JSON."""
        held = sorted(subscribed)
        return json.dumps({"subscribed": held, "level": level_set() or None, "received": received})

    def level_set() -> str:
        return level[0] if level else ""

    return server


def main() -> None:
    build_stdio_server().run("stdio")


if __name__ == "__main__":
    main()
