"""Streamable HTTP transport (server side, aiohttp): one `Session` per `Mcp-Session-Id`.

Loopback by default. A foreign `Origin` gets 403 and a foreign or malformed `Host` 421, as the
MCP spec and the official SDK do, so a web page cannot drive the hub through DNS rebinding.
Nothing can hold it open: connections are capped and idle ones closed (`connections.py`),
bodies are read under a deadline and size limit, sessions expire when idle and are capped in
number. On the private endpoint (a `token` is set) the token is checked before a body is read,
and a session ends with the GET stream of the bridge that opened it.

Streams are resumable (`resumable.py`): the GET stream and every POST answered as SSE carry
event ids, and a GET with `Last-Event-ID` replays the rest of the stream it names and follows
it on; a POST stream whose connection drops keeps collecting until its call ends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web

from fsm_hub.mcp import jsonrpc, sse
from fsm_hub.mcp.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    JsonRpcDecodeError,
    decode_error,
    error_response,
    needs_answer,
)
from fsm_hub.mcp.protocol import JSON, SESSION_HEADER, SSE, accepts, ip_literal, is_loopback, split_host
from fsm_hub.mcp.session import METHODS, Session, request_emit
from fsm_hub.supervision.hub import Hub
from fsm_hub.transports.connections import ConnectionGuard, retrieve
from fsm_hub.transports.dashboard import Dashboard
from fsm_hub.transports.limits import HttpLimits
from fsm_hub.transports.resumable import ResumableStream, parse_event_id

log = logging.getLogger(__name__)

__all__ = ["RELAYED_HEADER", "SESSION_HEADER", "HttpEndpoint", "HttpLimits", "is_loopback", "split_host"]

RELAYED_HEADER: Final = "X-Fsm-Hub-Relayed"
"""Sent by an attached `serve --http` on the private endpoint: its sessions are HTTP clients'
(whose GET streams come and go), not a bridge's."""
INSTANCE_PATH: Final = "/instances/{ref}/mcp"
"""A per-instance endpoint: that instance's own MCP, unprefixed, no hub tools."""
BACKLOG: Final = 256
"""Events a session's GET stream keeps (oldest dropped): those no GET connection has carried
yet, and after them the last ones carried, for a client resuming with `Last-Event-ID`."""
POST_EVENTS: Final = 1024
"""Events a POST stream keeps (oldest dropped) until its answer is delivered."""
GET_STREAM: Final = "get"
"""The key of a session's GET stream in its event ids (`get-<n>`; POST streams are `p<k>-<n>`)."""


@dataclass(slots=True)
class HttpSession:
    session: Session
    get_stream: ResumableStream
    """Server-initiated messages for the session's GET stream; kept (up to BACKLOG) while no
    GET is open, so a notification sent just before the client opens it is not lost, and after
    they were carried, so a client that lost its connection can resume after the last it saw."""
    last_seen: float
    """When the session last had a request (on the endpoint's clock)."""
    posts: dict[str, ResumableStream] = field(default_factory=dict)
    """Its POST streams that may still be resumed: a call still running, or an answer not yet
    delivered (kept `stream_keep` seconds after the call ended)."""
    opened: int = 0
    """POST streams opened so far (the next one is `p<opened + 1>`)."""
    streams: set[asyncio.Task[Any]] = field(default_factory=set)
    """The handlers of its open GET streams, ended when the session is."""
    requests: int = 0
    """Requests being handled right now."""
    ends_with_stream: bool = False
    """A bridge's session: it ends when the bridge's GET stream does (the bridge is gone)."""

    def idle_since(self, now: float) -> float:
        """Seconds the session has been idle; 0 while it has a request or an open stream."""
        return 0.0 if self.requests or self.streams else now - self.last_seen

    def post_stream(self) -> ResumableStream:
        """A new POST stream (registered for resumption once it is answered as SSE)."""
        self.opened += 1
        return ResumableStream(f"p{self.opened}", POST_EVENTS)

    def resumed(self, last_event_id: str) -> tuple[ResumableStream, int] | None:
        """The stream ``Last-Event-ID`` names, and the event to resume after; None if unknown."""
        parsed = parse_event_id(last_event_id)
        if parsed is None:
            return None
        key, seq = parsed
        stream = self.get_stream if key == GET_STREAM else self.posts.get(key)
        if stream is None or not stream.holds(seq):
            return None
        return stream, seq

    def expire_streams(self, now: float, keep: float) -> None:
        """Forget the POST streams whose call ended ``keep`` seconds ago and nobody follows."""
        for key, stream in list(self.posts.items()):
            ended = stream.finished_at
            if ended is not None and now - ended >= keep and not stream.followed:
                del self.posts[key]

    async def close(self, reason: str) -> None:
        for stream in self.streams:
            stream.cancel()
        await self.session.close(reason)

    def __repr__(self) -> str:
        return (
            f"<HttpSession {self.session.id[:8]} requests={self.requests} streams={len(self.streams)}"
            f" posts={len(self.posts)} bound={self.session.bound}>"
        )


