"""The hub on a real instances directory, with real SDK servers in subprocesses.

Discovery polls only when a test ticks it, supervisors' timers run on a ManualClock, and the
CLI reads the same log file the hub writes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fsm_hub.cli import app
from fsm_hub.core.events import HUB_STREAM
from fsm_hub.discovery.directory import Discovery
from fsm_hub.store.sqlite import EventStore
from fsm_hub.supervision.hub import Hub
from fsm_hub.supervision.supervisor import DEFAULT_TIMING, Timing
from tests.servers.faults import FakeMcp, Hang, free_port
from tests.servers.launch import SdkServerFactory, spawn_sdk_server, stop
from tests.servers.sdk_server import TOOLS as SDK_TOOLS
from tests.supervision import (
    Committed,
    ManualClock,
    Transition,
    active,
    client_sockets,
    eventually,
    fsm_hub_tasks,
    ping_round,
    transition_data,
    transitions,
)

SEED = 99
CONNECT: list[Transition] = [("connect", "discovered", "connecting"), ("connected", "connecting", "active")]
RESTARTED: list[Transition] = [("rediscover", "active", "discovered"), *CONNECT]

FakeFactory = Callable[..., Awaitable[FakeMcp]]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


class Poll:
    """Discovery's `sleep`: the directory is looked at again only when the test says `tick()`."""

    def __init__(self) -> None:
        self._ticks: asyncio.Queue[None] = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        await self._ticks.get()

    def tick(self) -> None:
        self._ticks.put_nowait(None)


@dataclass
class Running:
    """One started hub, with its log, the poll it waits on, and its supervisors' clock."""

    hub: Hub
    store: EventStore
    poll: Poll
    clock: ManualClock
    committed: Committed
    stopped: bool = False

    def state(self, instance_id: str) -> str | None:
        """The state the instance's last committed transition led to."""
        return self.committed.state(instance_id)

    async def settle(self, **states: str) -> None:
        """Wait until each named instance's committed state is the one given."""
        await eventually(
            lambda: all(self.state(i) == s for i, s in states.items()),
            what=lambda: f"{states} (now {({i: self.state(i) for i in states})})",
        )

    async def stop(self) -> None:
        self.stopped = True
        await self.hub.stop()
        await self.store.close()


@dataclass
class Lab:
    """An instances directory, the log next to it, and the SDK server processes announced in it."""

    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    @property
    def db(self) -> Path:
        return self.root / "events.db"

    async def spawn(self, count: int = 1) -> list[tuple[subprocess.Popen[bytes], str]]:
        """Start `count` SDK servers at once (each on a free port); returns (process, url)."""
        logs = [self.root / f"server-{len(self.processes) + n}.log" for n in range(count)]
        started = await asyncio.gather(*(asyncio.to_thread(spawn_sdk_server, log) for log in logs))
        self.processes.extend(process for process, _ in started)
        return list(started)

    def announce(self, instance_id: str, port: int, pid: int | None = None, name: str | None = None) -> None:
        """Write the instance's file the way brummer does: a temporary file, then a rename."""
        document = {
            "id": instance_id,
            "name": name or instance_id,
            "directory": str(self.root),
            "port": port,
            "started_at": "2026-11-25T03:14:15.926535897Z",
            "last_ping": "2026-11-25T03:14:15.926535897Z",
            "process_info": {"pid": pid if pid is not None else os.getpid(), "executable": sys.executable},
        }
        temporary = self.instances_dir / f".tmp-{instance_id}"
        temporary.write_text(json.dumps(document))
        os.replace(temporary, self.instances_dir / f"{instance_id}.json")

    def withdraw(self, instance_id: str) -> None:
        (self.instances_dir / f"{instance_id}.json").unlink()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    lab.instances_dir.mkdir(mode=0o700)
    yield lab
    stop(lab.processes)


@pytest.fixture
async def start_hub(lab: Lab) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """``await start_hub(timing)``: a hub on the lab's directory and log, stopped at teardown."""
    started: list[Running] = []

    async def start(timing: Timing = DEFAULT_TIMING) -> Running:
        store = await EventStore.open(lab.db)
        committed = Committed(store)
        committed.events.extend(await store.read())  # what earlier runs recorded
        poll, clock = Poll(), ManualClock()
        discovery = Discovery(lab.instances_dir, use_watcher=False, sleep=poll, warn=lambda _: None)
        hub = Hub(store, discovery, timing=timing, sleep=clock, rng=random.Random(SEED))
        running = Running(hub, store, poll, clock, committed)
        await hub.start()
        started.append(running)
        return running

    yield start
    for running in started:
        if not running.stopped:
            await running.stop()


