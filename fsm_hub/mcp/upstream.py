"""Client side of MCP Streamable HTTP: how the hub talks to one upstream server.

The hub proxies every ``tools/call`` through here, so the request path is kept lean: one
keep-alive ``aiohttp.ClientSession``, one encode per request, one bounded strict decode per
plain-JSON answer, no schema validation (results are forwarded untouched).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import aiohttp

from fsm_hub.errors import (
    LOCAL_ERRNOS,
    FsmHubError,
    LocalResourceError,
    McpError,
    SessionExpired,
    TransportError,
)
from fsm_hub.mcp import jsonrpc
from fsm_hub.mcp.jsonrpc import JsonRpcDecodeError, answers, error_of, result_of, snippet
from fsm_hub.mcp.methods import OnMessage, UpstreamMethods, deliver
from fsm_hub.mcp.protocol import (
    CLIENT_INFO,
    LATEST,
    POST_HEADERS,
    PROTOCOL_VERSIONS,
    SESSION_HEADER,
    SSE,
    VERSION_HEADER,
)
from fsm_hub.mcp.sse import SseDecoder

log = logging.getLogger(__name__)


_POST_HEADERS: Final = POST_HEADERS
# Our own asyncio deadline bounds every call; aiohttp's default 5-minute total must not interfere.
_NO_AIOHTTP_TIMEOUT: Final = aiohttp.ClientTimeout(total=None)
_DELETE_TIMEOUT: Final = 1.0
_DRAIN_TIMEOUT: Final = 1.0
"""How long a stream may stay open after its answer before we close it (one fd per call
would otherwise be held for the whole call timeout by a server that never ends it)."""
_MAX_RESUMES: Final = 100
"""Streams one request's answer may be resumed over (each after the server's ``retry``)."""
_RESUME_DELAY_MS: Final = 500
_MAX_RESUME_DELAY_MS: Final = 5000


class McpClient(UpstreamMethods):
    """One MCP server behind a Streamable HTTP endpoint such as ``http://127.0.0.1:PORT/mcp``.

    Safe to share between concurrent tasks: requests are independent HTTP exchanges and
    re-initialization after a lost session happens once, however many calls noticed it.
    """

    notifications_apart: ClassVar[bool] = True
    """Its notifications come on a stream of their own (the GET stream), not with the answers:
    a supervisor may stop reading it during a storm without holding up pings."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        session: aiohttp.ClientSession | None = None,
        on_message: OnMessage | None = None,
        client_info: Mapping[str, str] | None = None,
        capabilities: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.url = url
        """The MCP endpoint."""
        self.timeout = timeout
        """Seconds any one call may take unless the call says otherwise."""
        self.on_message = on_message
        """Default receiver of messages seen on streams, when a call brings no receiver of its own."""
        self.protocol_version: str | None = None
        """The version the server answered with; None before ``initialize``."""
        self.server_info: dict[str, Any] = {}
        self.capabilities: dict[str, Any] = {}
        """The server's capabilities from the last ``initialize``."""
        self.instructions: str | None = None
        """The server's ``instructions`` from the last ``initialize``, if it gave any."""
        self._client_info = dict(client_info or CLIENT_INFO)
        self._client_capabilities = dict(capabilities or {})
        self._http = session
        self._owns_http = session is None
        self._closed = False
        self._session_id: str | None = None
        self._configured_headers = dict(headers or {})
        """A configured server's headers (Authorization, say): sent on every request."""
        self._session_headers: Mapping[str, str] = dict(self._configured_headers)
        """``Mcp-Session-Id`` and ``MCP-Protocol-Version``, sent on everything after initialize."""
        self._headers: Mapping[str, str] = {**_POST_HEADERS, **self._configured_headers}
        self._next_id = 0
        # Bumped by each successful initialize, so calls that saw the old session can tell
        # whether someone else already replaced it.
        self._generation = 0
        self._reinit: asyncio.Future[dict[str, Any]] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listening = False
        self._stream_last_id: str | None = None
        """The GET stream's last event id, sent as ``Last-Event-ID`` when it is reopened."""
        self.listen_offered = True
        """False once the server answered the GET stream with 405 (it offers none)."""
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def session_id(self) -> str | None:
        """The ``Mcp-Session-Id`` the server gave us, if it gives any."""
        return self._session_id

    @property
    def listening(self) -> bool:
        """Whether the standalone GET stream is open right now."""
        return self._listening

    async def __aenter__(self) -> McpClient:
        try:
            await self.initialize()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- lifecycle -------------------------------------------------------------------------

    async def initialize(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Handshake (initialize + notifications/initialized); returns the InitializeResult."""
        seconds = self.timeout if timeout is None else timeout
        request_id = self._new_id()
        body = jsonrpc.request(
            request_id,
            "initialize",
            {
                "protocolVersion": LATEST,
                "capabilities": self._client_capabilities,
                "clientInfo": self._client_info,
            },
        )
        try:
            async with asyncio.timeout(seconds):
                try:
                    message, session_id = await self._post_request(
                        body, request_id, None, {**_POST_HEADERS, **self._configured_headers}
                    )
                except SessionExpired as exc:
                    # Without a session there is nothing to expire: a 404 here is a wrong URL.
                    raise TransportError(str(exc)) from None
                result = result_of(message)
                if not isinstance(result, dict):
                    raise TransportError(f"{self.url} answered initialize with {snippet(result)}")
                version = result.get("protocolVersion")
                if version not in PROTOCOL_VERSIONS:
                    if session_id is not None:
                        await self._delete_session(self._http_session(), session_id)
                    raise TransportError(
                        f"{self.url} speaks MCP protocol version {version!r}; "
                        f"fsm-hub speaks {', '.join(PROTOCOL_VERSIONS)}"
                    )
                self._adopt(result, version, session_id)
                # Some servers (brummer) answer this notification with a -32601 error body.
                initialized = jsonrpc.request(None, "notifications/initialized", None)
                try:
                    await self._post_notification(initialized, self._headers)
                except McpError:
                    pass
        except TimeoutError:
            raise TransportError(f"initialize to {self.url} timed out after {seconds:g}s") from None
        return result

    def _adopt(self, result: dict[str, Any], version: str, session_id: str | None) -> None:
        self.protocol_version = version
        self.server_info = _dict_or_empty(result.get("serverInfo"))
        self.capabilities = _dict_or_empty(result.get("capabilities"))
        instructions = result.get("instructions")
        self.instructions = instructions if isinstance(instructions, str) else None
        self._session_id = session_id
        session_headers = {**self._configured_headers, VERSION_HEADER: version}
        if session_id is not None:
            session_headers[SESSION_HEADER] = session_id
        self._session_headers = session_headers
        self._headers = {**_POST_HEADERS, **session_headers}
        self._generation += 1

    async def close(self) -> None:
        """Stop listening, DELETE the session (best effort) and release our HTTP session."""
        if self._closed:
            return
        self._closed = True
        http, self._http = self._http, None  # no new requests from here on
        listener, self._listener = self._listener, None
        try:
            if listener is not None:
                listener.cancel()
                await asyncio.wait([listener])
                if not listener.cancelled():
                    listener.exception()  # retrieved, so nobody logs "never retrieved"
            for task in list(self._background):
                task.cancel()
            if self._session_id is not None and http is not None:
                await self._delete_session(http, self._session_id)
        finally:
            if http is not None and self._owns_http:
                await http.close()

    async def _delete_session(self, http: aiohttp.ClientSession, session_id: str) -> None:
        """Tell the server to forget a session; any failure (405 included) is fine."""
        headers = {**self._session_headers, SESSION_HEADER: session_id}
        try:
            async with (
                asyncio.timeout(min(self.timeout, _DELETE_TIMEOUT)),
                http.delete(self.url, headers=headers, timeout=_NO_AIOHTTP_TIMEOUT) as response,
            ):
                await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass

    # -- requests --------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        on_message: OnMessage | None = None,
    ) -> Any:
        """Like `request`, but any JSON ``result`` comes back as it is (arrays, strings, null)."""
        return await self._call(method, params, timeout, on_message)

    async def notify(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> None:
        """Send a JSON-RPC notification (e.g. ``notifications/cancelled``)."""
        await self._call(method, params, timeout, None, notification=True)

    async def respond(self, message: Mapping[str, Any], *, timeout: float | None = None) -> None:
        """POST our answer (``result`` or ``error``) to a request the server sent us."""
        seconds = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(seconds):
                await self._post_notification(jsonrpc.encode_answer(dict(message)), self._headers)
        except TimeoutError:
            raise TransportError(f"answering {self.url} timed out after {seconds:g}s") from None

    @property
    def peer(self) -> str:
        return self.url

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _call(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        timeout: float | None,
        on_message: OnMessage | None,
        *,
        notification: bool = False,
    ) -> Any:
        """Send under one deadline, re-initializing once if the server lost our session."""
        request_id = None if notification else self._new_id()
        body = jsonrpc.request(request_id, method, params)
        seconds = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(seconds):
                generation = self._generation
                try:
                    return await self._send(body, request_id, on_message)
                except SessionExpired:
                    await self._reinitialize(generation)
                try:
                    return await self._send(body, request_id, on_message)
                except SessionExpired as exc:
                    raise SessionExpired(f"{exc} (again, right after re-initializing)") from None
        except TimeoutError:
            raise TransportError(f"{method} to {self.url} timed out after {seconds:g}s") from None
        except asyncio.CancelledError:
            if request_id is not None and not self._closed:
                self._cancel_upstream(request_id)
            raise

    def _cancel_upstream(self, request_id: int) -> None:
        """Tell the server a request we gave up on is cancelled (fire and forget)."""
        params = {"requestId": request_id, "reason": "cancelled by the client"}
        cancelled = self._call("notifications/cancelled", params, 2.0, None, notification=True)
        task = asyncio.ensure_future(cancelled)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # best effort: a server that is gone needs no cancellation

    async def _send(self, body: bytes, request_id: int | None, on_message: OnMessage | None) -> Any:
        """One POST with the current session's headers; the result, or None for a notification."""
        if request_id is None:
            await self._post_notification(body, self._headers)
            return None
        message, _ = await self._post_request(body, request_id, on_message, self._headers)
        return result_of(message)

    async def _reinitialize(self, generation: int) -> None:
        """Replace a lost session once, however many concurrent calls noticed the loss."""
        if self._generation != generation:
            return  # another call already re-initialized
        if self._reinit is None:
            self._reinit = asyncio.ensure_future(self.initialize())
            self._reinit.add_done_callback(self._reinit_done)
        await asyncio.shield(self._reinit)

    def _reinit_done(self, future: asyncio.Future[dict[str, Any]]) -> None:
        self._reinit = None
        if not future.cancelled():
            future.exception()  # each waiter got it through shield; don't log it again

    async def _post_request(
        self,
        body: bytes,
        request_id: int,
        on_message: OnMessage | None,
        headers: Mapping[str, str],
    ) -> tuple[dict[str, Any], str | None]:
        """The JSON-RPC response to ``request_id``, and the session id header that came with it."""
        http = self._http_session()
        try:
            response = await http.post(self.url, data=body, headers=headers, timeout=_NO_AIOHTTP_TIMEOUT)
            try:
                if response.status >= 300:
                    raise await self._status_error(response)
                if response.content_type == SSE:
                    answer = await self._read_answer(response, request_id, on_message)
                    self._finish_stream(response)
                else:
                    answer = await self._parse_body(
                        await response.read(), response.status, request_id, on_message
                    )
                    response.release()
            except BaseException:
                response.close()
                raise
            return answer, response.headers.get(SESSION_HEADER)
        except aiohttp.ClientError as exc:
            raise _transport_error(exc, self._describe(exc)) from None
        except OSError as exc:
            raise _transport_error(exc, f"{self.url}: {exc.strerror or exc}") from None

    def _finish_stream(self, response: aiohttp.ClientResponse) -> None:
        """Hand the connection back once the server ends the stream it answered on.

        The answer usually arrives just before the stream's final chunk; releasing a response
        that is not at its end would close the connection, and every call would pay a new one.
        """
        if response.content.at_eof():
            response.release()
            return
        task = asyncio.ensure_future(self._drain(response))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    async def _drain(self, response: aiohttp.ClientResponse) -> None:
        try:
            async with asyncio.timeout(min(self.timeout, _DRAIN_TIMEOUT)):
                while await response.content.readany():
                    pass
            response.release()
        except BaseException:
            response.close()
            raise

    async def _post_notification(self, body: bytes, headers: Mapping[str, str]) -> None:
        """POST a notification; whatever a 2xx answer says is ignored (202 is the norm)."""
        http = self._http_session()
        try:
            async with http.post(
                self.url, data=body, headers=headers, timeout=_NO_AIOHTTP_TIMEOUT
            ) as response:
                if response.status >= 300:
                    raise await self._status_error(response)
                await response.read()  # drained, so the connection is kept alive
        except aiohttp.ClientError as exc:
            raise _transport_error(exc, self._describe(exc)) from None
        except OSError as exc:
            raise _transport_error(exc, f"{self.url}: {exc.strerror or exc}") from None

    async def _status_error(self, response: aiohttp.ClientResponse) -> FsmHubError:
        """The error an HTTP status >= 300 stands for."""
        status = response.status
        body = await response.read()
        text = snippet(body)
        detail = f"{self.url} answered HTTP {status}" + (f": {text}" if text else "")
        # The Python SDK says 404 for a lost session; the TypeScript SDK says 400.
        if status == 404 or (status == 400 and b"session" in body.lower()):
            return SessionExpired(detail)
        if 400 <= status < 500:
            parsed = _loads_or_none(body)
            if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                return error_of(parsed["error"])
        return TransportError(detail)

    async def _parse_body(
        self, body: bytes, status: int, request_id: int, on_message: OnMessage | None
    ) -> dict[str, Any]:
        if not body:
            raise TransportError(
                f"{self.url} answered request {request_id} with an empty body (HTTP {status})"
            )
        try:
            parsed = jsonrpc.decode(body)
        except JsonRpcDecodeError as exc:
            raise TransportError(
                f"{self.url} answered with something that is not JSON: {snippet(body)}{_why(exc)}"
            ) from None
        if isinstance(parsed, dict):
            if answers(parsed, request_id) or ("error" in parsed and parsed.get("id") is None):
                return parsed
        elif isinstance(parsed, list):  # a batch (2025-03-26): the answer plus anything else
            answer = None
            for message in parsed:
                if isinstance(message, dict) and answers(message, request_id):
                    answer = message
                elif isinstance(message, dict):
                    await self._deliver(message, on_message)
            if answer is not None:
                return answer
        raise TransportError(
            f"{self.url} answered something other than a response to request {request_id}: {snippet(body)}"
        )

    async def _read_answer(
        self, response: aiohttp.ClientResponse, request_id: int, on_message: OnMessage | None
    ) -> dict[str, Any]:
        """Read a POST's SSE stream up to the answer, handing everything before it on.

        A server may end the stream before answering (SEP-1699 polling) once it has sent an
        event id: the answer is then fetched with a GET carrying ``Last-Event-ID``, after the
        ``retry`` it suggested, under the same call deadline.
        """
        decoder = SseDecoder()
        answer = await self._answer_on(response, decoder, request_id, on_message)
        for _ in range(_MAX_RESUMES):
            if answer is not None:
                return answer
            if decoder.last_id is None:
                break
            await asyncio.sleep(min(decoder.retry or _RESUME_DELAY_MS, _MAX_RESUME_DELAY_MS) / 1000)
            answer = await self._resume(decoder, request_id, on_message)
        if answer is not None:
            return answer
        raise TransportError(f"{self.url} ended the SSE stream before answering request {request_id}")

    async def _answer_on(
        self,
        response: aiohttp.ClientResponse,
        decoder: SseDecoder,
        request_id: int,
        on_message: OnMessage | None,
    ) -> dict[str, Any] | None:
        async for chunk in response.content.iter_any():
            answer = await self._scan(decoder.feed(chunk), request_id, on_message)
            if answer is not None:
                return answer
        return await self._scan(decoder.close(), request_id, on_message)

    async def _resume(
        self, decoder: SseDecoder, request_id: int, on_message: OnMessage | None
    ) -> dict[str, Any] | None:
        """One GET resuming a stream after ``decoder.last_id``; its answer, if it brings one."""
        assert decoder.last_id is not None
        headers = {"Accept": SSE, **self._session_headers, "Last-Event-ID": decoder.last_id}
        http = self._http_session()
        response = await http.get(self.url, headers=headers, timeout=_NO_AIOHTTP_TIMEOUT)
        try:
            if response.status >= 300:
                raise await self._status_error(response)
            if response.content_type != SSE:
                raise TransportError(f"{self.url} resumed a stream with {response.content_type}, not SSE")
            answer = await self._answer_on(response, decoder, request_id, on_message)
        except BaseException:
            response.close()
            raise
        if answer is not None:
            self._finish_stream(response)
        else:
            response.release()
        return answer

    async def _scan(
        self, events: list[bytes], request_id: int | None, on_message: OnMessage | None
    ) -> dict[str, Any] | None:
        """The answer to ``request_id`` among ``events``; everything before it is handed on."""
        for data in events:
            message = self._decode_event(data)
            if message is None:
                continue
            if request_id is not None and answers(message, request_id):
                return message
            await self._deliver(message, on_message)
        return None

    def _decode_event(self, data: bytes) -> dict[str, Any] | None:
        """The JSON-RPC message in one SSE event, or None for an empty (priming) event."""
        if not data.strip():
            return None
        try:
            message = jsonrpc.decode(data)
        except JsonRpcDecodeError as exc:
            raise TransportError(
                f"{self.url} sent an SSE event that is not JSON-RPC: {snippet(data)}{_why(exc)}"
            ) from None
        if not isinstance(message, dict):
            raise TransportError(f"{self.url} sent an SSE event that is not JSON-RPC: {snippet(data)}")
        return message

    async def _deliver(self, message: dict[str, Any], on_message: OnMessage | None) -> None:
        receiver = on_message or self.on_message
        if receiver is not None:
            await deliver(receiver, message)

    # -- standalone stream -----------------------------------------------------------------

    def listen(self, on_message: OnMessage | None = None) -> asyncio.Task[None]:
        """Start reading the standalone GET stream in a task this client owns.

        The task ends quietly on 405 (the server offers no such stream) or when the server
        ends the stream; it fails with TransportError otherwise. Cancel it to stop listening;
        ``close()`` does so. Calling again while it runs returns it; calling again after it ended
        reopens the stream, with ``Last-Event-ID`` if the server gave event ids.
        """
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(on_message), name=f"listen {self.url}")
        return self._listener

    async def _listen(self, on_message: OnMessage | None) -> None:
        headers = {"Accept": SSE, **self._session_headers}
        if self._stream_last_id is not None:  # reopened: what we missed, where the server keeps it
            headers["Last-Event-ID"] = self._stream_last_id
        http = self._http_session()
        try:
            async with (
                asyncio.timeout(self.timeout) as opening,
                http.get(self.url, headers=headers, timeout=_NO_AIOHTTP_TIMEOUT) as response,
            ):
                if response.status == 405:
                    self.listen_offered = False
                    return
                if response.status != 200:
                    text = snippet(await response.read())
                    raise TransportError(
                        f"{self.url} answered the GET stream with HTTP {response.status}: {text}"
                    )
                if response.content_type != SSE:
                    raise TransportError(
                        f"{self.url} answered the GET stream with {response.content_type}, not SSE"
                    )
                opening.reschedule(None)
                self._listening = True
                decoder = SseDecoder()
                try:
                    async for chunk in response.content.iter_any():
                        await self._scan(decoder.feed(chunk), None, on_message)
                finally:
                    if decoder.last_id is not None:
                        self._stream_last_id = decoder.last_id
        except TimeoutError:
            raise TransportError(
                f"opening the GET stream of {self.url} timed out after {self.timeout:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise _transport_error(exc, self._describe(exc)) from None
        except OSError as exc:
            raise _transport_error(exc, f"{self.url}: {exc.strerror or exc}") from None
        finally:
            self._listening = False

    # -- plumbing --------------------------------------------------------------------------

    def _http_session(self) -> aiohttp.ClientSession:
        http = self._http
        if http is None:
            if self._closed:
                raise TransportError(f"the client for {self.url} is closed")
            http = self._http = aiohttp.ClientSession()
        return http

    def _describe(self, exc: aiohttp.ClientError) -> str:
        """One line saying what went wrong on the wire, without aiohttp's internals."""
        if isinstance(exc, aiohttp.ClientConnectorError):
            error = exc.os_error
            # asyncio words refusals as "Connect call failed (...)"; the errno says it plainly.
            code = error.errno
            reason = os.strerror(code) if isinstance(code, int) and code > 0 else error.strerror or str(error)
            return f"cannot connect to {self.url}: {reason}"
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return f"{self.url} closed the connection without answering"
        if isinstance(exc, aiohttp.ClientPayloadError):
            return f"{self.url} cut the response off mid-stream"
        if isinstance(exc, aiohttp.ClientOSError) and exc.errno == errno.ECONNRESET:
            return f"{self.url} reset the connection"
        return f"{self.url}: {type(exc).__name__}: {' '.join(str(exc).split())}"


def _transport_error(exc: OSError | aiohttp.ClientError, detail: str) -> TransportError:
    """LocalResourceError when the hub ran out of something, TransportError otherwise."""
    error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    code = getattr(error, "errno", None)
    return LocalResourceError(detail) if code in LOCAL_ERRNOS else TransportError(detail)


def _dict_or_empty(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _loads_or_none(body: bytes) -> Any:
    try:
        return jsonrpc.decode(body)
    except JsonRpcDecodeError:
        return None


def _why(exc: JsonRpcDecodeError) -> str:
    """What was wrong, unless it was plain bad syntax (the snippet shows that)."""
    return "" if exc.syntax else f" ({exc.message})"
