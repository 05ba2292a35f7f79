"""Every (state, event) pair of the instance machine, bare and recorded into a real store."""

from __future__ import annotations

import itertools

import pytest
from statemachine.contrib.diagram import formatter
from statemachine.exceptions import TransitionNotAllowed

from fsm_hub.core.machine import (
    DEFAULT_RETRY_ATTEMPTS,
    EVENTS,
    STATES,
    Connection,
    InstanceMachine,
    legal_targets,
)
from fsm_hub.errors import IllegalTransition
from fsm_hub.store.recorder import fire, recorded_machine
from fsm_hub.store.sqlite import EventStore

# The specification, written out by hand: (state, event) → target. Absent pairs are illegal.
# connect_failed goes to retrying while retries are left, else to dead (see the tests below).
SPEC: dict[tuple[str, str], str] = {
    ("discovered", "connect"): "connecting",
    ("discovered", "rediscover"): "discovered",
    ("discovered", "remove"): "dead",
    ("connecting", "connected"): "active",
    ("connecting", "connect_failed"): "retrying",
    ("connecting", "rediscover"): "discovered",
    ("connecting", "remove"): "dead",
    ("active", "lost"): "retrying",
    ("active", "rediscover"): "discovered",
    ("active", "remove"): "dead",
    ("retrying", "connect"): "connecting",
    ("retrying", "give_up"): "dead",
    ("retrying", "rediscover"): "discovered",
    ("retrying", "remove"): "dead",
    ("dead", "rediscover"): "discovered",
    ("dead", "remove"): "dead",
}
PAIRS = list(itertools.product(STATES, EVENTS))
LEGAL = [pair for pair in PAIRS if pair in SPEC]
ILLEGAL = [pair for pair in PAIRS if pair not in SPEC]


def pair_id(pair: tuple[str, str]) -> str:
    return f"{pair[1]}-from-{pair[0]}"


def test_the_machine_declares_exactly_the_specified_transitions() -> None:
    declared = {(state, event): targets for (event, state), targets in legal_targets().items()}
    expected = {pair: frozenset({target}) for pair, target in SPEC.items()}
    expected["connecting", "connect_failed"] = frozenset({"retrying", "dead"})
    assert declared == expected
    assert set(STATES) == {"discovered", "connecting", "active", "retrying", "dead"}
    assert len(ILLEGAL) == len(STATES) * len(EVENTS) - len(SPEC) == 19


@pytest.mark.parametrize("pair", LEGAL, ids=pair_id)
def test_legal_event_reaches_its_target(pair: tuple[str, str]) -> None:
    state, event = pair
    machine = InstanceMachine(Connection(state=state, attempt=1))
    machine.send(event)
    assert machine.model.state == SPEC[pair]


@pytest.mark.parametrize("pair", ILLEGAL, ids=pair_id)
def test_illegal_event_raises_and_keeps_the_state(pair: tuple[str, str]) -> None:
    state, event = pair
    machine = InstanceMachine(Connection(state=state, attempt=1))
    with pytest.raises(TransitionNotAllowed):
        machine.send(event)
    assert machine.model.state == state
    assert machine.model.attempt == 1


@pytest.mark.parametrize("pair", LEGAL, ids=pair_id)
async def test_legal_event_is_recorded(pair: tuple[str, str], store: EventStore) -> None:
    state, event = pair
    machine = await recorded_machine(store, "inst", state=state, attempt=1)
    assert await fire(machine, event, reason="because") == SPEC[pair]
    [stored] = await store.read()
    assert (stored.stream, stored.version, stored.type) == ("inst", 1, "transition")
    assert stored.data == {
        "event": event, "from": state, "to": SPEC[pair], "reason": "because",
        "attempt": machine.model.attempt, "error": None,
    }


@pytest.mark.parametrize("pair", ILLEGAL, ids=pair_id)
async def test_illegal_event_raises_and_records_nothing(
    pair: tuple[str, str], store: EventStore
) -> None:
    state, event = pair
    machine = await recorded_machine(store, "inst", state=state, attempt=1)
    with pytest.raises(IllegalTransition, match=f"event '{event}' is not allowed in state '{state}'"):
        await fire(machine, event, reason="because")
    assert machine.model.state == state
    await store.append("probe", "instance_updated", {})  # a write after it: the log is in order
    assert [e.stream for e in await store.read()] == ["probe"]


def test_connect_failed_retries_while_attempts_are_left() -> None:
    machine = InstanceMachine(Connection(state="connecting", attempt=2, max_attempts=3))
    machine.send("connect_failed")
    assert machine.model.state == "retrying"


@pytest.mark.parametrize("attempt", [3, 4])
def test_connect_failed_without_retries_left_is_dead(attempt: int) -> None:
    machine = InstanceMachine(Connection(state="connecting", attempt=attempt, max_attempts=3))
    machine.send("connect_failed")
    assert machine.model.state == "dead"


async def test_attempts_are_counted_and_recorded(store: EventStore) -> None:
    machine = await recorded_machine(store, "inst", max_attempts=3)
    assert machine.model.state == "discovered"
    for _ in range(3):
        await fire(machine, "connect", reason="try")
        await fire(machine, "connect_failed", reason="try", error="refused")
    assert machine.model.state == "dead"
    recorded = [(e.data["event"], e.data["to"], e.data["attempt"]) for e in await store.read()]
    assert recorded == [
        ("connect", "connecting", 1), ("connect_failed", "retrying", 1),
        ("connect", "connecting", 2), ("connect_failed", "retrying", 2),
        ("connect", "connecting", 3), ("connect_failed", "dead", 3),
    ]


async def test_success_and_rediscovery_reset_the_attempts(store: EventStore) -> None:
    machine = await recorded_machine(store, "inst")
    await fire(machine, "connect")
    await fire(machine, "connect_failed", error="refused")
    await fire(machine, "connect")
    assert machine.model.attempt == 2
    await fire(machine, "connected")
    assert machine.model.attempt == 0
    await fire(machine, "lost")
    await fire(machine, "connect")
    assert machine.model.attempt == 1
    await fire(machine, "rediscover", reason="re-announced")
    assert machine.model.attempt == 0
    assert [e.data["attempt"] for e in await store.read()] == [1, 1, 2, 0, 0, 1, 0]


def test_default_retry_budget() -> None:
    assert Connection().max_attempts == DEFAULT_RETRY_ATTEMPTS
    machine = InstanceMachine()
    for _ in range(DEFAULT_RETRY_ATTEMPTS - 1):
        machine.send("connect")
        machine.send("connect_failed")
        assert machine.model.state == "retrying"
    machine.send("connect")
    machine.send("connect_failed")
    assert machine.model.state == "dead"


def test_rediscover_is_the_only_way_out_of_dead() -> None:
    for event in EVENTS:
        machine = InstanceMachine(Connection(state="dead"))
        try:
            machine.send(event)
        except TransitionNotAllowed:
            pass
        assert (machine.model.state != "dead") == (event == "rediscover"), event
    assert legal_targets()["rediscover", "dead"] == {"discovered"}


@pytest.mark.parametrize(("fmt", "header"), [("mermaid", "stateDiagram"), ("dot", "digraph")])
def test_diagram_shows_every_state(fmt: str, header: str) -> None:
    text = formatter.render(InstanceMachine, fmt)
    assert text.lstrip().startswith(header)
    for state in STATES:
        assert state in text
