"""One supervisor against real MCP servers and misbehaving ones, on virtual time.

Every timer goes through a ManualClock, so a test sees the exact timers the supervisor set and
no test waits on a real one; real waits are only for real network events, and bounded. Each test
asserts the exact sequence of transitions the log holds.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from fsm_hub.core.events import EventType, format_time
from fsm_hub.core.view import fold
from fsm_hub.errors import InstanceUnavailable, LocalResourceError, TransportError
from fsm_hub.mcp.protocol import LATEST as PROTOCOL_VERSION
from fsm_hub.mcp.upstream import McpClient
from fsm_hub.store.recorder import recorded_machine
from fsm_hub.store.sqlite import EventStore
from fsm_hub.supervision.supervisor import (
    FOLD_LIMIT,
    LOCAL_BACKOFF,
    CheckNow,
    Connector,
    Rediscover,
    RefreshTools,
    Remove,
    Supervisor,
    Timing,
)
from tests.servers.faults import GARBAGE_TOOLS, PRELUDE, FakeMcp, refused_url
from tests.servers.flaky import FlakyMcp
from tests.servers.launch import SdkServerFactory, spawn_sdk_server, stop
from tests.servers.sdk_server import TOOLS
from tests.supervision import (
    Committed,
    ManualClock,
    Transition,
    active,
    eventually,
    fsm_hub_tasks,
    ping_round,
    transition_data,
    transitions,
)

ID = "7f3a"
SEED = 1234
TIMING = Timing()  # the defaults: 5 s pings, 2 s ping timeout, 3 misses, 5 s handshake, 8 attempts
SDK_TOOLS = TOOLS
FROZEN = "2026-11-25T03:02:11.402113Z"

FakeFactory = Callable[..., Awaitable[FakeMcp]]
FlakyFactory = Callable[..., Awaitable[FlakyMcp]]
Supervise = Callable[..., Awaitable[Supervisor]]

CONNECT: list[Transition] = [("connect", "discovered", "connecting"), ("connected", "connecting", "active")]
RETRY: list[Transition] = [("connect", "retrying", "connecting")]
FAILED_RETRYING: list[Transition] = [("connect_failed", "connecting", "retrying")]
FAILED_DEAD: list[Transition] = [("connect_failed", "connecting", "dead")]
LOST: list[Transition] = [("lost", "active", "retrying")]
RECONNECTED: list[Transition] = [("connect", "retrying", "connecting"), ("connected", "connecting", "active")]


@pytest.fixture
async def supervise(store: EventStore, clock: ManualClock) -> AsyncIterator[Supervise]:
    """``await supervise(url, timing=…, connector=…, on_change=…)``: a started supervisor on `store`."""
    started: list[Supervisor] = []

    async def make(
        url: str,
        *,
        timing: Timing = TIMING,
        connector: Connector = McpClient,
        on_change: Callable[[Supervisor], None] = lambda _: None,
    ) -> Supervisor:
        machine = await recorded_machine(store, ID, max_attempts=timing.retry_attempts)
        supervisor = Supervisor(
            ID, url, machine, connector=connector, timing=timing, sleep=clock,
            rng=random.Random(SEED), on_change=on_change,
        )
        supervisor.start()
        started.append(supervisor)
        return supervisor

    yield make
    for supervisor in started:
        await supervisor.stop()


@pytest.fixture
def committed(store: EventStore) -> Committed:
    return Committed(store)


async def settled(committed: Committed, state: str) -> None:
    """Wait until the instance's last committed transition led to `state`."""
    await eventually(lambda: committed.state(ID) == state, what=f"{ID} committed as {state}")


@pytest.fixture
def frozen() -> Iterator[Any]:
    """Wall-clock time frozen at FROZEN (the event loop's clock stays real)."""
    with freeze_time(FROZEN, real_asyncio=True) as factory:
        yield factory


def at(*advances: float) -> str:
    """The log's timestamp after the clock advanced by each of `advances` from FROZEN."""
    moment = datetime.fromisoformat(FROZEN).astimezone(UTC)
    return format_time(moment + sum((timedelta(seconds=a) for a in advances), timedelta()))


