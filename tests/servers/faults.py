"""MCP endpoints that misbehave on purpose, the way real servers sometimes do.

``FakeMcp`` is a small aiohttp.web app speaking just enough MCP; each keyword switches on one
quirk. It runs in-process (``await fake.start()`` → URL) or as a subprocess:
``python -m tests.servers.faults --port N --mode brummer`` (modes: see ``MODES``).
``Hang`` accepts connections and never answers, ``Reset`` resets them, and ``refused_url()`` is
a port nobody listens on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TS_SDK_SESSION_GONE = {
    "jsonrpc": "2.0",
    "error": {"code": -32000, "message": "Bad Request: No valid session ID provided"},
    "id": None,
}
"""What the TypeScript SDK answers (HTTP 400) for a session it does not know."""


@dataclass(frozen=True, slots=True)
class Recorded:
    """One HTTP request as the fake saw it."""

    method: str
    headers: dict[str, str]
    message: Any
    """The JSON body of a POST, None otherwise."""

    @property
    def rpc_method(self) -> str | None:
        return self.message.get("method") if isinstance(self.message, dict) else None


@dataclass
class FakeMcp:
    """A minimal MCP server over aiohttp; every field is a quirk to switch on."""

    sse: bool = False
    """Answer requests with an SSE stream instead of plain JSON."""
    line_end: str = "\n"
    prelude: Sequence[str] = ()
    """Raw SSE text written before the response event (comments, priming events, notifications)."""
    sessions: bool = True
    """Hand out an Mcp-Session-Id on initialize and insist on it afterwards."""
    version: str | None = None
    """Protocol version to answer; by default the one the client offered."""
    expire_after: int | None = None
    """A session dies after this many requests following initialize."""
    expire_status: int = 404
    """404 (Python SDK) or 400 (TypeScript SDK, with a body about the session)."""
    brummer: bool = False
    """-32601 for ping and for notifications/initialized, raw results for tools/call."""
    tool_pages: Sequence[Sequence[str]] = (("echo",),)
    loop_cursor: bool = False
    """The last page points back at the second one."""
    status: int | None = None
    """Answer every non-initialize POST with this HTTP status."""
    garbage: bool = False
    """Answer every non-initialize POST with HTML."""
    cut: str | None = None
    """SSE streams end before the response: "abort" drops the connection, "eof" ends cleanly."""
    get_stream: bool = False
    """Offer the standalone GET stream (405 otherwise); feed it with ``push``."""
    delete_hangs: bool = False
    raw_results: dict[str, str] = field(default_factory=dict)
    """Tool name → the raw JSON text its tools/call result is written as (NaN, 1e999, deep nesting)."""
    keep_open: bool = False
    """SSE streams stay open after the response (a leak the client must not share)."""
    storm: bool = False
    """The GET stream sends tools/resources/prompts list_changed in a tight loop, forever."""
    tool_entries: Sequence[Any] | None = None
    """tools/list answers exactly these entries (garbage included) instead of ``tool_pages``."""
    stormed: int = 0
    """list_changed notifications written by the storm so far."""

    requests: list[Recorded] = field(default_factory=list)
    live_sessions: dict[str, int] = field(default_factory=dict)
    """Session id → requests served on it since initialize."""
    transports: list[asyncio.BaseTransport] = field(default_factory=list)
    _session_count: int = 0
    _runner: web.AppRunner | None = None
    _stream_queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_route("*", "/mcp", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/mcp"
        return self.url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def push(self, message: dict[str, Any]) -> None:
        """Send a message down the standalone GET stream."""
        self._stream_queue.put_nowait(message)

    def posted(self, rpc_method: str) -> list[Recorded]:
        return [r for r in self.requests if r.rpc_method == rpc_method]

    def of_method(self, http_method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == http_method]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.transport is not None and request.transport not in self.transports:
            self.transports.append(request.transport)
        body = await request.read()
        message = json.loads(body) if body else None
        self.requests.append(Recorded(request.method, dict(request.headers), message))
        if request.method == "DELETE":
            if self.delete_hangs:
                await self._stopping.wait()
            if not self.sessions:
                return web.json_response({"error": "no sessions here"}, status=405)
            self.live_sessions.pop(request.headers.get("Mcp-Session-Id", ""), None)
            return web.Response(status=200)
        if request.method == "GET":
            return await self._stream(request)
        assert isinstance(message, dict)
        method = message.get("method")
        if method == "initialize":
            return self._initialize(message)
        if self.sessions:
            refusal = self._check_session(request.headers.get("Mcp-Session-Id"))
            if refusal is not None:
                return refusal
        if self.status is not None:
            return web.Response(status=self.status, text="Internal Server Error: it broke")
        if self.garbage:
            return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        if "id" not in message:
            if self.brummer and method == "notifications/initialized":
                return web.json_response(_error(None, -32601, f"method {method} not found"))
            return web.Response(status=202)
        params = message.get("params") or {}
        raw = self.raw_results.get(params.get("name")) if message["method"] == "tools/call" else None
        if raw is not None:
            text = '{"jsonrpc":"2.0","id":' + json.dumps(message["id"]) + ',"result":' + raw + "}"
            return await self._answer(request, text)
        return await self._answer(request, _respond(message["id"], self._dispatch(message)))

    def _initialize(self, message: dict[str, Any]) -> web.Response:
        headers = {}
        if self.sessions and not self.brummer:
            self._session_count += 1
            session_id = f"session-{self._session_count}"
            self.live_sessions[session_id] = 0
            headers["Mcp-Session-Id"] = session_id
        result = {
            "protocolVersion": self.version or message["params"]["protocolVersion"],
            "capabilities": {"tools": {"listChanged": True}},
            "serverInfo": {"name": "brummer" if self.brummer else "fake", "version": "0.0.1"},
        }
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": result}, headers=headers)

    def _check_session(self, session_id: str | None) -> web.Response | None:
        if self.brummer:
            return None
        if session_id not in self.live_sessions:
            return _session_gone(self.expire_status)
        self.live_sessions[session_id] += 1
        if self.expire_after is not None and self.live_sessions[session_id] > self.expire_after:
            del self.live_sessions[session_id]
            return _session_gone(self.expire_status)
        return None

    def _dispatch(self, message: dict[str, Any]) -> tuple[str, Any]:
        method = message["method"]
        params = message.get("params") or {}
        if method == "ping" and self.brummer:
            return "error", {"code": -32601, "message": "Method not found"}
        if method == "ping":
            return "result", {}
        if method == "tools/list" and self.tool_entries is not None:
            return "result", {"tools": list(self.tool_entries)}
        if method == "tools/list":
            return "result", self._tools_page(params.get("cursor"))
        if method == "tools/call":
            return self._call_tool(params["name"], params.get("arguments") or {})
        if method in ("resources/subscribe", "resources/unsubscribe", "logging/setLevel"):
            return "result", {}  # accepted (what was asked is in `posted`)
        return "error", {"code": -32601, "message": "Method not found", "data": method}

    def _tools_page(self, cursor: str | None) -> dict[str, Any]:
        index = int(cursor.removeprefix("page-")) if cursor else 0
        page: dict[str, Any] = {
            "tools": [{"name": name, "inputSchema": {"type": "object"}} for name in self.tool_pages[index]]
        }
        if index + 1 < len(self.tool_pages):
            page["nextCursor"] = f"page-{index + 1}"
        elif self.loop_cursor:
            page["nextCursor"] = "page-1"
        return page

    def _call_tool(self, name: str, arguments: dict[str, Any]) -> tuple[str, Any]:
        if name == "fail":
            return "error", {"code": -32602, "message": "Invalid params", "data": {"field": "x"}}
        if self.brummer:
            if name == "raw_list":
                return "result", [1, 2, 3]
            return "result", {"ok": True, "echo": arguments}
        return "result", {"content": [{"type": "text", "text": json.dumps(arguments)}], "isError": False}

    async def _answer(self, request: web.Request, response: dict[str, Any] | str) -> web.StreamResponse:
        body = response if isinstance(response, str) else json.dumps(response)
        if not self.sse:
            return web.Response(text=body, content_type="application/json")
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        for before in self.prelude:
            await stream.write(before.replace("\n", self.line_end).encode())
        if self.cut == "abort":
            await stream.write(b'event: message\ndata: {"jsonrpc":"2.0","id"')
            assert request.transport is not None
            request.transport.abort()
            return stream
        if self.cut != "eof":
            end = self.line_end
            await stream.write(f"event: message{end}data: {body}{end}{end}".encode())
        if self.keep_open:
            await self._stopping.wait()
        await stream.write_eof()
        return stream

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if not self.get_stream:
            return web.Response(status=405, headers={"Allow": "POST, DELETE"})
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        await stream.write(b": stream open\n\n")
        if self.storm:
            return await self._storm(stream)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                message = asyncio.ensure_future(self._stream_queue.get())
                done, _ = await asyncio.wait({message, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    message.cancel()
                    return stream
                await stream.write(f"data: {json.dumps(message.result())}\n\n".encode())
        finally:
            stopping.cancel()

    async def _storm(self, stream: web.StreamResponse) -> web.StreamResponse:
        """Announce list changes as fast as the connection takes them, until stopped or cut off."""
        chunk = b"".join(f"data: {json.dumps(n)}\n\n".encode() for n in STORM_BURST)
        with contextlib.suppress(ConnectionResetError):  # the client went away
            while not self._stopping.is_set():
                await stream.write(chunk)  # waits only when the socket's buffer is full
                self.stormed += len(STORM_BURST)
                await asyncio.sleep(0)  # still answers pings and calls: healthy, only noisy
        return stream


STORM_BURST = [
    {"jsonrpc": "2.0", "method": f"notifications/{kind}/list_changed"}
    for kind in ("tools", "tools", "resources", "tools", "prompts")
] * 20
"""One write of the storm: 100 list changes, mostly of tools."""

GARBAGE_TOOLS: list[Any] = [
    "not an object",
    {"description": "no name", "inputSchema": {"type": "object"}},
    {"name": 42, "inputSchema": {"type": "object"}},
    {"name": "echo", "inputSchema": {"type": "object"}},
    None,
    {"name": None, "inputSchema": {"type": "object"}},
    {"name": "no_schema"},
]
"""A tool list with one usable tool (``echo``) among entries no client can use."""


class Hang:
    """Accepts connections, reads whatever comes, never answers."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.url = ""

    async def start(self, port: int = 0) -> str:
        self._server = await asyncio.start_server(self._swallow, "127.0.0.1", port)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/mcp"
        return self.url

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        while await reader.read(65536):
            pass

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Reset(Hang):
    """Reads the request, then resets the connection (RST, not a polite FIN)."""

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def refused_url() -> str:
    """A URL on a loopback port nothing listens on."""
    return f"http://127.0.0.1:{free_port()}/mcp"


