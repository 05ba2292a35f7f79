"""A real MCP server built with the official Python SDK, for tests that must not be mocked.

Run as ``python -m tests.servers.sdk_server --port N [--json] [--stateless] [--event-store]``.
It serves streamable HTTP on ``http://127.0.0.1:N/mcp``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

import mcp_types
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId

TOOLS = frozenset({"echo", "add", "progress", "sleep", "gated", "open_gate", "fail", "add_tool"})
"""The names of the tools `build_server` serves."""


class MemoryEventStore(EventStore):
    """Keeps every event, so SSE streams open with a priming event and a client that
    reconnects with Last-Event-ID gets what it missed on that stream (and nothing else)."""

    def __init__(self) -> None:
        self._events: list[tuple[StreamId, EventId, mcp_types.JSONRPCMessage | None]] = []
        self._ids = itertools.count(1)

    async def store_event(self, stream_id: StreamId, message: mcp_types.JSONRPCMessage | None) -> EventId:
        event_id = str(next(self._ids))
        self._events.append((stream_id, event_id, message))
        return event_id

    async def replay_events_after(
        self, last_event_id: EventId, send_callback: EventCallback
    ) -> StreamId | None:
        position = next((i for i, event in enumerate(self._events) if event[1] == last_event_id), None)
        if position is None:
            return None
        stream_id = self._events[position][0]
        for stream, event_id, message in self._events[position + 1 :]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


def build_server() -> MCPServer[object]:
    """The tools every SDK-server test can rely on."""
    server: MCPServer[object] = MCPServer("sdk-test-server", version="1.2.3", log_level="WARNING")

    @server.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    async def progress(steps: int, ctx: Context) -> str:
        """Report `steps` progress notifications, then finish."""
        for step in range(1, steps + 1):
            await ctx.report_progress(step, steps, f"step {step}")
        return f"done after {steps} steps"

    @server.tool()
    async def sleep(seconds: float) -> str:
        """Answer after `seconds`; lets tests hit their own timeout against a real server."""
        await asyncio.sleep(seconds)
        return "slept"

    gates: dict[str, asyncio.Event] = {}

    @server.tool()
    async def gated(key: str, ctx: Context) -> str:
        """Report progress 1/2, wait until `open_gate(key)` is called, report 2/2, answer.

        A call that is in flight for exactly as long as a test wants, with no timer.
        """
        await ctx.report_progress(1, 2, "waiting")
        await gates.setdefault(key, asyncio.Event()).wait()
        await ctx.report_progress(2, 2, "opened")
        return f"gate {key} passed"

    @server.tool()
    def open_gate(key: str) -> str:
        """Let the `gated(key)` call (now or to come) finish."""
        gates.setdefault(key, asyncio.Event()).set()
        return f"opened {key}"

    @server.tool()
    def fail(message: str) -> str:
        """Raise, so the SDK answers with an isError result."""
        raise ValueError(message)

    @server.tool()
    async def add_tool(name: str, ctx: Context) -> str:
        """Register a new tool and announce it on both the request stream and the GET stream."""

        def dynamic() -> str:
            return f"I am {name}"

        server.add_tool(dynamic, name=name, description=f"added at runtime as {name}")
        changed = mcp_types.ToolListChangedNotification()
        # Request-scoped: rides this POST's SSE stream (dropped in JSON-response mode).
        await ctx.session.send_notification(changed, related_request_id=ctx.request_id)
        # Connection-scoped: rides the standalone GET stream, if the client opened one.
        await ctx.session.send_tool_list_changed()
        return f"added {name}"

    @server.resource("memo://greeting", mime_type="text/plain")
    def greeting() -> str:
        """A fixed text resource."""
        return "hello from the sdk server"

    @server.prompt()
    def review(code: str) -> str:
        """A one-message prompt."""
        return f"Please review: {code}"

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--json", action="store_true", help="answer POSTs with plain JSON, not SSE")
    parser.add_argument("--stateless", action="store_true", help="no session ids, no GET stream")
    parser.add_argument(
        "--event-store", action="store_true", help="keep events so SSE streams start with a priming event"
    )
    args = parser.parse_args()
    build_server().run(
        "streamable-http",
        host=args.host,
        port=args.port,
        json_response=args.json,
        stateless_http=args.stateless,
        event_store=MemoryEventStore() if args.event_store else None,
    )


if __name__ == "__main__":
    main()