def expected_backoffs(attempts: range, timing: Timing = TIMING) -> list[tuple[float, float]]:
    """(delay, ceiling) the seeded generator gives for each connect attempt in `attempts`."""
    rng = random.Random(SEED)
    ceilings = [min(timing.backoff_cap, timing.backoff_base * 2 ** (n - 1)) for n in attempts]
    return [(rng.uniform(0.0, ceiling), ceiling) for ceiling in ceilings]


# -- connecting to real SDK servers ------------------------------------------------------------


@pytest.mark.parametrize(
    "flags", [{}, {"json": True}, {"stateless": True}, {"json": True, "stateless": True}],
    ids=["sse", "json", "stateless", "json-stateless"],
)
async def test_connects_to_an_sdk_server_and_caches_its_tools(
    sdk_server: SdkServerFactory, supervise: Supervise, clock: ManualClock, store: EventStore,
    flags: dict[str, bool],
) -> None:
    supervisor = await supervise(sdk_server(**flags))
    await active(clock)

    assert await transitions(store, ID) == CONNECT
    [connect, connected] = await transition_data(store, ID)
    assert connect["reason"] == "discovered"
    assert connected["reason"] == f"handshake ok (MCP {PROTOCOL_VERSION}, {len(SDK_TOOLS)} tools)"
    assert {tool["name"] for tool in supervisor.tools or []} == SDK_TOOLS

    assert await ping_round(clock) == TIMING.ping_interval  # healthy: no transition, wait again
    result = await supervisor.request("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}})
    assert result["structuredContent"] == {"result": 5}

    await supervisor.stop()
    assert await transitions(store, ID) == CONNECT  # stopping is not a transition
    assert supervisor.tools is None
    assert [seconds for _, seconds in clock.sleeps] == [5.0, 5.0, 2.0, 5.0]


async def test_a_call_that_adds_a_tool_refreshes_the_cached_list(
    sdk_server: SdkServerFactory, supervise: Supervise, clock: ManualClock, store: EventStore
) -> None:
    supervisor = await supervise(sdk_server(fresh=True))  # its tool list is about to change
    await active(clock)

    await supervisor.request("tools/call", {"name": "add_tool", "arguments": {"name": "late"}})

    await eventually(lambda: "late" in {t["name"] for t in supervisor.tools or []}, what="refreshed tools")
    assert await transitions(store, ID) == CONNECT


async def watched(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock
) -> tuple[FakeMcp, Supervisor, list[str]]:
    """An active supervisor of a fake with a GET stream, and the states it told listeners since."""
    fake = await fake_mcp(get_stream=True)
    changes: list[str] = []
    supervisor = await supervise(fake.url, on_change=lambda s: changes.append(s.state))
    await active(clock)
    changes.clear()
    return fake, supervisor, changes


async def test_list_changed_on_the_get_stream_refreshes_the_cached_list(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock, store: EventStore
) -> None:
    fake, supervisor, changes = await watched(fake_mcp, supervise, clock)

    fake.tool_pages = (("echo", "later"),)
    fake.push({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})

    await eventually(lambda: [t["name"] for t in supervisor.tools or []] == ["echo", "later"])
    assert changes == ["active"]  # sessions are told; nothing is recorded
    assert len(fake.of_method("GET")) == 1
    assert await transitions(store, ID) == CONNECT


# -- losing an active instance -----------------------------------------------------------------


async def test_three_missed_pings_make_it_lost_then_it_reconnects(
    flaky_mcp: FlakyFactory, supervise: Supervise, clock: ManualClock, store: EventStore, frozen: Any
) -> None:
    clock.frozen = frozen
    flaky = await flaky_mcp()
    await supervise(flaky.url)
    await active(clock)

    flaky.pause()  # the process lives, its port accepts, nothing answers
    for _ in range(2):
        assert await ping_round(clock, hangs=True) == TIMING.ping_interval
    delay = await ping_round(clock, hangs=True)  # lost: the first reconnect waits a backoff
    [(expected, ceiling)] = expected_backoffs(range(1, 2))
    assert delay == expected and 0 <= delay <= ceiling == 0.5

    flaky.resume()
    clock.advance(delay)
    await active(clock)

    assert await transitions(store, ID) == CONNECT + LOST + RECONNECTED
    records = await transition_data(store, ID)
    assert [(r["reason"], r["error"]) for r in records[2:4]] == [
        ("3 pings missed", "ping timed out after 2s"),
        (f"retry 1 after {delay:.3f}s backoff", None),
    ]
    events = [e for e in await store.read(stream=ID) if e.type == EventType.TRANSITION]
    assert [e.at for e in events] == [at(), at(), at(21), at(21, delay), at(21, delay)]
    assert fold(await store.read()).instances[ID].state == "active"


async def test_http_500_while_active_is_lost_and_then_dead(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock, store: EventStore,
    committed: Committed, frozen: Any,
) -> None:
    clock.frozen = frozen
    timing = Timing(retry_attempts=2)
    fake = await fake_mcp()
    await supervise(fake.url, timing=timing)
    await active(clock)

    fake.status = 500  # every request after initialize now fails at once
    for _ in range(2):
        assert await ping_round(clock, timing=timing) == timing.ping_interval
    backoffs = [await ping_round(clock, timing=timing)]  # lost
    clock.advance(backoffs[0])
    assert await clock.next_sleep() == timing.connect_timeout  # retry 1 fails
    backoffs.append(await clock.next_sleep())
    clock.advance(backoffs[1])
    assert await clock.next_sleep() == timing.connect_timeout  # retry 2 fails: the budget is spent
    await settled(committed, "dead")

    assert await transitions(store, ID) == CONNECT + LOST + RETRY + FAILED_RETRYING + RETRY + FAILED_DEAD
    records = await transition_data(store, ID)
    error = f"{fake.url} answered HTTP 500: Internal Server Error: it broke"
    assert [(r["reason"], r["error"], r["attempt"]) for r in records[2:]] == [
        ("3 pings missed", error, 0),
        (f"retry 1 after {backoffs[0]:.3f}s backoff", None, 1),
        ("handshake failed", error, 1),
        (f"retry 2 after {backoffs[1]:.3f}s backoff", None, 2),
        ("handshake failed", error, 2),
    ]
    assert backoffs == [d for d, _ in expected_backoffs(range(1, 3))]
    assert [r.at for r in (await store.read(stream=ID))[-1:]] == [at(15, *backoffs)]


async def test_a_session_the_server_forgot_is_replaced_without_a_transition(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock, store: EventStore
) -> None:
    fake = await fake_mcp(get_stream=True)
    supervisor = await supervise(fake.url)
    await active(clock)
    await eventually(lambda: len(fake.of_method("GET")) == 1, what="the GET stream")

    fake.live_sessions.clear()  # the next request gets 404: the session is gone
    fake.tool_pages = (("echo", "after-restart"),)
    assert await ping_round(clock) == TIMING.connect_timeout  # re-reading the tools, within budget
    assert await clock.next_sleep() == TIMING.ping_interval

    assert await transitions(store, ID) == CONNECT
    assert supervisor.state == "active"
    assert len(fake.posted("initialize")) == 2  # the client re-initialized once
    # A new session: its GET stream is reopened and the tool list read again.
    await eventually(lambda: len(fake.of_method("GET")) == 2, what="the GET stream reopened")
    assert [t["name"] for t in supervisor.tools or []] == ["echo", "after-restart"]


async def test_a_failed_call_pings_at_once(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock, store: EventStore
) -> None:
    fake = await fake_mcp()
    supervisor = await supervise(fake.url)
    await active(clock)

    fake.status = 502
    with pytest.raises(TransportError, match="HTTP 502"):
        await supervisor.request("tools/call", {"name": "echo", "arguments": {}})

    await eventually(lambda: len(clock.sleeps) == 4)
    assert [seconds for _, seconds in clock.sleeps] == [5.0, 5.0, 2.0, 5.0]  # pinged without waiting
    assert len(fake.posted("ping")) == 1
    assert await transitions(store, ID) == CONNECT  # one miss is not lost


# -- connecting to servers that fail ----------------------------------------------------------


async def test_backoff_has_full_jitter_and_the_budget_ends_in_dead(
    supervise: Supervise, clock: ManualClock, store: EventStore, committed: Committed, frozen: Any
) -> None:
    clock.frozen = frozen
    url = refused_url()
    await supervise(url)

    delays = []
    for _ in range(TIMING.retry_attempts - 1):
        assert await clock.next_sleep() == TIMING.connect_timeout
        delays.append(await clock.next_sleep())
        clock.advance(delays[-1])
    assert await clock.next_sleep() == TIMING.connect_timeout
    await settled(committed, "dead")

    expected = expected_backoffs(range(2, TIMING.retry_attempts + 1))
    assert delays == [delay for delay, _ in expected]
    assert [ceiling for _, ceiling in expected] == [1, 2, 4, 8, 16, 30, 30]
    assert all(0 <= delay <= ceiling for delay, ceiling in expected)

    assert await transitions(store, ID) == (
        [("connect", "discovered", "connecting")]
        + (FAILED_RETRYING + RETRY) * (TIMING.retry_attempts - 1)
        + FAILED_DEAD
    )
    records = await transition_data(store, ID)
    connects = [r for r in records if r["event"] == "connect"]
    assert [r["reason"] for r in connects] == ["discovered"] + [
        f"retry {n} after {delay:.3f}s backoff" for n, delay in zip(range(2, 9), delays, strict=True)
    ]
    assert [r["attempt"] for r in connects] == list(range(1, 9))
    refused = f"cannot connect to {url}: Connection refused"
    assert {(r["reason"], r["error"]) for r in records if r["event"] == "connect_failed"} == {
        ("handshake failed", refused)
    }
    # Each attempt is recorded at the virtual moment its backoff ended.
    events = [e for e in await store.read(stream=ID) if e.data["event"] == "connect"]
    assert [e.at for e in events] == [at(*delays[:n]) for n in range(len(delays) + 1)]
    view = fold(await store.read()).instances[ID]
    assert (view.state, view.retry_count, view.last_error) == ("dead", 8, refused)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("refused", "cannot connect to {url}: Connection refused"),
        ("hang", "handshake timed out after 5s"),
        ("http-500", "{url} answered HTTP 500: Internal Server Error: it broke"),
        ("garbage", "{url} answered with something that is not JSON: <html><body>502 Bad Gateway</body></html>"),  # noqa: E501
        ("sse-cut", "{url} cut the response off mid-stream"),
    ],
)
async def test_a_server_that_fails_the_handshake_is_retried_then_dead(
    fault: str, error: str, fake_mcp: FakeFactory, hang_url: str,
    supervise: Supervise, clock: ManualClock, store: EventStore, committed: Committed,
) -> None:
    if fault == "refused":
        url = refused_url()
    elif fault == "hang":
        url = hang_url
    elif fault == "http-500":
        url = (await fake_mcp(status=500)).url
    elif fault == "garbage":
        url = (await fake_mcp(garbage=True)).url
    else:
        url = (await fake_mcp(sse=True, prelude=PRELUDE[3:4], cut="abort")).url
    timing = Timing(retry_attempts=2)
    started = time.monotonic()
    await supervise(url, timing=timing)

    assert await clock.next_sleep() == timing.connect_timeout
    if fault == "hang":
        clock.advance(timing.connect_timeout)  # the handshake budget ends on the virtual clock
    delay = await clock.next_sleep()
    clock.advance(delay)
    assert await clock.next_sleep() == timing.connect_timeout
    if fault == "hang":
        clock.advance(timing.connect_timeout)
    await settled(committed, "dead")

    assert await transitions(store, ID) == [("connect", "discovered", "connecting")] + (
        FAILED_RETRYING + RETRY + FAILED_DEAD
    )
    records = await transition_data(store, ID)
    assert [r["error"] for r in records if r["event"] == "connect_failed"] == [error.format(url=url)] * 2
    assert time.monotonic() - started < 2  # no real timer was waited on