def _respond(request_id: Any, outcome: tuple[str, Any]) -> dict[str, Any]:
    kind, value = outcome
    return {"jsonrpc": "2.0", "id": request_id, kind: value}


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _session_gone(status: int) -> web.Response:
    if status == 400:
        return web.json_response(TS_SDK_SESSION_GONE, status=400)
    return web.json_response(_error(None, -32600, "Session not found"), status=status)


PRELUDE = (
    ": this is a comment\n\n",
    "id: 1\n\n",  # priming event without data
    "id: 2\ndata:\n\n",  # priming event with empty data (what the Python SDK sends)
    'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress",'
    '"params":{"progressToken":"t","progress":1}}\n\n',
    ": keep-alive\n",
    'data: {"jsonrpc":"2.0","method":\n'  # one message split over two data lines
    'data: "notifications/tools/list_changed"}\n\n',
)
"""Everything a POST's SSE stream may carry before the response."""

MODES: dict[str, Callable[[], FakeMcp]] = {
    "plain": FakeMcp,
    "sse-quirks": lambda: FakeMcp(sse=True, line_end="\r\n", prelude=PRELUDE),
    "brummer": lambda: FakeMcp(brummer=True, sessions=False),
    "expiring": lambda: FakeMcp(expire_after=2),
    "expiring-ts": lambda: FakeMcp(expire_after=2, expire_status=400),
    "old-version": lambda: FakeMcp(version="2024-11-05"),
    "paged": lambda: FakeMcp(tool_pages=(("a", "b"), ("c",), ("d", "e"))),
    "http-500": lambda: FakeMcp(status=500),
    "garbage": lambda: FakeMcp(garbage=True),
    "sse-cut": lambda: FakeMcp(sse=True, prelude=PRELUDE[3:4], cut="abort"),
    "get-stream": lambda: FakeMcp(get_stream=True),
    "storm": lambda: FakeMcp(get_stream=True, storm=True),
    "garbage-tools": lambda: FakeMcp(tool_entries=GARBAGE_TOOLS),
}


async def _serve(mode: str, port: int) -> None:
    fake = Hang() if mode == "hang" else Reset() if mode == "reset" else MODES[mode]()
    await fake.start(port)
    print(fake.url, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=[*sorted(MODES), "hang", "reset"], default="plain")
    args = parser.parse_args()
    asyncio.run(_serve(args.mode, args.port))


if __name__ == "__main__":
    main()
