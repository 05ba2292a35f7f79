"""The recording listener: each transition durable, at exactly the (frozen) time it happened."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from freezegun import freeze_time

from fsm_hub.core.events import EventType
from fsm_hub.core.machine import Connection, InstanceMachine
from fsm_hub.core.view import fold
from fsm_hub.store.recorder import TransitionRecorder, fire, recorded_machine
from fsm_hub.store.sqlite import EventStore

FROZEN = "2026-03-14T03:14:15.926535Z"


async def test_each_transition_is_stored_at_the_frozen_time(db_path: Path) -> None:
    # real_asyncio keeps the event loop's clock real, so awaiting commits still works.
    with freeze_time(FROZEN, real_asyncio=True) as frozen:
        store = await EventStore.open(db_path)
        try:
            machine = await recorded_machine(store, "inst")
            await fire(machine, "connect", reason="announced")
            frozen.tick(timedelta(seconds=1, microseconds=1))
            await fire(machine, "connect_failed", reason="connect", error="refused")
            frozen.tick(timedelta(minutes=2))
            await fire(machine, "connect", reason="backoff elapsed")
            frozen.move_to("2026-03-15T01:00:00.000001+02:00")
            await fire(machine, "connected", reason="initialized")
            events = await store.read()
        finally:
            await store.close()
    assert [e.at for e in events] == [
        "2026-03-14T03:14:15.926535+00:00",
        "2026-03-14T03:14:16.926536+00:00",
        "2026-03-14T03:16:16.926536+00:00",
        "2026-03-14T23:00:00.000001+00:00",
    ]
    view = fold(events).instances["inst"]
    assert (view.state, view.since, view.last_error) == ("active", events[-1].at, None)


async def test_send_returns_only_once_the_transition_is_committed(store: EventStore) -> None:
    recorder = TransitionRecorder(store, "inst")
    machine = InstanceMachine(Connection(), listeners=[recorder])
    await machine.activate_initial_state()
    await machine.send("connect", reason="announced")
    [stored] = await store.read()  # read through a separate connection: committed
    assert recorder.last == stored
    assert (stored.data["from"], stored.data["to"]) == ("discovered", "connecting")


async def test_details_and_attempt_are_recorded(store: EventStore) -> None:
    machine = await recorded_machine(store, "inst", state="connecting", attempt=3, max_attempts=3)
    assert await fire(machine, "connect_failed", reason="handshake", error="timed out") == "dead"
    [event] = await store.read()
    assert event.type == EventType.TRANSITION
    assert event.data == {"event": "connect_failed", "from": "connecting", "to": "dead",
                          "reason": "handshake", "attempt": 3, "error": "timed out"}


async def test_a_restored_machine_records_nothing_until_it_moves(store: EventStore) -> None:
    machine = await recorded_machine(store, "inst", state="retrying", attempt=2)
    assert machine.model.state == "retrying"
    assert await store.read() == []
    assert await fire(machine, "connect") == "connecting"
    [event] = await store.read()
    assert (event.data["from"], event.data["attempt"]) == ("retrying", 3)