def cli(*args: str | Path) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.e2e  # spawns a subprocess
async def test_instances_come_up_and_a_killed_one_dies_then_returns_on_a_new_port(
    lab: Lab, start_hub: Callable[..., Awaitable[Running]]
) -> None:
    servers = dict(zip(("api", "web", "db"), await lab.spawn(3), strict=True))
    for name, (process, url) in servers.items():
        lab.announce(name, port_of(url), process.pid)
    running = await start_hub()
    await running.settle(api="active", web="active", db="active")

    listed = json.loads(cli("instances", "--json", "--db", lab.db))
    assert {(i["name"], i["state"], i["pid"]) for i in listed} == {
        (name, "active", process.pid) for name, (process, _) in servers.items()
    }

    web, web_url = servers["web"]
    web.kill()  # SIGKILL: the process is gone, its file stays behind
    web.wait()
    running.poll.tick()
    await running.settle(web="dead")

    gone = f"process {web.pid} is gone"
    assert await transitions(running.store, "web") == [*CONNECT, ("remove", "active", "dead")]
    assert (await transition_data(running.store, "web"))[-1]["reason"] == gone
    history = cli("history", "web", "--db", lab.db)
    assert [line.split(")  ", 1)[1].split()[:4] for line in history.splitlines()[2:]] == [
        ["connect", "discovered", "→", "connecting"],
        ["connected", "connecting", "→", "active"],
        ["remove", "active", "→", "dead"],
    ]
    assert history.splitlines()[-1].endswith(f"active → dead            {gone}")  # said once
    assert running.hub.view.instances["web"].last_error == gone
    assert (running.hub.state("api"), running.hub.state("db")) == ("active", "active")

    [(again, again_url)] = await lab.spawn()  # the same instance, restarted on a new port
    lab.announce("web", port_of(again_url), again.pid)
    running.poll.tick()
    await running.settle(web="active")
    records = await transition_data(running.store, "web")
    assert [(r["event"], r["from"], r["to"]) for r in records[3:]] == [
        ("rediscover", "dead", "discovered"),
        *CONNECT,
    ]
    assert records[3]["reason"] == (
        f"re-announced: port {port_of(web_url)} → {port_of(again_url)}, pid {web.pid} → {again.pid},"
        f" url {web_url} → {again_url}"
    )
    assert {i["name"]: i["state"] for i in json.loads(cli("instances", "--json", "--db", lab.db))} == {
        "api": "active", "web": "active", "db": "active"
    }


@pytest.mark.e2e  # spawns a subprocess
async def test_an_instance_that_stops_answering_is_retried_until_dead(
    lab: Lab, start_hub: Callable[..., Awaitable[Running]]
) -> None:
    timing = Timing(ping_misses=2, retry_attempts=3)
    [(process, url)] = await lab.spawn()
    lab.announce("hung", port_of(url), process.pid)
    running = await start_hub(timing)
    clock = running.clock
    await active(clock, timing)

    os.kill(process.pid, signal.SIGSTOP)  # alive (discovery keeps it), accepting, silent
    try:
        assert await ping_round(clock, hangs=True, timing=timing) == timing.ping_interval
        backoff = await ping_round(clock, hangs=True, timing=timing)  # lost
        for attempt in range(1, timing.retry_attempts + 1):
            clock.advance(backoff)
            assert await clock.next_sleep() == timing.connect_timeout
            clock.advance(timing.connect_timeout)  # the handshake hangs until its budget ends
            if attempt < timing.retry_attempts:
                backoff = await clock.next_sleep()
        await running.settle(hung="dead")
        running.poll.tick()  # discovery still sees a live process: no remove
    finally:
        os.kill(process.pid, signal.SIGCONT)

    failed_retrying = [("connect_failed", "connecting", "retrying")]
    retry = [("connect", "retrying", "connecting")]
    assert await transitions(running.store, "hung") == [
        *CONNECT,
        ("lost", "active", "retrying"),
        *(retry + failed_retrying) * 2,
        *retry,
        ("connect_failed", "connecting", "dead"),
    ]
    records = await transition_data(running.store, "hung")
    assert (records[2]["reason"], records[2]["error"]) == ("2 pings missed", "ping timed out after 2s")
    assert {r["error"] for r in records if r["event"] == "connect_failed"} == {"handshake timed out after 5s"}

    process.kill()  # the same instance, restarted on a new port
    process.wait()
    [(again, again_url)] = await lab.spawn()
    lab.announce("hung", port_of(again_url), again.pid)
    running.poll.tick()
    await running.settle(hung="active")
    assert (await transitions(running.store, "hung"))[-3:] == [("rediscover", "dead", "discovered"), *CONNECT]