async def test_the_default_timers_are_real_and_cut_a_hung_handshake_short(
    hang_url: str, store: EventStore, committed: Committed
) -> None:
    timing = Timing(connect_timeout=0.05, backoff_base=0.01, retry_attempts=2)
    machine = await recorded_machine(store, ID, max_attempts=timing.retry_attempts)
    supervisor = Supervisor(ID, hang_url, machine, connector=McpClient, timing=timing)  # real timers
    started = time.monotonic()
    supervisor.start()
    try:
        await settled(committed, "dead")
        [task] = [t for t in asyncio.all_tasks() if t.get_name() == f"supervise-{ID}"]
        assert task.cancelling() == 0  # its own timeouts left no cancellation counted
    finally:
        await supervisor.stop()
    assert time.monotonic() - started < 2
    records = await transition_data(store, ID)
    assert [r["error"] for r in records if r["event"] == "connect_failed"] == [
        "handshake timed out after 0.05s"
    ] * 2


# -- discovery's commands ---------------------------------------------------------------------


async def test_remove_makes_it_dead_and_rediscover_brings_it_back(
    sdk_server: SdkServerFactory, supervise: Supervise, clock: ManualClock, store: EventStore,
    committed: Committed,
) -> None:
    url = sdk_server()
    supervisor = await supervise(url)
    await active(clock)

    supervisor.send(Remove("process 4242 is gone"))
    await settled(committed, "dead")  # committed first; the machine moves and lets go after
    await eventually(lambda: supervisor.state == "dead" and supervisor.tools is None, what="disconnected")
    with pytest.raises(InstanceUnavailable, match="is dead; last error: process 4242 is gone"):
        await supervisor.request("tools/list")
    supervisor.send(CheckNow())  # stale commands do not wake the dead
    supervisor.send(RefreshTools())

    supervisor.send(Rediscover(url, "re-announced: pid 4242 → 4243"))
    await active(clock)

    assert await transitions(store, ID) == [
        *CONNECT,
        ("remove", "active", "dead"),
        ("rediscover", "dead", "discovered"),
        *CONNECT,
    ]
    records = await transition_data(store, ID)
    assert [(r["reason"], r["error"]) for r in records[2:4]] == [
        ("process 4242 is gone", "process 4242 is gone"),
        ("re-announced: pid 4242 → 4243", None),
    ]


