"""The hub's clients of one stdio process: each gets its own session, emulated over the one pipe.

A stdio server is one process and one MCP session, and every client of the hub shares it. So
that a client still sees what it would see talking to the server alone, the hub keeps here, per
process (`StdioSessions`), what the protocol lets it separate:

- **Notifications** the server sends outside any call (no progressToken of a call in flight)
  reach the supervisor's receiver, as before, and every `SharedStdioSession` that is listening.
- **`resources/subscribe` / `resources/unsubscribe`** are counted per URI across the sessions.
  The first subscriber's request goes upstream and its outcome (result or error) is that
  client's answer; later subscribers of a URI already subscribed upstream get `{}` from the
  hub. The last unsubscribe, or the last subscribed session closing, sends
  `resources/unsubscribe` upstream. `notifications/resources/updated` reaches only the sessions
  subscribed to its URI.
- **`logging/setLevel`** is kept per session; the server is set to the most verbose level any
  open session asked for, re-sent when that changes (a session closing included). A session
  gets `notifications/message` only at or above its own level. A session that never set a level
  gets every log message that arrives, as it would from a server left at its default. When no
  session holds a level any more the server stays at the last one sent: MCP has no way to
  restore a server's default.
- Everything else (`list_changed` of tools, resources, prompts; a log message with a level the
  hub does not know; ...) reaches every listening session, except what only makes sense to the
  one that made a request (`OWN_REQUESTS_ONLY`): progress no call claims, cancellations.

What cannot be separated: a notification the server sends to its one session (a log line about
one client's request, say) reaches every session whose filter admits it; `initialize` is the
supervisor's, made once.

When the process restarts the supervisor makes a new `StdioClient`, so `StdioSessions.of` gives
a new, empty state: the sessions of the old process were closed when the instance left
`active` (their `ClientUpstream`s drop), just as an HTTP instance's sessions die with it, and
each client's next request opens a fresh session — its subscriptions and level are not replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar, Final

from fsm_hub.errors import McpError, TransportError
from fsm_hub.mcp.methods import OnMessage, deliver
from fsm_hub.mcp.stdio_upstream import StdioClient

log = logging.getLogger(__name__)

LEVELS: Final = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
"""MCP (RFC 5424) log levels, most verbose first."""
RANK: Final = {level: rank for rank, level in enumerate(LEVELS)}
OWN_REQUESTS_ONLY: Final = frozenset({"notifications/progress", "notifications/cancelled"})
"""About a request: one no call claims (a late progress, the cancelling of a server request the
transport answered) belongs to no client, and another client may use the same token or id."""
MAX_QUEUED: Final = 1000
"""Notifications a listening session may have waiting for its receiver; past that it misses them."""


class StdioSessions:
    """The shared state of one stdio process's client sessions: who listens, subscribes, logs.

    Found by its client (`of`), so it lives and dies with that process's `StdioClient`. Changes
    of the server's session state (subscribe, unsubscribe, setLevel) are made one at a time
    (`_changing`), so the counts always match what was sent upstream.
    """

    _by_client: ClassVar[weakref.WeakKeyDictionary[StdioClient, StdioSessions]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, client: StdioClient, *, max_queued: int = MAX_QUEUED) -> None:
        self._client = weakref.ref(client)  # weak: this state must not keep its process's client alive
        self.max_queued = max_queued
        self._listening: set[SharedStdioSession] = set()
        self._subscribers: dict[str, set[SharedStdioSession]] = {}
        """URI → the sessions subscribed to it; a URI is here iff it is subscribed upstream."""
        self._levels: dict[SharedStdioSession, str] = {}
        self._upstream_level: str | None = None
        """The level last set on the server (None: never set by the hub, or unknown)."""
        self._changing = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._untap: Callable[[], None] | None = None

    @property
    def client(self) -> StdioClient:
        client = self._client()
        if client is None:
            raise TransportError("the stdio client of these sessions is gone")
        return client

    @classmethod
    def of(cls, client: StdioClient) -> StdioSessions:
        """The one state of `client`'s process, made on first use."""
        sessions = cls._by_client.get(client)
        if sessions is None:
            sessions = cls._by_client[client] = cls(client)
        return sessions

    def __repr__(self) -> str:
        return (
            f"<StdioSessions of {self.client.name} listening={len(self._listening)} "
            f"subscribed={sorted(self._subscribers)} level={self._upstream_level}>"
        )

    def open(self, handshake: dict[str, Any]) -> SharedStdioSession:
        """A new client session; it receives notifications once it listens."""
        return SharedStdioSession(self, handshake)

    @property
    def subscribed(self) -> dict[str, int]:
        """URI → how many sessions hold it (what is subscribed upstream)."""
        return {uri: len(holders) for uri, holders in self._subscribers.items()}

    @property
    def upstream_level(self) -> str | None:
        return self._upstream_level

    def wanted_level(self) -> str | None:
        """The most verbose level an open session asked for."""
        return min(self._levels.values(), key=RANK.__getitem__, default=None)

    # -- fan-out ---------------------------------------------------------------------------

    def _listen(self, session: SharedStdioSession) -> None:
        self._listening.add(session)
        if self._untap is None:
            self._untap = self.client.tap(self._fan_out)

    def _unlisten(self, session: SharedStdioSession) -> None:
        self._listening.discard(session)
        if not self._listening and self._untap is not None:
            self._untap()
            self._untap = None

    def _fan_out(self, message: dict[str, Any]) -> None:
        """The client's tap: hand the message to each listening session it is for (never waits)."""
        for session in self._for(message):
            session.offer(message)

    def _for(self, message: dict[str, Any]) -> list[SharedStdioSession]:
        method = message.get("method")
        params = message.get("params")
        params = params if isinstance(params, dict) else {}
        if method in OWN_REQUESTS_ONLY:
            return []
        if method == "notifications/resources/updated":
            uri = params.get("uri")
            holders = self._subscribers.get(uri, set()) if isinstance(uri, str) else set()
            return [s for s in self._listening if s in holders]
        if method == "notifications/message":
            level = params.get("level")
            rank = RANK.get(level) if isinstance(level, str) else None
            if rank is not None:
                return [s for s in self._listening if RANK[self._levels.get(s, "debug")] <= rank]
        return list(self._listening)

    # -- per-session state -----------------------------------------------------------------

    async def subscribe(
        self, session: SharedStdioSession, params: Mapping[str, Any], timeout: float | None
    ) -> dict[str, Any]:
        uri = params.get("uri")
        if not isinstance(uri, str):
            return await self.client.request("resources/subscribe", params, timeout=timeout)  # its own error
        async with self._turn(timeout):
            holders = self._subscribers.get(uri)
            if holders is not None:
                holders.add(session)
                return {}
            try:
                result = await self.client.request("resources/subscribe", params, timeout=timeout)
            except McpError:
                raise  # the server refused: nothing is subscribed
            except BaseException:
                self._subscribers[uri] = set()  # it may have been: let the reconcile undo it
                self._reconcile_later()
                raise
            self._subscribers[uri] = {session} if not session.closed else set()
            if session.closed:
                self._reconcile_later()
            return result

    async def unsubscribe(
        self, session: SharedStdioSession, params: Mapping[str, Any], timeout: float | None
    ) -> dict[str, Any]:
        uri = params.get("uri")
        async with self._turn(timeout):
            holders = self._subscribers.get(uri) if isinstance(uri, str) else None
            if holders is None:
                # Not subscribed through the hub: the server answers as it would anyone.
                return await self.client.request("resources/unsubscribe", params, timeout=timeout)
            holders.discard(session)
            if holders:
                return {}  # others still hold it (or this session never did)
            del self._subscribers[uri]  # type: ignore[arg-type]
            return await self.client.request("resources/unsubscribe", params, timeout=timeout)

    async def set_level(
        self, session: SharedStdioSession, params: Mapping[str, Any], timeout: float | None
    ) -> dict[str, Any]:
        level = params.get("level")
        if not isinstance(level, str) or level not in RANK:
            # Not a level we can rank: the server answers (an invalid-params error, as a rule).
            result = await self.client.request("logging/setLevel", params, timeout=timeout)
            self._upstream_level = None  # it may have taken it: re-assert ours next time
            self._reconcile_later()
            return result
        async with self._turn(timeout):
            previous = self._levels.get(session)
            self._levels[session] = level
            wanted = self.wanted_level()
            if wanted == self._upstream_level:
                return {}
            try:
                result = await self.client.request(
                    "logging/setLevel", {**params, "level": wanted}, timeout=timeout
                )
            except BaseException as exc:
                if previous is None:
                    self._levels.pop(session, None)
                else:
                    self._levels[session] = previous
                if not isinstance(exc, McpError):
                    self._upstream_level = None  # unknown: the next change sends it again
                raise
            self._upstream_level = wanted
            return result

    def closed(self, session: SharedStdioSession) -> None:
        """A session ended: it holds nothing any more; tell the server what that changes."""
        self._unlisten(session)
        held = [uri for uri, holders in self._subscribers.items() if session in holders]
        for uri in held:
            self._subscribers[uri].discard(session)
        had_level = self._levels.pop(session, None) is not None
        if held or had_level:
            self._reconcile_later()

    def _reconcile_later(self) -> None:
        task = asyncio.ensure_future(self._reconcile())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reconcile(self) -> None:
        """Unsubscribe what no session holds; set the level the open sessions want."""
        async with self._changing:
            for uri in [uri for uri, holders in self._subscribers.items() if not holders]:
                del self._subscribers[uri]
                try:
                    await self.client.request("resources/unsubscribe", {"uri": uri})
                except Exception as exc:  # a process that is gone has nothing to unsubscribe
                    log.debug("unsubscribing %s from %s failed: %s", self.client.name, uri, exc)
            wanted = self.wanted_level()
            if wanted is not None and wanted != self._upstream_level:
                try:
                    await self.client.request("logging/setLevel", {"level": wanted})
                    self._upstream_level = wanted
                except Exception as exc:
                    log.debug("setting %s's log level failed: %s", self.client.name, exc)

    async def settled(self) -> None:
        """Wait for the upstream changes that closing sessions started (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    @contextlib.asynccontextmanager
    async def _turn(self, timeout: float | None) -> AsyncIterator[None]:
        """One change at a time; waiting for the turn counts against the request's timeout."""
        seconds = self.client.timeout if timeout is None else timeout
        async with asyncio.timeout(seconds):
            await self._changing.acquire()
        try:
            yield
        finally:
            self._changing.release()


