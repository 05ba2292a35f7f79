"""The MCP requests every client towards an instance offers, whatever carries them (HTTP, stdio)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fsm_hub.errors import McpError, TransportError
from fsm_hub.mcp.jsonrpc import snippet
from fsm_hub.mcp.protocol import as_call_tool_result, call_tool_params, list_all_tools

log = logging.getLogger(__name__)

OnMessage = Callable[[dict[str, Any]], Awaitable[None] | None]
"""Receives server notifications and server requests seen on a stream (sync or async)."""


async def deliver(receiver: OnMessage, message: dict[str, Any]) -> None:
    """Hand `message` to `receiver` (awaiting it if it is async).

    A broken receiver must not fail the stream or request it was reading: one line, no
    traceback (stderr is the user's, stdout the protocol's).
    """
    try:
        outcome = receiver(message)
        if inspect.isawaitable(outcome):
            await outcome
    except Exception as exc:
        log.error("fsm-hub: relaying %s failed: %s: %s", message.get("method"), type(exc).__name__, exc)


class UpstreamMethods:
    """`request`, `ping`, `list_tools` and `call_tool` on top of a transport's `_call`."""

    @property
    def peer(self) -> str:
        """How errors name the server (its URL, or its configured name)."""
        raise NotImplementedError

    async def _call(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        timeout: float | None,
        on_message: OnMessage | None,
    ) -> Any:
        raise NotImplementedError

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        on_message: OnMessage | None = None,
    ) -> dict[str, Any]:
        """Send a JSON-RPC request and return its ``result``; JSON-RPC errors raise McpError."""
        result = await self._call(method, params, timeout, on_message)
        if not isinstance(result, dict):
            raise TransportError(f"{self.peer} answered {method} with {snippet(result)}")
        return result

    async def ping(self, timeout: float | None = None) -> None:
        """Return if the server answers at all; raise TransportError if it cannot be reached."""
        try:
            await self._call("ping", None, timeout, None)
        except McpError:
            pass  # Some servers answer ping with -32601: still alive.

    async def list_tools(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """All tools, following ``nextCursor``; ``timeout`` applies to each page."""
        return await list_all_tools(
            lambda params: self.request("tools/list", params, timeout=timeout), self.peer
        )

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        meta: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        on_message: OnMessage | None = None,
    ) -> dict[str, Any]:
        """The server's CallToolResult, unchanged; a raw result (no content list) gets wrapped."""
        params = call_tool_params(name, arguments, meta)
        return as_call_tool_result(await self._call("tools/call", params, timeout, on_message))