@pytest.mark.e2e  # spawns a subprocess
async def test_rediscover_follows_a_restart_on_a_new_port(
    supervise: Supervise, clock: ManualClock, store: EventStore, tmp_path: Path
) -> None:
    old, old_url = spawn_sdk_server(tmp_path / "old.log")
    try:
        supervisor = await supervise(old_url)
        await active(clock)
        os.kill(old.pid, signal.SIGKILL)
        old.wait()
        new, new_url = spawn_sdk_server(tmp_path / "new.log")
    finally:
        stop([old])
    try:
        supervisor.send(Rediscover(new_url, "re-announced: port 1 → 2"))
        await active(clock)
        assert supervisor.url == new_url
        assert {t["name"] for t in supervisor.tools or []} == SDK_TOOLS
        result = await supervisor.request("tools/call", {"name": "echo", "arguments": {"text": "back"}})
        assert result["structuredContent"] == {"result": "back"}
    finally:
        await supervisor.stop()
        stop([new])
    assert await transitions(store, ID) == [*CONNECT, ("rediscover", "active", "discovered"), *CONNECT]


async def test_stale_commands_do_not_cut_a_backoff_short(
    supervise: Supervise, clock: ManualClock, store: EventStore
) -> None:
    supervisor = await supervise(refused_url())
    assert await clock.next_sleep() == TIMING.connect_timeout
    delay = await clock.next_sleep()

    supervisor.send(CheckNow())  # e.g. from a call that failed just before the instance was lost
    supervisor.send(RefreshTools())
    await asyncio.sleep(0.02)

    assert clock.sleeping() == [delay]  # the same backoff, not a new draw
    assert len(clock.sleeps) == 2
    assert await transitions(store, ID) == [("connect", "discovered", "connecting"), *FAILED_RETRYING]