class SharedStdioSession:
    """One downstream client's session with a stdio server that every client shares.

    Its requests go over the supervisor's client (the hub's JSON-RPC ids keep them apart);
    `initialize` returns the supervisor's handshake instead of re-initializing the process;
    subscriptions and log level are this session's own (`StdioSessions`); `close` leaves the
    process running.

    Delivery: the process's reader hands each notification meant for this session to a queue
    of at most `max_queued` messages (never waiting); the task `listen` returns passes them to
    the receiver in order. A receiver that is slow or stuck only fills its own queue: once it is
    full, further notifications for this session are dropped (counted in `dropped`, one warning
    per overflow), while the reader, the pings and the other sessions carry on. A receiver that
    raises is logged and keeps receiving.
    """

    session_id = None

    def __init__(self, shared: StdioSessions, handshake: dict[str, Any]) -> None:
        self._shared = shared
        self._client = shared.client
        self._handshake = handshake
        self._closed = asyncio.Event()
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        """Bounded by `offer` (at most `max_queued`); None, put by `close`, ends the delivery."""
        self._max_queued = shared.max_queued
        self._delivery: asyncio.Task[None] | None = None
        self._overflowing = False
        self.dropped = 0
        """Notifications this session missed because its receiver fell `max_queued` behind."""

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        queue = f"queued={self._queue.qsize()} dropped={self.dropped}"
        return f"<SharedStdioSession of {self._client!r} {queue}{state}>"

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def initialize(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._handshake

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        on_message: OnMessage | None = None,
    ) -> dict[str, Any]:
        if method == "resources/subscribe":
            return await self._shared.subscribe(self, params or {}, timeout)
        if method == "resources/unsubscribe":
            return await self._shared.unsubscribe(self, params or {}, timeout)
        if method == "logging/setLevel":
            return await self._shared.set_level(self, params or {}, timeout)
        return await self._client.request(method, params, timeout=timeout, on_message=on_message)

    async def list_tools(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        return await self._client.list_tools(timeout=timeout)

    async def notify(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> None:
        await self._client.notify(method, params, timeout=timeout)

    def listen(self, on_message: OnMessage | None = None) -> asyncio.Task[None]:
        """Pass the notifications meant for this session to `on_message` until it closes.

        The session receives from the moment this returns; cancelling the task stops it. Calling
        again while it runs returns it.
        """
        if on_message is None or self.closed:
            return asyncio.create_task(self._until_closed(), name="shared stdio session")
        if self._delivery is None or self._delivery.done():
            self._shared._listen(self)
            self._delivery = asyncio.create_task(
                self._deliver(on_message), name=f"notifications of {self._client.name}"
            )
            self._delivery.add_done_callback(lambda _: self._shared._unlisten(self))
        return self._delivery

    async def _until_closed(self) -> None:
        await self._closed.wait()

    def offer(self, message: dict[str, Any]) -> None:
        """Queue a notification for the receiver; never waits (the process's reader calls it)."""
        if self._queue.qsize() < self._max_queued:
            self._queue.put_nowait(message)
            self._overflowing = False
            return
        self.dropped += 1
        if not self._overflowing:
            self._overflowing = True
            log.warning(
                "fsm-hub: a client of %s is %d notifications behind; dropping until it catches up",
                self._client.name, self._max_queued,
            )  # fmt: skip

    async def _deliver(self, on_message: OnMessage) -> None:
        while (message := await self._queue.get()) is not None:
            await deliver(on_message, message)

    async def close(self) -> None:
        """This client is gone: it stops receiving, and gives up its subscriptions and level."""
        if self.closed:
            return
        self._closed.set()
        self._shared.closed(self)
        while not self._queue.empty():
            self._queue.get_nowait()  # not delivered: the client is gone
        self._queue.put_nowait(None)
