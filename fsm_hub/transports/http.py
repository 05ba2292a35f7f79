"""Streamable HTTP transport (server side, aiohttp): one `Session` per `Mcp-Session-Id`.

Loopback by default. A foreign `Origin` gets 403 and a foreign `Host` 421, as the MCP spec and
the official SDK do, so a web page cannot drive the hub through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from fsm_hub.mcp.session import (
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    METHODS,
    Session,
    error_response,
    needs_answer,
    parse_error,
    request_emit,
)
from fsm_hub.supervision.hub import Hub
from fsm_hub.transports.dashboard import Dashboard

log = logging.getLogger(__name__)

SESSION_HEADER = "Mcp-Session-Id"
BACKLOG = 256
"""Server messages a session keeps while no GET stream is open to carry them (oldest dropped)."""
_JSON = "application/json"
_SSE = "text/event-stream"


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def split_host(value: str) -> str:
    """The host part of a `Host` header value (`[::1]:8080` → `::1`)."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass(slots=True)
class HttpSession:
    session: Session
    outbox: asyncio.Queue[dict[str, Any]]
    """Server-initiated messages for the session's GET stream; kept (up to BACKLOG) until one
    is open, so a notification sent just before the client opens it is not lost."""
    streams: set[asyncio.Task[Any]] = field(default_factory=set)
    """The handlers of its open GET streams, ended when the session is."""

    async def close(self, reason: str) -> None:
        for stream in self.streams:
            stream.cancel()
        await self.session.close(reason)