# -- flapping --------------------------------------------------------------------------------


async def test_a_flapping_server_gives_the_exact_alternating_sequence(
    flaky_mcp: FlakyFactory, supervise: Supervise, clock: ManualClock, store: EventStore
) -> None:
    timing = Timing(ping_misses=2, retry_attempts=3)
    flaky = await flaky_mcp()
    await supervise(flaky.url, timing=timing)
    await active(clock, timing)

    for _ in range(2):  # down long enough to be lost and to fail one reconnect, then up again
        await flaky.down()
        assert await ping_round(clock, timing=timing) == timing.ping_interval
        clock.advance(await ping_round(clock, timing=timing))  # lost; after the backoff, refused
        assert await clock.next_sleep() == timing.connect_timeout
        delay = await clock.next_sleep()
        await flaky.up()
        clock.advance(delay)
        await active(clock, timing)

    flap = LOST + RETRY + FAILED_RETRYING + RECONNECTED
    assert await transitions(store, ID) == CONNECT + flap + flap
    records = await transition_data(store, ID)
    assert [r["attempt"] for r in records[2:7]] == [0, 1, 1, 2, 0]
    assert records[2]["reason"] == "2 pings missed"
    assert all(flaky.url in r["error"] for r in records if r["event"] in ("lost", "connect_failed"))


