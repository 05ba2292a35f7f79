"""Commit, then change: no state, session or route exists before its transition is in the log.

The log refuses appends for real: a trigger in the SQLite file aborts chosen inserts.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fsm_hub.core.events import HUB_STREAM, EventType, StoredEvent
from fsm_hub.core.view import fold
from fsm_hub.errors import InstanceUnavailable, LogUnwritable, StoreError
from fsm_hub.mcp.upstream import McpClient
from fsm_hub.store.recorder import fire, recorded_machine
from fsm_hub.store.sqlite import EventLog, EventStore
from fsm_hub.supervision.supervisor import Supervisor, Timing
from tests.logs import accept_transitions_to, refuse_transitions_to
from tests.servers.faults import FakeMcp
from tests.supervision import ManualClock, eventually, transitions

ID = "c0ffee"
TIMING = Timing(record_attempts=3, record_backoff=0.25)
FakeFactory = Callable[..., Awaitable[FakeMcp]]


class GatedAppends:
    """The real store, but each append waits for the test to open the gate first (a slow disk)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.gate = asyncio.Event()
        self.waiting = 0

    async def append(self, stream: str, type: str, data: dict[str, Any]) -> StoredEvent:
        self.waiting += 1
        await self.gate.wait()
        return await self.store.append(stream, type, data)


async def test_a_failed_append_leaves_the_machine_in_its_source_state(
    store: EventStore, db_path: Path
) -> None:
    machine = await recorded_machine(store, ID)
    await fire(machine, "connect", reason="discovered")
    refuse_transitions_to(db_path, "active")
    with pytest.raises(StoreError, match="disk says no"):
        await fire(machine, "connected", reason="handshake ok")
    assert (machine.model.state, machine.model.attempt) == ("connecting", 1)
    assert await transitions(store, ID) == [("connect", "discovered", "connecting")]
    # The other producers' appends still go through, and so does this one once the log takes it.
    accept_transitions_to(db_path, "active")
    assert await fire(machine, "connected", reason="handshake ok") == "active"
    recorded = [e.data for e in await store.read(stream=ID)]
    assert [(d["to"], d["attempt"]) for d in recorded] == [("connecting", 1), ("active", 0)]
    assert machine.model.attempt == 0


async def test_during_a_slow_append_the_state_has_not_changed_yet(store: EventStore) -> None:
    gated = GatedAppends(store)
    machine = await recorded_machine(gated, ID)
    sending = asyncio.ensure_future(fire(machine, "connect", reason="discovered"))
    await eventually(lambda: gated.waiting == 1, timeout=5)
    assert machine.model.state == "discovered"  # nothing visible before the commit
    assert machine.model.attempt == 0
    gated.gate.set()
    assert await sending == "connecting"
    assert fold(await store.read()).instances[ID].state == "connecting"


async def refused_connect(
    fake_mcp: FakeFactory, store: EventStore, db_path: Path, clock: ManualClock
) -> Supervisor:
    """A supervisor connecting to a working server, on a log that refuses `→ active`."""
    fake = await fake_mcp()
    refuse_transitions_to(db_path, "active")
    machine = await recorded_machine(store, ID)
    return Supervisor(ID, fake.url, machine, connector=McpClient, timing=TIMING, sleep=clock,
                      rng=random.Random(1))


async def test_no_session_is_installed_before_connected_is_committed(
    fake_mcp: FakeFactory, store: EventStore, db_path: Path, clock: ManualClock
) -> None:
    supervisor = await refused_connect(fake_mcp, store, db_path, clock)
    supervisor.start()
    try:
        assert await clock.next_sleep() == TIMING.connect_timeout
        # The handshake worked, `connected` was refused: the append is retried after a pause.
        assert await clock.next_sleep() == TIMING.record_backoff
        assert supervisor.state == "connecting"
        assert supervisor.tools is None
        with pytest.raises(InstanceUnavailable, match="connecting"):
            await supervisor.request("tools/call", {"name": "echo", "arguments": {}})
        accept_transitions_to(db_path, "active")
        clock.advance(TIMING.record_backoff)
        assert await clock.next_sleep() == TIMING.ping_interval  # active, now committed
        assert supervisor.state == "active"
        assert supervisor.tools is not None
        assert await transitions(store, ID) == [
            ("connect", "discovered", "connecting"),
            ("connected", "connecting", "active"),
        ]
    finally:
        await supervisor.stop()


async def test_a_log_that_stays_unwritable_ends_the_supervisor_with_log_unwritable(
    fake_mcp: FakeFactory, store: EventStore, db_path: Path, clock: ManualClock
) -> None:
    supervisor = await refused_connect(fake_mcp, store, db_path, clock)
    task = supervisor.start()
    try:
        assert await clock.next_sleep() == TIMING.connect_timeout
        for pause in (0.25, 0.5):  # record_attempts=3: two pauses, doubling
            assert await clock.next_sleep() == pause
            clock.advance(pause)
        with pytest.raises(LogUnwritable, match=f"cannot write event log {db_path}.*disk says no"):
            await asyncio.wait_for(task, 5)
        assert supervisor.state == "connecting"
        assert supervisor.tools is None
    finally:
        await supervisor.stop()
    assert [e.type for e in await store.read(stream=HUB_STREAM)] == []
    assert EventType.TRANSITION in {e.type for e in await store.read(stream=ID)}


@pytest.mark.e2e  # spawns `fsm-hub serve`
async def test_serve_stops_with_one_line_when_the_log_stays_unwritable(
    fake_mcp: FakeFactory, tmp_path: Path
) -> None:
    import json
    import os
    import sys

    fake = await fake_mcp()
    instances = tmp_path / "instances"
    instances.mkdir(mode=0o700)
    port = int(fake.url.rsplit(":", 1)[1].split("/")[0])
    (instances / "doomed.json").write_text(json.dumps({
        "id": "doomed", "name": "doomed", "directory": str(tmp_path), "port": port,
        "process_info": {"pid": os.getpid(), "executable": sys.executable},
    }))
    db = tmp_path / "events.db"
    store = await EventStore.open(db)  # create and migrate it first
    await store.close()
    refuse_transitions_to(db, "active")
    hub = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("fsm-hub")),
        "serve", "--quiet", "--db", str(db), "--instances-dir", str(instances),  # no banner
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(hub.communicate(), 30)
    finally:
        if hub.returncode is None:
            hub.kill()
            await hub.wait()
    assert hub.returncode == 1
    assert out == b""
    assert err.decode().splitlines() == [f"fsm-hub: cannot write event log {db}: disk says no"]
    with EventLog.open(db) as log:
        kinds = [(e.stream, e.type) for e in log.events()]
    assert ("doomed", "transition") in kinds  # connect was recorded; connected never was
    assert log_states(db)["doomed"] == "connecting"


def log_states(db: Path) -> dict[str, str]:
    with EventLog.open(db) as log:
        return {i.id: i.state for i in log.fold().instances.values()}
