"""An attached `serve --mcp`: relays its stdio client to the owning hub's HTTP endpoint.

It remembers just enough (the client's `initialize` and its current `instances_connect`) to
re-establish the session on a new owner — or on itself, after taking over — when the owner exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from fsm_hub.errors import TransportError
from fsm_hub.mcp import jsonrpc, sse
from fsm_hub.mcp.jsonrpc import needs_answer
from fsm_hub.mcp.protocol import JSON, POST_HEADERS, SESSION_HEADER, SSE, instance_url
from fsm_hub.serve.ownership import Owner
from fsm_hub.transports.stdio import StdioChannel

log = logging.getLogger(__name__)
GONE_STATUSES = frozenset({401, 404, 503})
"""What a live endpoint answers when it is not (or no longer) the owner our session lives on:
another token, a session it does not know, or an owner that is stopping."""


class OwnerGone(TransportError):
    """The owning hub stopped answering."""


class OwnerUnresponsive(TransportError):
    """The owning hub accepted a request but gave no answer within the call timeout."""


class Bridge:
    def __init__(
        self,
        channel: StdioChannel,
        owner: Owner,
        *,
        on_lost: Callable[[Owner], None] | None = None,
        call_timeout: float = 300.0,
        instance: str | None = None,
    ) -> None:
        self.channel = channel
        self.instance = instance
        """`serve --mcp --instance`: relay to the owner's per-instance endpoint of this one."""
        self.owner = owner
        self.call_timeout = call_timeout
        """Seconds a relayed request may take, answer included, before its client gets an error."""
        self.session_id: str | None = None
        self.initialize: dict[str, Any] | None = None
        self.connected_to: dict[str, Any] | None = None
        self._on_lost = on_lost
        """Called when the GET stream of a live session ends: the owner is probably gone, and
        an idle client must not wait for its next call to find out."""
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2),
            connector=aiohttp.TCPConnector(limit=0),
        )
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        self._initialized = asyncio.Event()
        """Clear while an initialize is on its way; set once it is answered (or failed)."""
        self._initialized.set()

    def _endpoint(self, owner: Owner) -> str:
        """The owner's `/mcp`, or its per-instance endpoint with `--instance`."""
        if self.instance is None:
            return owner.url
        return instance_url(owner.url, self.instance)

    def __repr__(self) -> str:
        session = self.session_id[:8] if self.session_id else None
        listening = self._listener is not None and not self._listener.done()
        return f"<Bridge owner={self.owner.pid} session={session} listening={listening}>"

    async def close(self, *, end_session: bool) -> None:
        # The session ends before its stream: the owner would otherwise see the stream drop
        # first and record the bridge as gone rather than the client as done.
        self._closing = True  # the DELETE ends our GET stream: that is not the owner being lost
        if end_session and self.session_id is not None:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with self._http.delete(
                    self._endpoint(self.owner),
                    headers=self._headers(),
                    timeout=aiohttp.ClientTimeout(total=2),
                ):
                    pass
        await self._stop_listening()
        await self._http.close()

    def _headers(self, owner: Owner | None = None, session_id: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {(owner or self.owner).token}", **POST_HEADERS}
        session_id = session_id if owner is not None else self.session_id
        if session_id is not None:
            headers[SESSION_HEADER] = session_id
        return headers

    def remember(self, message: Any) -> None:
        """Keep what re-establishing the session on another owner needs."""
        if not isinstance(message, dict):
            return
        method = message.get("method")
        if method == "initialize":
            self.initialize = message
        elif method == "tools/call":
            params = message.get("params") or {}
            if isinstance(params, dict) and params.get("name") == "instances_connect":
                self.connected_to = params
            elif isinstance(params, dict) and params.get("name") == "instances_disconnect":
                self.connected_to = None

    async def relay(self, line: bytes, message: Any) -> None:
        """POST one client message to the owner and write whatever it answers to stdout.

        Bounded by the call timeout: an owner that accepts the request and never answers
        (stopped, wedged) raises OwnerUnresponsive instead of holding the client forever.
        Nothing is written for a request the owner never answered, so the caller answers it.
        """
        initializing = isinstance(message, dict) and message.get("method") == "initialize"
        try:
            async with asyncio.timeout(self.call_timeout):
                if initializing:
                    self._initialized.clear()
                elif self.session_id is None:
                    # Sent right behind initialize (before its answer brought the session id):
                    # without the id the owner would refuse it, so it waits for the session.
                    await self._initialized.wait()
                try:
                    await self._post(line, message)
                finally:
                    if initializing:
                        self._initialized.set()
        except TimeoutError:
            raise OwnerUnresponsive(
                f"the owning hub (pid {self.owner.pid}) did not answer within {self.call_timeout:g}s"
            ) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise OwnerGone(f"owning hub unreachable: {exc}") from None

    async def _post(self, line: bytes, message: Any) -> None:
        url = self._endpoint(self.owner)
        async with self._http.post(url, data=line, headers=self._headers()) as response:
            if response.status in GONE_STATUSES and "Retry-After" not in response.headers:
                raise OwnerGone(f"the owning hub answered HTTP {response.status}")
            new_id = response.headers.get(SESSION_HEADER)
            if new_id and new_id != self.session_id:
                self.session_id = new_id
                self._listen()
            await self._forward(response, needs_answer(message))

    async def _forward(self, response: aiohttp.ClientResponse, answer: bool) -> None:
        if response.status == 202:
            return
        if response.content_type == SSE:
            async for data in sse.events(response.content):
                if data.strip():
                    await self.channel.send(data)
            return
        body = await response.read()
        if answer and body.strip():  # a notification gets no answer, not even an error
            if response.content_type != JSON:
                kind = response.content_type
                raise OwnerGone(f"the owning hub answered HTTP {response.status} with {kind}")
            await self.channel.send(body.strip())

    def _listen(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        self._listener = asyncio.create_task(self._notifications(), name="bridge-notifications")

    async def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener

    async def _notifications(self) -> None:
        owner = self.owner
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
            async with self._http.get(self._endpoint(owner), headers=self._headers()) as response:
                if response.status == 200:
                    async for data in sse.events(response.content):
                        if data.strip():
                            self.channel.write(data)
        # The owner ended the stream (it is stopping or gone) or refused it: not our doing,
        # since closing the bridge cancels this task first.
        if self._on_lost is not None and not self._closing:
            self._on_lost(owner)

    async def reattach(self, call: Callable[[dict[str, Any]], Awaitable[Any]]) -> None:
        """Re-establish this client's session through `call` (a new owner, or our own hub)."""
        if self.initialize is not None:
            await call(self.initialize)
            await call({"jsonrpc": "2.0", "method": "notifications/initialized"})
        if self.connected_to is not None:
            await call(
                {
                    "jsonrpc": "2.0",
                    "id": "fsm-hub-reattach",
                    "method": "tools/call",
                    "params": self.connected_to,
                }
            )

    async def replay_remote(self, owner: Owner) -> None:
        """Re-establish the session on `owner` (another process that took over, or the same
        one if it lost our session); nothing changes if that fails."""
        session_id: str | None = None

        async def call(message: dict[str, Any]) -> None:
            nonlocal session_id
            data = jsonrpc.encode(message)
            async with self._http.post(
                self._endpoint(owner), data=data, headers=self._headers(owner, session_id)
            ) as response:
                if response.status >= 400:
                    raise OwnerGone(f"{owner.url} answered HTTP {response.status}")
                session_id = response.headers.get(SESSION_HEADER) or session_id
                await response.read()

        await self._stop_listening()
        try:
            await self.reattach(call)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise OwnerGone(f"new owner unreachable: {exc}") from None
        self.owner, self.session_id = owner, session_id
        if session_id is not None:
            self._listen()