# -- the order of recording and acting, and stopping -----------------------------------------


class Watched:
    """Wraps McpClient: notes what the log had committed when the supervisor made or closed one."""

    def __init__(self, committed: Committed) -> None:
        self.last = committed.last_event
        self.seen: list[tuple[str, str | None]] = []

    def __call__(self, url: str) -> McpClient:
        self.seen.append(("made", self.last()))
        client = McpClient(url)
        close = client.close

        async def closing() -> None:
            self.seen.append(("closed", self.last()))
            await close()

        client.close = closing  # type: ignore[method-assign]
        return client


async def test_each_transition_is_committed_before_the_supervisor_acts(
    flaky_mcp: FlakyFactory, supervise: Supervise, clock: ManualClock, committed: Committed
) -> None:
    timing = Timing(ping_misses=1, retry_attempts=2)
    watched = Watched(committed)
    flaky = await flaky_mcp()
    await supervise(flaky.url, timing=timing, connector=watched)
    await active(clock, timing)
    await flaky.down()
    clock.advance(await ping_round(clock, timing=timing))  # lost, then a refused connect
    await eventually(lambda: len(watched.seen) == 4)

    assert watched.seen == [
        ("made", "connect"),
        ("closed", "lost"),
        ("made", "connect"),
        ("closed", "connect_failed"),
    ]


async def test_stop_closes_the_session_and_leaves_no_task(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock, store: EventStore
) -> None:
    fake = await fake_mcp(get_stream=True)
    supervisor = await supervise(fake.url)
    await active(clock)
    await eventually(lambda: len(fake.of_method("GET")) == 1, what="the GET stream")
    before = len(await store.read())
    assert len(fake.live_sessions) == 1
    assert {t.get_name() for t in fsm_hub_tasks()} >= {f"supervise-{ID}", f"listen {fake.url}"}

    await supervisor.stop()

    assert fake.live_sessions == {}  # DELETE was sent
    assert len(await store.read()) == before
    assert clock.sleeping() == []
    await eventually(lambda: fsm_hub_tasks() == [], 2, "no task left")



# -- storms: list changes are coalesced -----------------------------------------------------

LOOP = f"supervise-{ID}"
REFRESH = f"refresh-{ID}"


async def storming(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock
) -> tuple[FakeMcp, Supervisor]:
    """An active supervisor of an instance announcing list changes in a tight loop, already
    refreshed once and pausing before the next refresh (the storm went on during the first)."""
    fake = await fake_mcp(get_stream=True, storm=True)
    supervisor = await supervise(fake.url)
    await active(clock)
    await eventually(
        lambda: fake.stormed > 2000 and clock.sleeping(REFRESH) == [TIMING.refresh_interval],
        what=lambda: f"a storm ({fake.stormed} sent) and a pause ({clock.sleeping(REFRESH)})",
    )
    return fake, supervisor