class HttpEndpoint:
    """Serves `/mcp` for many clients; `token` (for the hub's private endpoint) is required if set."""

    def __init__(self, hub: Hub, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None) -> None:
        self.hub = hub
        self.host = host
        self.port = port
        self.token = token
        self.sessions: dict[str, HttpSession] = {}
        self._runner: web.AppRunner | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/mcp"

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/mcp", self._post)
        app.router.add_get("/mcp", self._get)
        app.router.add_delete("/mcp", self._delete)
        if self.token is None:  # the public endpoint also serves the dashboard at /
            Dashboard(self.hub, self._refusal).register(app)
        # Stopping closes every session (cancelling its handlers) before the runner: what is
        # left is idle keep-alive connections, which must not hold the hub's exit (and with it
        # the log's lock, which an attached process is waiting to take over) for aiohttp's 60 s.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])
        return self.url

    async def stop(self, reason: str = "hub stopped") -> None:
        self._stopping = True  # no new session may start on a hub that is going away
        for entry in list(self.sessions.values()):
            await entry.close(reason)
        self.sessions.clear()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- checks -----------------------------------------------------------------------------

    def _refusal(self, request: web.Request) -> web.Response | None:
        if self._stopping:
            stopping = error_response(None, INVALID_REQUEST, "fsm-hub is stopping")
            refusal = web.json_response(stopping, status=503)
            refusal.force_close()  # leave no keep-alive connection for the shutdown to wait on
            return refusal
        host_header = request.headers.get("Host", "")
        if not is_loopback(split_host(host_header)) and not self._is_own_host(host_header):
            return web.json_response(
                error_response(None, INVALID_REQUEST, f"Misdirected request: Host {host_header!r}"),
                status=421,
            )
        origin = request.headers.get("Origin")
        if origin is not None and not is_loopback(urlsplit(origin).hostname or ""):
            return web.json_response(
                error_response(None, INVALID_REQUEST, f"Forbidden: Origin {origin!r}"), status=403
            )
        if self.token is not None:
            given = request.headers.get("Authorization", "")
            if not secrets.compare_digest(given, f"Bearer {self.token}"):
                return web.json_response(error_response(None, INVALID_REQUEST, "Unauthorized"), status=401)
        return None

    def _is_own_host(self, host_header: str) -> bool:
        """When bound to a non-loopback address on purpose, that address is our own Host.

        Bound to a wildcard (0.0.0.0, ::), any IP literal is: DNS rebinding needs a name.
        """
        if is_loopback(self.host):
            return False
        host = split_host(host_header)
        bound = _ip_literal(self.host)
        if bound is not None and bound.is_unspecified:
            return _ip_literal(host) is not None
        return host == self.host

    def _session(self, request: web.Request, message: Any = None) -> HttpSession | web.Response:
        request_id = message.get("id") if isinstance(message, dict) else None
        session_id = request.headers.get(SESSION_HEADER)
        if not session_id:
            method = message.get("method") if isinstance(message, dict) else None
            if isinstance(method, str) and "id" in message and method not in METHODS:
                # e.g. the 2026-07-28 `server/discover` probe: -32601 tells the client to fall
                # back to `initialize`, which then opens a session
                return web.json_response(
                    error_response(request_id, METHOD_NOT_FOUND, f"Method not found: {method}")
                )
            return web.json_response(
                error_response(request_id, INVALID_REQUEST, f"Bad Request: missing {SESSION_HEADER} header"),
                status=400,
            )
        entry = self.sessions.get(session_id)
        if entry is None:
            return web.json_response(
                error_response(request_id, INVALID_REQUEST, "Session not found"), status=404
            )
        return entry

    # -- handlers ---------------------------------------------------------------------------

    async def _post(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        body = await request.read()
        try:
            message = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return web.json_response(parse_error(), status=400)
        if isinstance(message, dict) and message.get("method") == "initialize" and "id" in message:
            entry = self._new_session()
        else:
            found = self._session(request, message)
            if isinstance(found, web.Response):
                return found
            entry = found
        headers = {SESSION_HEADER: entry.session.id}
        if not needs_answer(message):
            await entry.session.handle(message)
            return web.Response(status=202, headers=headers)
        if _wants_progress(message) and _SSE in request.headers.get("Accept", ""):
            return await self._answer_as_stream(request, entry, message, headers)
        answer = await entry.session.handle(message)
        if answer is None:  # cancelled by the client
            return web.Response(status=202, headers=headers)
        return web.Response(body=json.dumps(answer).encode(), content_type=_JSON, headers=headers)

    async def _answer_as_stream(
        self, request: web.Request, entry: HttpSession, message: Any, headers: dict[str, str]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={**headers, "Content-Type": _SSE, "Cache-Control": "no-cache"})
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        token = request_emit.set(queue.put_nowait)
        try:
            work = asyncio.ensure_future(entry.session.handle(message))
        finally:
            request_emit.reset(token)
        getter: asyncio.Future[dict[str, Any]] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait((work, getter), return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    await response.write(_sse(getter.result()))
                if work.done() and queue.empty():
                    break
        finally:
            if getter is not None:
                getter.cancel()
            if not work.done():
                # The client went away: a disconnect is not a cancellation (the spec says so),
                # so the call runs to its end; nobody is left to read its answer.
                work.add_done_callback(_retrieve)
        answer = work.result()
        if answer is not None:
            await response.write(_sse(answer))
        await response.write_eof()
        return response

    def _checked_session(self, request: web.Request) -> HttpSession | web.Response:
        """The request's session once Host, Origin and token pass, else the refusal to send."""
        refused = self._refusal(request)
        return refused if refused is not None else self._session(request)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        found = self._checked_session(request)
        if isinstance(found, web.Response):
            return found
        if _SSE not in request.headers.get("Accept", ""):
            return web.Response(status=406, text="GET /mcp needs Accept: text/event-stream")
        response = web.StreamResponse(
            headers={SESSION_HEADER: found.session.id, "Content-Type": _SSE, "Cache-Control": "no-cache"}
        )
        handler = asyncio.current_task()
        assert handler is not None
        found.streams.add(handler)  # before any await: closing the session must find it
        message: dict[str, Any] | None = None
        try:
            await response.prepare(request)
            await response.write(b": fsm-hub notifications\n\n")
            while True:
                message = await found.outbox.get()
                await response.write(_sse(message))
                message = None
        except (ConnectionResetError, asyncio.CancelledError):
            if message is not None and found.session.id in self.sessions:
                _keep(found.outbox, message)  # not delivered: the next stream gets it
        finally:
            found.streams.discard(handler)
        return response

    async def _delete(self, request: web.Request) -> web.Response:
        found = self._checked_session(request)
        if isinstance(found, web.Response):
            return found
        self.sessions.pop(found.session.id, None)
        await found.close("client ended the session")
        return web.Response(status=200)

    def _new_session(self) -> HttpSession:
        session_id = secrets.token_hex(16)
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        entry = HttpSession(Session(self.hub, session_id, functools.partial(_keep, outbox)), outbox)
        self.sessions[session_id] = entry
        return entry


def _wants_progress(message: Any) -> bool:
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return False
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and "progressToken" in meta


def _keep(outbox: asyncio.Queue[dict[str, Any]], message: dict[str, Any]) -> None:
    if outbox.qsize() >= BACKLOG:
        outbox.get_nowait()
    outbox.put_nowait(message)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _sse(message: Any) -> bytes:
    return b"event: message\ndata: " + json.dumps(message).encode() + b"\n\n"