@pytest.mark.e2e  # spawns a subprocess
async def test_stop_records_only_hub_stopped_and_a_restart_reconciles(
    lab: Lab, start_hub: Callable[..., Awaitable[Running]], sdk_server: SdkServerFactory
) -> None:
    sse, plain, stateless = sdk_server(), sdk_server(json=True), sdk_server(stateless=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # noqa: ASYNC220
    try:
        lab.announce("kept", port_of(sse))  # stays announced throughout
        lab.announce("vanishes", port_of(plain))  # its file is deleted while the hub is stopped
        lab.announce("returns", port_of(stateless))  # removed, then back on another port
        lab.announce("orphan", port_of(sse), sleeper.pid)  # its process dies while the hub is stopped
        lab.announce("refused", free_port())  # dead at once: nothing listens there
        first = await start_hub(Timing(retry_attempts=1))
        await first.settle(
            kept="active", vanishes="active", returns="active", orphan="active", refused="dead"
        )
        lab.withdraw("returns")
        first.poll.tick()
        await first.settle(returns="dead")

        before = first.store.last_seq
        await first.stop()
        with_stop = [e for e in cli_events(lab.db) if e["seq"] > before]
        assert [(e["stream"], e["type"]) for e in with_stop] == [(HUB_STREAM, "hub_stopped")]
        states = {i["id"]: i["state"] for i in json.loads(cli("instances", "--json", "--db", lab.db))}
        assert states == {
            "kept": "active", "vanishes": "active", "returns": "dead", "orphan": "active", "refused": "dead"
        }

        lab.withdraw("vanishes")
        lab.announce("returns", port_of(sse))
        sleeper.kill()
        sleeper.wait()
        second = await start_hub(Timing(retry_attempts=1))
        await second.settle(kept="active", vanishes="dead", returns="active", orphan="dead", refused="dead")
    finally:
        sleeper.kill()
        sleeper.wait()

    store = second.store
    assert await transitions(store, "kept") == [*CONNECT, *RESTARTED]
    assert await transitions(store, "vanishes") == [
        *CONNECT,
        ("rediscover", "active", "discovered"),
        ("remove", "discovered", "dead"),
    ]
    assert await transitions(store, "orphan") == [
        *CONNECT,
        ("rediscover", "active", "discovered"),
        ("remove", "discovered", "dead"),
    ]
    assert await transitions(store, "returns") == [
        *CONNECT,
        ("remove", "active", "dead"),
        ("rediscover", "dead", "discovered"),
        *CONNECT,
    ]
    assert await transitions(store, "refused") == [
        ("connect", "discovered", "connecting"),
        ("connect_failed", "connecting", "dead"),
    ]  # dead, announced with the same evidence: it stays dead, nothing recorded
    reasons = {
        stream: [r["reason"] for r in await transition_data(store, stream)][2:]
        for stream in ("kept", "vanishes", "orphan", "returns")
    }
    assert reasons == {
        "kept": ["hub restart", "discovered", f"handshake ok (MCP 2025-11-25, {len(SDK_TOOLS)} tools)"],
        "vanishes": ["hub restart", "instance file gone while the hub was stopped"],
        "orphan": ["hub restart", f"process {sleeper.pid} is gone"],
        "returns": [
            "instance file removed",
            f"re-announced: port {port_of(stateless)} → {port_of(sse)}, url {stateless} → {sse}",
            "discovered",
            f"handshake ok (MCP 2025-11-25, {len(SDK_TOOLS)} tools)",
        ],
    }
    hub_events = [e["type"] for e in cli_events(lab.db, HUB_STREAM)]
    assert hub_events == ["hub_started", "hub_stopped", "hub_started"]


def cli_events(db: Path, stream: str | None = None) -> list[dict[str, Any]]:
    """Every stored event (of `stream`), as `fsm-hub history --json` prints them."""
    if stream is not None:
        return list(json.loads(cli("history", stream, "--json", "--db", db)))
    events: list[dict[str, Any]] = []
    for instance in json.loads(cli("instances", "--json", "--db", db)):
        events.extend(json.loads(cli("history", instance["id"], "--json", "--db", db)))
    events.extend(json.loads(cli("history", HUB_STREAM, "--json", "--db", db)))
    return sorted(events, key=lambda e: int(e["seq"]))


async def test_stop_leaves_no_task_socket_or_session(
    lab: Lab,
    start_hub: Callable[..., Awaitable[Running]],
    fake_mcp: FakeFactory,
    sdk_server: SdkServerFactory,
) -> None:
    fakes = [await fake_mcp(get_stream=True) for _ in range(3)]
    hang = Hang()
    hang_url = await hang.start()
    try:
        urls = [fake.url for fake in fakes] + [sdk_server(), hang_url]
        for n, url in enumerate(urls):
            lab.announce(f"i{n}", port_of(url))
        running = await start_hub()
        await running.settle(i0="active", i1="active", i2="active", i3="active")
        await eventually(lambda: all(len(f.of_method("GET")) == 1 for f in fakes), what="GET streams")
        assert running.hub.state("i4") == "connecting"  # its handshake hangs: stop cuts it short
        ports = {port_of(url) for url in urls}
        assert client_sockets(ports) >= len(urls)
        assert [len(f.live_sessions) for f in fakes] == [1, 1, 1]
        assert fsm_hub_tasks()
        before = running.store.last_seq

        await running.hub.stop()

        assert [f.live_sessions for f in fakes] == [{}, {}, {}]  # every session was DELETEd
        assert client_sockets(ports) == 0
        await eventually(lambda: fsm_hub_tasks() == [], 1, "no fsm-hub task left")
        assert [e.type for e in await running.store.read() if e.seq > before] == ["hub_stopped"]
        await running.store.close()
        running.stopped = True
    finally:
        await hang.stop()


async def test_instance_updated_records_only_what_changed_and_the_fold_keeps_the_rest(
    lab: Lab, start_hub: Callable[..., Awaitable[Running]], fake_mcp: FakeFactory
) -> None:
    fake = await fake_mcp()
    lab.announce("api", port_of(fake.url), name="api")
    running = await start_hub()
    await running.settle(api="active")
    lab.announce("api", port_of(fake.url), name="renamed")  # same port, pid and url: no reconnect
    running.poll.tick()
    await eventually(lambda: any(e.type == "instance_updated" for e in running.committed.events))
    [updated] = [e for e in running.committed.events if e.type == "instance_updated"]
    assert updated.data == {"name": "renamed"}
    instance = running.hub.view.instances["api"]
    assert (instance.name, instance.port, instance.directory, instance.state) == (
        "renamed", port_of(fake.url), str(lab.root), "active")


async def test_a_failed_supervisor_is_recorded_and_restarted_from_the_fold(
    lab: Lab, start_hub: Callable[..., Awaitable[Running]], fake_mcp: FakeFactory
) -> None:
    fake, other = await fake_mcp(), await fake_mcp()
    lab.announce("crashy", port_of(fake.url))
    lab.announce("calm", port_of(other.url))
    running = await start_hub()
    await running.settle(crashy="active", calm="active")
    before = running.hub._supervisors["crashy"]
    await eventually(lambda: bool(running.clock.sleeping("supervise-crashy")), what="crashy waits to ping")

    running.clock.fail("supervise-crashy", RuntimeError("timer broke"))  # its loop dies

    def failures() -> list[dict[str, Any]]:
        return [e.data for e in running.committed.events if e.type == "supervisor_failed"]

    await eventually(lambda: bool(failures()), what="the failure on the hub stream")
    assert failures() == [{"instance": "crashy", "error": "RuntimeError: timer broke", "restart": 1}]
    [failed] = [e for e in running.committed.events if e.type == "supervisor_failed"]
    assert failed.stream == HUB_STREAM
    await eventually(lambda: running.hub._supervisors["crashy"] is not before, what="a new supervisor")
    await eventually(lambda: running.hub._supervisors["crashy"].running, what="the new supervisor runs")
    # The committed state was already active before the crash: wait for the restart's own events.
    for _ in range(500):
        if (await transitions(running.store, "crashy"))[2:] == RESTARTED:
            break
        await asyncio.sleep(0.01)
    assert (await transitions(running.store, "crashy"))[2:] == RESTARTED
    await running.settle(crashy="active")
    records = await transition_data(running.store, "crashy")
    assert records[2]["reason"] == "supervisor restarted"
    assert await transitions(running.store, "calm") == CONNECT  # the others never noticed
    assert running.hub.state("crashy") == "active"


async def test_snapshots_every_k_events_and_on_a_clean_stop_feed_the_next_start(
    lab: Lab, start_hub: Callable[..., Awaitable[Running]], fake_mcp: FakeFactory
) -> None:
    import sqlite3

    from fsm_hub.store.snapshots import stored_snapshots

    fakes = [await fake_mcp() for _ in range(3)]
    running = await start_hub()
    running.hub.snapshot_every = 4
    for n, fake in enumerate(fakes):
        lab.announce(f"s{n}", port_of(fake.url))
    running.poll.tick()
    await running.settle(s0="active", s1="active", s2="active")
    await running.stop()  # hub_stopped, then a snapshot of everything
    with sqlite3.connect(lab.db) as db:
        seqs = stored_snapshots(db)
        head = db.execute("SELECT max(seq) FROM events").fetchone()[0]
    db.close()
    assert seqs[-1] == head and len(seqs) >= 2  # periodic ones, and the one at the stop

    again = await start_hub()
    assert again.hub.started_from == (head, 0)  # the stop's snapshot, and no tail to fold
    await again.settle(s0="active", s1="active", s2="active")
    assert {i.id: i.state for i in again.hub.view.instances.values()} == {
        "s0": "active", "s1": "active", "s2": "active"
    }