async def test_a_storm_costs_one_refresh_per_interval(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock, store: EventStore
) -> None:
    fake, supervisor = await storming(fake_mcp, supervise, clock)
    assert len(fake.posted("tools/list")) == 2  # the handshake's, then one refresh for thousands
    # Past FOLD_LIMIT folded changes the GET stream is not read until the next round starts.
    await eventually(lambda: supervisor._folded == FOLD_LIMIT + 1, what=lambda: str(supervisor._folded))
    await asyncio.sleep(0.05)
    assert supervisor._folded == FOLD_LIMIT + 1 and supervisor._next_round is not None

    for expected in (3, 4, 5):
        clock.advance(TIMING.refresh_interval)
        await eventually(lambda n=expected: len(fake.posted("tools/list")) == n)
        await eventually(lambda: clock.sleeping(REFRESH) == [TIMING.refresh_interval])
        assert len(fake.posted("tools/list")) == expected
    assert clock.sleeping(LOOP) == [TIMING.ping_interval]  # the ping schedule never moved
    assert await transitions(store, ID) == CONNECT
    assert supervisor._inbox == deque()  # nothing queued behind the storm


async def test_pings_keep_their_schedule_and_a_lost_instance_is_lost_during_a_storm(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock, store: EventStore
) -> None:
    fake, supervisor = await storming(fake_mcp, supervise, clock)
    assert await clock.next_sleep(LOOP) == TIMING.connect_timeout  # seen by active() already
    assert await clock.next_sleep(LOOP) == TIMING.ping_interval
    for _ in range(2):  # healthy pings while it storms
        clock.advance(TIMING.ping_interval)
        assert await clock.next_sleep(LOOP) == TIMING.ping_timeout
        assert await clock.next_sleep(LOOP) == TIMING.ping_interval
    assert len(fake.posted("ping")) == 2

    fake.status = 500  # it still storms on its GET stream, but answers nothing else
    for _ in range(TIMING.ping_misses):
        clock.advance(TIMING.ping_interval)
        assert await clock.next_sleep(LOOP) == TIMING.ping_timeout  # answered 500 at once: a miss
        await clock.next_sleep(LOOP)  # the next ping's wait, or (the last miss) the backoff
    await eventually(lambda: supervisor.state == "retrying", what=lambda: supervisor.state)
    assert await transitions(store, ID) == [*CONNECT, *LOST]
    assert clock.sleeping(REFRESH) == []  # the pending refresh went with the session


async def test_remove_during_a_storm_is_taken_at_once(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock, store: EventStore,
    committed: Committed,
) -> None:
    fake, supervisor = await storming(fake_mcp, supervise, clock)
    fake.tool_pages = (("slow",),)

    supervisor.send(Remove("instance file removed"))  # no time passes: nothing waits for the refresh
    await settled(committed, "dead")
    await eventually(lambda: supervisor.tools is None and clock.sleeping(REFRESH) == [])
    assert await transitions(store, ID) == [*CONNECT, ("remove", "active", "dead")]
    assert {t.get_name() for t in fsm_hub_tasks()} == {LOOP}


async def test_changes_before_a_refresh_starts_are_all_in_it(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock, store: EventStore
) -> None:
    fake, supervisor, changes = await watched(fake_mcp, supervise, clock)

    for _ in range(500):  # all before the refresh asks: its answer covers every one of them
        supervisor.send(RefreshTools())
    await eventually(lambda: supervisor._refresh is None, what="the refresh task ended")
    assert len(fake.posted("tools/list")) == 2 and changes == ["active"]
    assert clock.sleeping(REFRESH) == []  # nothing came during it: no pause, nothing pending

    supervisor.send(RefreshTools())  # quiet since: the next change is refreshed at once
    await eventually(lambda: len(fake.posted("tools/list")) == 3 and supervisor._refresh is None)
    assert changes == ["active", "active"]
    assert await transitions(store, ID) == CONNECT


async def test_resource_and_prompt_changes_tell_the_sessions_without_refetching_tools(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock
) -> None:
    fake, supervisor, changes = await watched(fake_mcp, supervise, clock)
    tools = supervisor.tools

    fake.push({"jsonrpc": "2.0", "method": "notifications/resources/list_changed"})
    await eventually(lambda: changes == ["active"])
    assert len(fake.posted("tools/list")) == 1 and supervisor.tools is tools


