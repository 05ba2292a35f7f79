"""Connections an HTTP endpoint can't be held open by: a cap, and a deadline for idle ones.

aiohttp's server has neither a limit on open connections nor a timeout for a request head
that never completes, so 1,100 half-sent heads would hold 1,100 fds for good. Each accepted
connection gets a `Guarded` protocol in front of aiohttp's: beyond `limit` open connections a
new one is answered 503 and closed at once; a connection that is not inside a request (still
sending its head, or idle between keep-alive requests) is closed after `head_timeout` /
`idle_timeout` seconds. The endpoint marks requests busy and idle; GET streams learn through
`lost` that their client went away (aiohttp does not cancel handlers on disconnect).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

_FULL: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 34\r\nRetry-After: 1\r\n\r\nfsm-hub: too many open connections"
)


class ConnectionGuard:
    """Counts an endpoint's open connections and hands out one `Guarded` per connection."""

    def __init__(self, limit: int, head_timeout: float, idle_timeout: float) -> None:
        self.limit = limit
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.open: dict[asyncio.BaseTransport, Guarded] = {}
        self.refused = 0
        """Connections answered 503 because the endpoint was full."""

    def __repr__(self) -> str:
        return f"<ConnectionGuard open={len(self.open)}/{self.limit} refused={self.refused}>"

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: Guarded(self, inner)

    def of(self, transport: asyncio.BaseTransport | None) -> Guarded | None:
        return self.open.get(transport) if transport is not None else None


class Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind a cap and an idle deadline."""

    def __init__(self, guard: ConnectionGuard, inner: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._make_inner = inner
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = 0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once the connection is gone."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if len(self._guard.open) >= self._guard.limit:
            self._guard.refused += 1
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_FULL)
            transport.close()
            return
        self._guard.open[transport] = self
        self._inner = self._make_inner()
        self._inner.connection_made(transport)
        self._arm(self._guard.head_timeout)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._transport is not None:
            self._guard.open.pop(self._transport, None)
        if not self.lost.done():
            self.lost.set_result(None)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    # -- marked by the endpoint ------------------------------------------------------------

    def busy(self) -> None:
        """A request is being handled: no deadline while it runs (a call may take minutes)."""
        self._busy += 1
        self._disarm()

    def idle(self) -> None:
        """A request ended; the connection may wait `idle_timeout` for the next one."""
        self._busy = max(0, self._busy - 1)
        if not self._busy:
            self._arm(self._guard.idle_timeout)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if not self._busy and self._transport is not None:
            self._transport.close()

    def __repr__(self) -> str:
        state = "lost" if self.lost.done() else ("busy" if self._busy else "waiting")
        return f"<Guarded {state}>"


def retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