class HttpEndpoint:
    """Serves `/mcp` for many clients; `token` (for the hub's private endpoint) is required if set."""

    def __init__(
        self,
        hub: Hub,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        limits: HttpLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hub = hub
        self.host = host
        self.port = port
        self.token = token
        self.limits = limits or HttpLimits()
        self.clock = clock
        self.sessions: dict[str, HttpSession] = {}
        self.connections = ConnectionGuard(
            self.limits.max_connections, self.limits.head_timeout, self.limits.idle_timeout
        )
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = False

    def __repr__(self) -> str:
        kind = "private" if self.token is not None else "public"
        return f"<HttpEndpoint {kind} {self.url} sessions={len(self.sessions)} {self.connections!r}>"

    @property
    def url(self) -> str:
        return mcp_url(self.host, self.port)

    async def start(self) -> str:
        app = web.Application(client_max_size=self.limits.max_body, middlewares=[self._track])
        app.router.add_post("/mcp", self._post)
        app.router.add_get("/mcp", self._get)
        app.router.add_delete("/mcp", self._delete)
        # Per-instance endpoints (issue 8): one instance, transparent, the same checks.
        app.router.add_post(INSTANCE_PATH, self._post)
        app.router.add_get(INSTANCE_PATH, self._get)
        app.router.add_delete(INSTANCE_PATH, self._delete)
        if self.token is None:  # the public endpoint also serves the dashboard at /
            Dashboard(self.hub, self._refusal).register(app)
        self._runner, self.port = await start_guarded(app, self.host, self.port, self.connections)
        self._sweeper = asyncio.create_task(self._sweep(), name=f"sessions-expiry {self.port}")
        return self.url

    async def stop(self, reason: str = "hub stopped") -> None:
        self._stopping = True  # no new session may start on a hub that is going away
        if self._sweeper is not None:
            self._sweeper.cancel()
        for entry in list(self.sessions.values()):
            await entry.close(reason)
        self.sessions.clear()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- expiry -----------------------------------------------------------------------------

    async def expire_idle(self) -> list[str]:
        """Close the sessions idle for `session_idle` seconds; their ids then get 404.

        Also forgets the POST streams kept `stream_keep` seconds after their call ended.
        """
        now = self.clock()
        for entry in self.sessions.values():
            entry.expire_streams(now, self.limits.stream_keep)
        expired = [
            entry for entry in self.sessions.values() if entry.idle_since(now) >= self.limits.session_idle
        ]
        for entry in expired:
            self.sessions.pop(entry.session.id, None)
            await entry.close("idle")
        return [entry.session.id for entry in expired]

    async def _sweep(self) -> None:
        interval = min(max(self.limits.session_idle / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.expire_idle()
            except Exception as exc:  # a failed record must not end expiry for good
                log.error("fsm-hub: expiring idle sessions failed: %s", exc)

    # -- checks -----------------------------------------------------------------------------

    @web.middleware
    async def _track(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Mark the connection busy while a request is handled: no idle deadline meanwhile."""
        guarded = self.connections.of(request.transport)
        if guarded is not None:
            guarded.busy()
        try:
            return await handler(request)
        finally:
            if guarded is not None:
                guarded.idle()

    def _refusal(self, request: web.Request) -> web.Response | None:
        if self._stopping:
            return _refuse(error_response(None, INVALID_REQUEST, "fsm-hub is stopping"), 503)
        return origin_refusal(request, self.host, self.token)

    def _session(self, request: web.Request, message: Any = None) -> HttpSession | web.Response:
        request_id = message.get("id") if isinstance(message, dict) else None
        session_id = request.headers.get(SESSION_HEADER)
        if not session_id:
            method = message.get("method") if isinstance(message, dict) else None
            if isinstance(method, str) and "id" in message and method not in METHODS:
                # e.g. the 2026-07-28 `server/discover` probe: -32601 tells the client to fall
                # back to `initialize`, which then opens a session
                return _json(error_response(request_id, METHOD_NOT_FOUND, f"Method not found: {method}"))
            return _json(
                error_response(request_id, INVALID_REQUEST, f"Bad Request: missing {SESSION_HEADER} header"),
                400,
            )
        entry = self.sessions.get(session_id)
        if entry is None or entry.session.instance_ref != request.match_info.get("ref"):
            return _json(error_response(request_id, INVALID_REQUEST, "Session not found"), 404)
        return entry

    # -- handlers ---------------------------------------------------------------------------

    async def _post(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request)  # before the body: an unauthorized body is never read
        if refused is not None:
            return refused
        if request.content_type != JSON:
            return _refuse(
                error_response(None, INVALID_REQUEST, "Unsupported Media Type: POST needs application/json"),
                415,
            )
        accept = request.headers.get("Accept", "")
        if not (accepts(accept, JSON) and accepts(accept, SSE)):
            return _refuse(
                error_response(
                    None, INVALID_REQUEST, f"Not Acceptable: Accept must list both {JSON} and {SSE}"
                ),
                406,
            )
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                body = await request.read()
        except TimeoutError:
            return _refuse(error_response(None, INVALID_REQUEST, "Request Timeout: body too slow"), 408)
        except web.HTTPRequestEntityTooLarge:
            too_large = f"Invalid Request: body exceeds {self.limits.max_body} bytes"
            return _refuse(error_response(None, INVALID_REQUEST, too_large), 413)
        try:
            message = jsonrpc.decode(body, max_bytes=self.limits.max_body)
        except JsonRpcDecodeError as exc:
            return _json(decode_error(exc), 400)
        if isinstance(message, dict) and message.get("method") == "initialize" and "id" in message:
            if len(self.sessions) >= self.limits.max_sessions:
                full = f"fsm-hub serves {len(self.sessions)} sessions, its --max-sessions; try later"
                refusal = _json(error_response(message.get("id"), INVALID_REQUEST, full), 503)
                refusal.headers["Retry-After"] = "5"
                return refusal
            entry = self._new_session(request.match_info.get("ref"))
            entry.ends_with_stream = self.token is not None and RELAYED_HEADER not in request.headers
            if entry.session.instance_ref is not None:
                return await self._initialize_instance(request, entry, message)
        else:
            found = self._session(request, message)
            if isinstance(found, web.Response):
                return found
            entry = found
        entry.requests += 1
        try:
            return await self._answer(request, entry, message)
        finally:
            entry.requests -= 1
            entry.last_seen = self.clock()

    async def _answer(self, request: web.Request, entry: HttpSession, message: Any) -> web.StreamResponse:
        headers = {SESSION_HEADER: entry.session.id}
        if not needs_answer(message):
            await entry.session.handle(message)
            return web.Response(status=202, headers=headers)
        # Plain JSON unless the request sends something first (progress, logs, an instance's
        # sampling or elicitation request): then the answer becomes an SSE stream carrying it.
        # A tool call on a per-instance endpoint is always an SSE answer opening with a priming
        # event (SEP-1699), as the instance's own would be. Either stream is resumable.
        stream = entry.post_stream()
        prime = entry.session.instance_ref is not None and _is_tool_call(message)
        if prime:
            stream.append(None)
        sent_first: list[bool] = []
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def emit(sent: dict[str, Any]) -> None:
            if stream.finished:  # e.g. a late progress notification after the answer
                log.debug("fsm-hub: %s after its answer, not sent: %s", stream.key, sent.get("method"))
                return
            stream.append(sent)
            sent_first.append(True)
            if not first.done():
                first.set_result(None)

        token = request_emit.set(emit)
        try:
            work = asyncio.ensure_future(entry.session.handle(message))
        finally:
            request_emit.reset(token)
        work.add_done_callback(functools.partial(_settle, first))
        try:
            await asyncio.shield(first)
        except asyncio.CancelledError:
            work.add_done_callback(retrieve)  # a disconnect is not a cancellation
            raise
        if work.done() and not sent_first:
            answer = work.result()
            if answer is None:  # cancelled by the client
                return web.Response(status=202, headers=headers)
            if not prime:
                return web.Response(body=jsonrpc.encode_answer(answer), content_type=JSON, headers=headers)
        # From here the call's end finishes the stream, whoever follows it by then.
        work.add_done_callback(functools.partial(self._conclude, stream))
        entry.posts[stream.key] = stream
        response = web.StreamResponse(headers={**headers, "Content-Type": SSE, "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
        except ConnectionResetError:
            return response  # the stream is kept: a GET with its priming id resumes it
        await self._carry(request, response, entry, stream)
        return response

    def _conclude(self, stream: ResumableStream, work: asyncio.Future[Any]) -> None:
        """The call has ended: its answer (if any) is the stream's last event."""
        if work.cancelled():
            answer = None
        elif (exc := work.exception()) is not None:
            log.error("fsm-hub: answering %s failed: %s", stream.key, exc)
            answer = None
        else:
            answer = work.result()
        if answer is not None:
            stream.append(answer)
        stream.finish(self.clock())

    async def _carry(
        self,
        request: web.Request,
        response: web.StreamResponse,
        entry: HttpSession,
        stream: ResumableStream,
        after: int | None = None,
    ) -> bool:
        """Write ``stream``'s events after ``after`` onto ``response`` while this connection holds it.

        True once the whole stream is delivered (a POST stream's answer: the response ends and
        the stream is forgotten); False if the connection was lost or another one took over.
        A disconnect is not a cancellation (the spec says so): the call runs on, its stream
        keeps collecting for a client that resumes it.
        """
        guarded = self.connections.of(request.transport)
        lost = guarded.lost if guarded is not None else None
        events = stream.follow(after, lost)
        try:
            async for event in events:
                await response.write(event.encode(stream.key))
        except ConnectionResetError:
            return False
        finally:
            await events.aclose()
        if not stream.complete or (lost is not None and lost.done()):
            return False
        if entry.posts.get(stream.key) is stream:
            del entry.posts[stream.key]
        try:
            await response.write_eof()
        except ConnectionResetError:
            pass
        return True

    def _checked_session(self, request: web.Request) -> HttpSession | web.Response:
        """The request's session once Host, Origin and token pass, else the refusal to send."""
        refused = self._refusal(request)
        return refused if refused is not None else self._session(request)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        found = self._checked_session(request)
        if isinstance(found, web.Response):
            return found
        if not accepts(request.headers.get("Accept", ""), SSE):
            return web.Response(status=406, text="GET /mcp needs Accept: text/event-stream")
        # Last-Event-ID names the stream to resume (the GET stream or a POST's) and where. An id
        # this session did not issue, or of a stream forgotten since, resumes nothing: the GET
        # opens the session's GET stream as without the header (replay is a MAY; what another
        # stream would have carried is never replayed here).
        stream, after = found.get_stream, None
        last_event_id = request.headers.get("Last-Event-ID")
        if last_event_id is not None:
            resumed = found.resumed(last_event_id)
            if resumed is None:
                log.debug("fsm-hub: Last-Event-ID %r resumes nothing in its session", last_event_id[:80])
            else:
                stream, after = resumed
        response = web.StreamResponse(
            headers={SESSION_HEADER: found.session.id, "Content-Type": SSE, "Cache-Control": "no-cache"}
        )
        handler = asyncio.current_task()
        assert handler is not None
        found.streams.add(handler)  # before any await: closing the session must find it
        guarded = self.connections.of(request.transport)
        lost = False
        try:
            await response.prepare(request)
            await response.write(sse.COMMENT)
            delivered = await self._carry(request, response, found, stream, after)
            lost = not delivered and (guarded is None or guarded.lost.done())
        except (ConnectionResetError, asyncio.CancelledError):
            lost = not found.session.closed
        finally:
            found.streams.discard(handler)
            found.last_seen = self.clock()
        if (
            lost
            and stream is found.get_stream
            and found.ends_with_stream
            and not found.streams
            and found.session.id in self.sessions
        ):
            # A bridge keeps its GET stream open for its whole life: the stream ending means
            # the bridge process is gone, and so is its session.
            self.sessions.pop(found.session.id, None)
            await found.close("bridge disconnected")
        return response

    async def _delete(self, request: web.Request) -> web.Response:
        found = self._checked_session(request)
        if isinstance(found, web.Response):
            return found
        self.sessions.pop(found.session.id, None)
        await found.close("client ended the session")
        return web.Response(status=200)

    async def _initialize_instance(
        self, request: web.Request, entry: HttpSession, message: dict[str, Any]
    ) -> web.StreamResponse:
        """`initialize` on a per-instance endpoint: no session unless the instance answers it."""
        entry.requests += 1
        try:
            answer = await entry.session.handle(message)
        finally:
            entry.requests -= 1
            entry.last_seen = self.clock()
        if isinstance(answer, dict) and "error" in answer:
            self.sessions.pop(entry.session.id, None)
            await entry.close("initialize failed")
            unknown = answer["error"].get("code") == INVALID_PARAMS
            refusal = _json(answer, 404 if unknown else 503)
            if not unknown:
                refusal.headers["Retry-After"] = "1"  # not active now: a client may retry
            return refusal
        return _json_with(answer, {SESSION_HEADER: entry.session.id})

    def _new_session(self, instance: str | None = None) -> HttpSession:
        session_id = secrets.token_hex(16)
        get_stream = ResumableStream(GET_STREAM, BACKLOG)
        session = Session(self.hub, session_id, get_stream.append, instance=instance)
        entry = HttpSession(session, get_stream, self.clock())
        self.sessions[session_id] = entry
        return entry


def origin_refusal(request: web.Request, bound_host: str, token: str | None) -> web.Response | None:
    """The refusal for a request from where it must not come (Host, Origin, token), else None."""
    host_header = request.headers.get("Host", "")
    host = split_host(host_header)
    if host is None or (not is_loopback(host) and not _is_own_host(bound_host, host)):
        return _refuse(
            error_response(None, INVALID_REQUEST, f"Misdirected request: Host {host_header!r}"), 421
        )
    origin = request.headers.get("Origin")
    if origin is not None and not _loopback_origin(origin):
        return _refuse(error_response(None, INVALID_REQUEST, f"Forbidden: Origin {origin!r}"), 403)
    if token is not None:
        given = request.headers.get("Authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _refuse(error_response(None, INVALID_REQUEST, "Unauthorized"), 401)
    return None


def _is_own_host(bound_host: str, host: str) -> bool:
    """When bound to a non-loopback address on purpose, that address is our own Host.

    Bound to a wildcard (0.0.0.0, ::), any IP literal is: DNS rebinding needs a name.
    """
    if is_loopback(bound_host):
        return False
    bound = ip_literal(bound_host)
    if bound is not None and bound.is_unspecified:
        return ip_literal(host) is not None
    return host == bound_host


def mcp_url(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/mcp"


async def start_guarded(
    app: web.Application, host: str, port: int, guard: ConnectionGuard
) -> tuple[web.AppRunner, int]:
    """Serve ``app`` at ``host:port`` behind ``guard``; the runner and the port bound."""
    # Stopping closes every session (cancelling its handlers) before the runner: what is left
    # is idle keep-alive connections, which must not hold the hub's exit (and with it the log's
    # lock, which an attached process is waiting to take over) for aiohttp's 60 s.
    # lingering_time: after refusing a request unread, drain its body for at most a second.
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=0.5, lingering_time=1.0
    )
    await runner.setup()
    await GuardedSite(runner, host, port, guard=guard).start()
    return runner, port or int(runner.addresses[0][1])


class GuardedSite(web.TCPSite):
    """A TCP site whose connections pass through a `ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, guard: ConnectionGuard) -> None:
        super().__init__(runner, host, port, reuse_address=True)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.factory(server),  # type: ignore[arg-type]
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )


def _loopback_origin(origin: str) -> bool:
    try:
        return is_loopback(urlsplit(origin).hostname or "")
    except ValueError:
        return False


def _json(message: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=jsonrpc.encode_answer(message), content_type=JSON, status=status)


def _json_with(message: Any, headers: dict[str, str]) -> web.Response:
    return web.Response(body=jsonrpc.encode_answer(message), content_type=JSON, headers=headers)


def _refuse(message: dict[str, Any], status: int) -> web.Response:
    """A refusal that also ends the connection: whatever body the client meant to send is never read."""
    refusal = _json(message, status)
    refusal.force_close()
    return refusal


def _is_tool_call(message: Any) -> bool:
    return isinstance(message, dict) and message.get("method") == "tools/call"


def _settle(first: asyncio.Future[None], _: object) -> None:
    if not first.done():
        first.set_result(None)