async def test_failed_calls_fold_into_one_ping(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock
) -> None:
    fake = await fake_mcp()
    supervisor = await supervise(fake.url)
    await active(clock)
    for _ in range(100):
        supervisor.send(CheckNow())
    await eventually(lambda: clock.sleeping(LOOP) == [TIMING.ping_interval] and len(fake.posted("ping")) == 1)
    await asyncio.sleep(0.05)
    assert len(fake.posted("ping")) == 1


async def test_unusable_tool_entries_are_dropped_and_said_once(
    fake_mcp: FakeFactory, supervise: Supervise, clock: ManualClock, store: EventStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = await fake_mcp(get_stream=True, tool_entries=GARBAGE_TOOLS)
    supervisor = await supervise(fake.url)
    await active(clock)
    assert supervisor.tools == [{"name": "echo", "inputSchema": {"type": "object"}}]
    [_, connected] = await transition_data(store, ID)
    assert connected["reason"] == f"handshake ok (MCP {PROTOCOL_VERSION}, 1 tools)"

    fake.push({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
    await eventually(lambda: len(fake.posted("tools/list")) == 2 and supervisor._refresh is None)
    warnings = [r.getMessage() for r in caplog.records if "invalid tool" in r.getMessage()]
    assert warnings == [
        f"instance {ID} listed 6 invalid tool entries (entry 0: not an object but a string; "
        "entry 1: no name; entry 2: a name that is a number, not a string); left out"
    ]


# -- the hub's own resources running out -------------------------------------------------------


class StarvedClient(McpClient):
    """A real client whose pings fail as they do when the hub has no fd left, while `starved`."""

    starved = False

    async def ping(self, timeout: float | None = None) -> None:
        if StarvedClient.starved:
            raise LocalResourceError(f"cannot connect to {self.url}: Too many open files")
        await super().ping(timeout)


async def test_pings_failing_for_lack_of_our_own_fds_record_nothing(
    flaky_mcp: FlakyFactory, supervise: Supervise, clock: ManualClock, store: EventStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = await flaky_mcp()
    await supervise(flaky.url, connector=StarvedClient)
    await active(clock)

    StarvedClient.starved = True
    try:
        clock.advance(TIMING.ping_interval)
        for round_ in range(10):  # far more than ping_misses: none counts as a miss
            assert await clock.next_sleep() == TIMING.ping_timeout
            assert await clock.next_sleep() == LOCAL_BACKOFF  # retried soon, not at the interval
            assert await transitions(store, ID) == CONNECT
            if round_ < 9:
                clock.advance(LOCAL_BACKOFF)
    finally:
        StarvedClient.starved = False
    clock.advance(LOCAL_BACKOFF)
    assert await clock.next_sleep() == TIMING.ping_timeout
    assert await clock.next_sleep() == TIMING.ping_interval  # answered: back to the usual rhythm
    assert await transitions(store, ID) == CONNECT
    warnings = [r.getMessage() for r in caplog.records if "out of resources" in r.getMessage()]
    assert len(warnings) == 1 and "Too many open files" in warnings[0], warnings

    flaky.pause()  # once resources are back, a real failure is evidence again
    for _ in range(2):
        assert await ping_round(clock, hangs=True) == TIMING.ping_interval
    await ping_round(clock, hangs=True)
    assert await transitions(store, ID) == CONNECT + LOST


async def test_a_connect_failing_for_lack_of_our_own_fds_is_retried_without_a_transition(
    flaky_mcp: FlakyFactory, supervise: Supervise, clock: ManualClock, store: EventStore,
) -> None:
    flaky = await flaky_mcp()
    starved = [3]

    def connector(url: str) -> McpClient:
        client = McpClient(url)
        if starved[0]:
            starved[0] -= 1

            async def initialize(*, timeout: float | None = None) -> dict[str, Any]:
                raise LocalResourceError(f"cannot connect to {url}: Too many open files")

            client.initialize = initialize  # type: ignore[method-assign]
        return client

    await supervise(flaky.url, connector=connector)
    for _ in range(3):
        assert await clock.next_sleep() == TIMING.connect_timeout
        assert await clock.next_sleep() == LOCAL_BACKOFF
        assert await transitions(store, ID) == CONNECT[:1]
        clock.advance(LOCAL_BACKOFF)
    await active(clock)
    assert await transitions(store, ID) == CONNECT
