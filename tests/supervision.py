"""Helpers for tests that drive supervisors: virtual time, bounded waits, the recorded transitions."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from fsm_hub.core.events import EventType
from fsm_hub.store.sqlite import EventStore
from fsm_hub.supervision.supervisor import DEFAULT_TIMING, Timing

Transition = tuple[str, str, str]
"""(event, from, to) of one recorded transition."""


async def eventually(
    condition: Callable[[], bool], timeout: float = 10.0, what: str | Callable[[], str] = ""
) -> None:
    """Wait (real time, bounded) until `condition()` holds; for real network events only.

    `what` names the wait in the failure; a callable is asked only then, to show the state.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {said or condition}")
        await asyncio.sleep(0.005)


@dataclass
class _Sleeper:
    deadline: float
    seconds: float
    owner: str
    future: asyncio.Future[None]


@dataclass
class ManualClock:
    """The injected `sleep` of supervisors: virtual seconds that pass only when the test says so.

    `clock(d)` registers a sleep of `d` seconds for the calling task and returns a future that
    resolves once `advance` moves virtual time past its deadline. Every sleep asked for is kept
    in `sleeps` as (task name, seconds) — supervisors run as `supervise-<id>` — so a test can
    assert the exact timers a supervisor set. With a freezegun factory, `advance` also moves
    the frozen wall clock, so the log's `at` values follow virtual time.
    """

    frozen: Any = None
    now: float = 0.0
    sleeps: list[tuple[str, float]] = field(default_factory=list)
    _pending: list[_Sleeper] = field(default_factory=list)
    _cursors: dict[str | None, int] = field(default_factory=dict)

    def __call__(self, seconds: float) -> asyncio.Future[None]:
        task = asyncio.current_task()
        owner = task.get_name() if task is not None else ""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sleeper = _Sleeper(self.now + seconds, seconds, owner, future)
        self._pending.append(sleeper)
        future.add_done_callback(lambda _: self._pending.remove(sleeper))
        self.sleeps.append((owner, seconds))
        return future

    def sleeping(self, owner: str | None = None) -> list[float]:
        """The durations of the sleeps pending now (of `owner`'s task, if given)."""
        return [
            s.seconds
            for s in self._pending
            if not s.future.done() and (owner is None or s.owner == owner)
        ]

    def advance(self, seconds: float) -> None:
        """Move virtual time on; every sleep whose deadline is reached ends."""
        self.now += seconds
        if self.frozen is not None:
            self.frozen.tick(timedelta(seconds=seconds))
        for sleeper in list(self._pending):
            if sleeper.deadline <= self.now + 1e-9 and not sleeper.future.done():
                sleeper.future.set_result(None)

    def fail(self, owner: str, error: BaseException) -> None:
        """Make `owner`'s pending sleeps raise `error`: a broken timer, to crash a supervisor."""
        for sleeper in list(self._pending):
            if sleeper.owner == owner and not sleeper.future.done():
                sleeper.future.set_exception(error)

    async def next_sleep(self, owner: str | None = None, timeout: float = 10.0) -> float:
        """The duration of the next sleep asked for (by `owner`) since the last call; waits for it."""
        index = self._cursors.get(owner, 0)

        def later() -> list[int]:
            return [i for i in range(index, len(self.sleeps)) if owner is None or self.sleeps[i][0] == owner]

        await eventually(lambda: bool(later()), timeout, f"a sleep by {owner or 'anyone'}")
        found = later()[0]
        self._cursors[owner] = found + 1
        return self.sleeps[found][1]


async def active(clock: ManualClock, timing: Timing = DEFAULT_TIMING) -> None:
    """A connect: the handshake budget was set, then (connected recorded) the wait for a ping."""
    assert await clock.next_sleep() == timing.connect_timeout
    assert await clock.next_sleep() == timing.ping_interval


async def ping_round(clock: ManualClock, *, hangs: bool = False, timing: Timing = DEFAULT_TIMING) -> float:
    """From waiting for a ping: let the interval pass; the ping sets its own timer, which is let
    run out if the server hangs. Returns the next sleep: the next ping's wait, or a backoff."""
    clock.advance(timing.ping_interval)
    assert await clock.next_sleep() == timing.ping_timeout
    if hangs:
        clock.advance(timing.ping_timeout)
    return await clock.next_sleep()


async def transitions(store: EventStore, stream: str) -> list[Transition]:
    """The (event, from, to) of every transition recorded for `stream`, in order."""
    return [(d["event"], d["from"], d["to"]) for d in await transition_data(store, stream)]


async def transition_data(store: EventStore, stream: str) -> list[dict[str, Any]]:
    """The full payloads (reason, error, attempt, …) of `stream`'s transitions."""
    events = await store.read(stream=stream)
    return [e.data for e in events if e.type == EventType.TRANSITION]


def fsm_hub_tasks() -> list[asyncio.Task[Any]]:
    """Tasks running fsm-hub code, other than the log's writer: none may outlive a stop.

    (The in-process test servers' own handler tasks run test code, so they don't count.)
    """
    return [
        task
        for task in asyncio.all_tasks()
        if task is not asyncio.current_task()
        and task.get_name() != "fsm-hub-writer"
        and "/fsm_hub/" in getattr(task.get_coro(), "cr_code", eventually.__code__).co_filename
    ]


def client_sockets(ports: set[int]) -> int:
    """Open TCP sockets of this process whose remote port is one of `ports` (via /proc)."""
    inodes: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                columns = line.split()
                remote_port = int(columns[2].rsplit(":", 1)[1], 16)
                if columns[9] in inodes and remote_port in ports:
                    count += 1
    return count


class Committed:
    """Every event the store commits, seen synchronously: subscribed before appends resolve."""

    def __init__(self, store: EventStore) -> None:
        self.events: list[Any] = []
        store.subscribe(self.events.extend)

    def state(self, stream: str) -> str | None:
        """The state the last committed transition of `stream` led to."""
        for event in reversed(self.events):
            if event.stream == stream and event.type == EventType.TRANSITION:
                return str(event.data["to"])
        return None

    def last_event(self) -> str | None:
        """The `event` of the last committed transition, of any stream."""
        for event in reversed(self.events):
            if event.type == EventType.TRANSITION:
                return str(event.data["event"])
        return None
