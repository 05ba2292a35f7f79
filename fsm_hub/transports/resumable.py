"""Resumable SSE streams (MCP 2025-11-25 "Resumability and Redelivery", SEP-1699).

A `ResumableStream` is one logical SSE stream of a session — its GET stream, or the stream a
POST's answer became — kept apart from the HTTP connection that happens to carry it. Every
event gets the id ``<key>-<n>``: the stream's key (``get`` for the GET stream, ``p<k>`` for the
session's k-th POST stream) and the event's number on that stream, so an id is unique within
the session and names the stream a ``Last-Event-ID`` resumes. Events stay in the stream's
bounded buffer after they are written: a write that "succeeds" into a socket that then drops is
not lost, the client names the last event it saw and gets the rest.

One connection at a time follows a stream: a new one (a client reconnecting, perhaps before the
server noticed the old connection die) takes it over, and the old one stops before its next
event. So a stream is never delivered twice at once, and nothing of another stream is replayed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Final

from fsm_hub.mcp import jsonrpc, sse

RETRY_MS: Final = 1000
"""The reconnection delay a priming event suggests."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a stream: its number there and its message (None: a priming event)."""

    seq: int
    message: Any

    def encode(self, key: str) -> bytes:
        event_id = f"id: {key}-{self.seq}\n".encode()
        if self.message is None:  # a priming event (SEP-1699): an id and a delay, no data
            return event_id + f"retry: {RETRY_MS}\ndata:\n\n".encode()
        return event_id + sse.encode_event(jsonrpc.encode_answer(self.message))


class ResumableStream:
    """The events of one SSE stream, kept (up to ``limit``, oldest dropped) for resumption."""

    def __init__(self, key: str, limit: int) -> None:
        self.key = key
        self.delivered = -1
        """The newest event written to a connection (where a follower with no cursor starts)."""
        self.finished = False
        """No event will follow (a POST stream's answer is in, or the call ended without one)."""
        self.finished_at: float | None = None
        """When it finished, on the endpoint's clock: a finished stream is kept a bounded time."""
        self._events: deque[Event] = deque(maxlen=limit)
        self._next = 0
        self._generation = 0
        self._follower: int | None = None
        self._wakeup = asyncio.Event()

    def __repr__(self) -> str:
        state = "finished" if self.finished else "open"
        return (
            f"<ResumableStream {self.key} {state} events={len(self._events)} next={self._next}"
            f" delivered={self.delivered} followed={self.followed}>"
        )

    def __len__(self) -> int:
        return len(self._events)

    @property
    def followed(self) -> bool:
        """A connection is following it right now."""
        return self._follower is not None

    def append(self, message: Any) -> None:
        """Add an event (None: a priming event); a finished stream takes no more."""
        if self.finished:
            raise RuntimeError(f"stream {self.key} is finished")
        self._events.append(Event(self._next, message))
        self._next += 1
        self._wake()

    def finish(self, now: float) -> None:
        self.finished = True
        self.finished_at = now
        self._wake()

    def holds(self, seq: int) -> bool:
        """``seq`` names an event this stream has issued (a cursor it can resume after)."""
        return 0 <= seq < self._next

    @property
    def complete(self) -> bool:
        """Finished, and its last event has been written to a connection."""
        return self.finished and self.delivered >= self._next - 1

    async def follow(
        self, after: int | None = None, lost: asyncio.Future[None] | None = None
    ) -> AsyncGenerator[Event, None]:
        """The events after ``after`` (default: after the last delivered), then live ones.

        Ends when the stream is finished and all is written, when another follower takes
        it over, or when ``lost`` (the connection's end) is done. An event counts as delivered
        once the caller asks for the next one, i.e. once its write returned.
        """
        self._generation += 1
        me = self._follower = self._generation
        self._wake()  # an earlier follower stops
        cursor = self.delivered if after is None else after
        try:
            while me == self._follower:
                pending = next((event for event in self._events if event.seq > cursor), None)
                if pending is not None:
                    yield pending
                    cursor = pending.seq
                    self.delivered = max(self.delivered, cursor)
                    continue
                if self.finished:
                    return
                wakeup = self._wakeup
                if lost is None:
                    await wakeup.wait()
                    continue
                waiter = asyncio.ensure_future(wakeup.wait())
                try:
                    await asyncio.wait((waiter, lost), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if lost.done():
                    return
        finally:
            if me == self._follower:
                self._follower = None

    def _wake(self) -> None:
        self._wakeup.set()
        self._wakeup = asyncio.Event()


def parse_event_id(event_id: str) -> tuple[str, int] | None:
    """``<key>-<n>`` as (key, n), or None for an id this module never issues."""
    key, dash, number = event_id.strip().rpartition("-")
    if not dash or not key.isalnum() or not number.isdigit() or len(number) > 18:
        return None
    return key, int(number)
