"""The pure fold: known sequences, prefixes, the live view against the log on disk."""

from __future__ import annotations

import asyncio
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsm_hub.core.audit import audit
from fsm_hub.core.events import parse_time
from fsm_hub.core.machine import InstanceMachine, legal_targets
from fsm_hub.core.view import Fold, InstanceView, fold, resolve
from fsm_hub.errors import AmbiguousInstance, UnknownInstance
from fsm_hub.store.recorder import fire, recorded_machine
from fsm_hub.store.sqlite import EventLog, EventStore
from tests.logs import LogBuilder, Sample

EVENTS_FROM: dict[str, list[str]] = {}
for _event, _state in sorted(legal_targets()):
    EVENTS_FROM.setdefault(_state, []).append(_event)


def test_fold_of_the_sample(sample_log: Sample) -> None:
    log = sample_log.log
    view = fold(log.events)
    assert view.events == len(log.events) == view.last_seq
    assert view.hub_started_at == log.events[0].at
    assert view.count_by_state() == {"active": 1, "retrying": 1, "dead": 1, "discovered": 1}
    assert view.instances[Sample.WEB] == InstanceView(
        id=Sample.WEB, name="web", directory="/src/web", port=8001, url="http://127.0.0.1:8001/mcp",
        pid=4242, state="active", since=log.events[4].at, retry_count=0, last_error=None,
        sessions=("session-1",),
    )
    api = view.instances[Sample.API]
    assert (api.state, api.retry_count, api.last_error) == ("retrying", 2, "connection refused")
    docs = view.instances[Sample.DOCS]
    assert (docs.state, docs.since, docs.last_error) == ("dead", log.events[14].at, "gave up")
    too = view.instances[Sample.DOCS_TOO]
    assert (too.state, too.since, too.retry_count) == ("discovered", log.events[15].at, 0)
    assert dict(view.sessions) == {"session-1": Sample.WEB}
    assert view.instances[Sample.WEB].to_json()["sessions"] == ["session-1"]


def test_since_retry_count_and_last_error(log_builder: LogBuilder) -> None:
    log = log_builder

    def now() -> InstanceView:
        return fold(log.events).instances["i"]

    discovered = log.discover("i", "app")
    assert (now().state, now().since, now().retry_count, now().last_error) == (
        "discovered", discovered.at, 0, None)
    log.transition("i", "connect", "connecting", attempt=1)
    failed = log.transition("i", "connect_failed", "retrying", attempt=1, error="refused")
    assert (now().state, now().since, now().retry_count, now().last_error) == (
        "retrying", failed.at, 1, "refused")
    retry = log.transition("i", "connect", "connecting", attempt=2)
    assert (now().since, now().retry_count, now().last_error) == (retry.at, 2, "refused")
    log.transition("i", "connected", "active")
    assert (now().state, now().retry_count, now().last_error) == ("active", 0, None)  # cleared
    log.transition("i", "lost", "retrying", error="reset")
    assert (now().retry_count, now().last_error) == (0, "reset")
    log.transition("i", "rediscover", "discovered")
    assert (now().state, now().retry_count, now().last_error) == ("discovered", 0, "reset")


def test_an_instance_seen_only_through_transitions_is_named_by_its_id(log_builder: LogBuilder) -> None:
    event = log_builder.transition("lonely", "connect", "connecting", attempt=1)
    view = fold(log_builder.events).instances["lonely"]
    assert (view.name, view.directory, view.port, view.since) == ("lonely", "", None, event.at)


def test_updates_change_the_announced_fields(log_builder: LogBuilder) -> None:
    log_builder.discover("i", "app", port=8000)
    log_builder.add("i", "instance_updated", {"port": 9000, "pid": 77, "unknown": "ignored"})
    view = fold(log_builder.events).instances["i"]
    assert (view.name, view.port, view.pid) == ("app", 9000, 77)


def test_sessions_end_with_their_hub(log_builder: LogBuilder) -> None:
    log = log_builder
    log.discover("a", "a")
    log.discover("b", "b")
    started = log.hub_started()
    log.session("a", "s1")
    log.session("a", "s2")
    log.session("b", "s3")
    log.session("a", "s1", connected=False)
    view = fold(log.events)
    assert dict(view.sessions) == {"s2": "a", "s3": "b"}
    assert (view.instances["a"].sessions, view.instances["b"].sessions) == (("s2",), ("s3",))
    assert view.hub_started_at == started.at
    log.hub_stopped()
    view = fold(log.events)
    assert (dict(view.sessions), view.hub_started_at, view.instances["a"].sessions) == ({}, None, ())
    log.hub_started()
    log.session("b", "s4")
    restarted = log.hub_started()  # a crash: no hub_stopped, the new hub starts afresh
    view = fold(log.events)
    assert (dict(view.sessions), view.hub_started_at) == ({}, restarted.at)


def test_the_fold_can_continue(sample_log: Sample) -> None:
    events = sample_log.log.events
    running = Fold()
    for n in range(0, len(events), 3):
        running.apply(events[n:n + 3])
        assert running.view() == fold(events[:n + 3])
    assert running.apply([]).view() == fold(events)


def test_every_prefix_is_the_view_as_it_was_then(sample_log: Sample) -> None:
    events = sample_log.log.events
    with EventLog.open(sample_log.path) as log:
        for n, event in enumerate(events, 1):
            then = fold(log.events(until=parse_time(event.at)))
            assert then == fold(events[:n])
            assert then.last_seq == event.seq
    with EventLog.open(sample_log.path) as log:
        assert fold(log.events(until=parse_time("2000-01-01"))) == fold([])


async def test_the_live_view_equals_the_log_replayed_from_disk(db_path: Path) -> None:
    """Many instances moving at once; the hub's view is kept by subscribe() alone."""
    store = await EventStore.open(db_path)
    live = Fold()
    store.subscribe(live.apply)
    chooser = random.Random(20260314)

    async def instance(n: int) -> None:
        stream = f"inst-{n:03d}"
        await store.append(stream, "instance_discovered", {"name": f"app-{n % 7}", "port": 8000 + n})
        machine = await recorded_machine(store, stream, max_attempts=2)
        for step in range(30):
            event = chooser.choice(EVENTS_FROM[machine.model.state])
            await fire(machine, event, reason="random walk", error="boom" if "fail" in event else None)
            if step % 10 == 3:
                await store.append(stream, "session_connected", {"session_id": f"{stream}-{step}"})

    await store.append("hub", "hub_started", {"pid": 1})
    await asyncio.gather(*(instance(n) for n in range(60)))
    await store.close()
    with EventLog.open(db_path) as log:
        replayed = fold(log.events())
    assert live.view() == replayed
    assert len(replayed.instances) == 60
    assert replayed.events == 1 + 60 * (1 + 30 + 3)


steps = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 6)), max_size=25)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps, budgets=st.tuples(*[st.integers(1, 3)] * 3))
def test_folding_the_log_gives_the_machines_states(
    steps: list[tuple[int, int]], budgets: tuple[int, int, int]
) -> None:
    """Random legal walks through recorded machines: the log folds to exactly where they are."""

    async def walk(path: Path) -> list[InstanceMachine]:
        store = await EventStore.open(path)
        machines = [await recorded_machine(store, f"i{n}", max_attempts=budgets[n]) for n in range(3)]
        for n, choice in steps:
            legal = EVENTS_FROM[machines[n].model.state]
            event = legal[choice % len(legal)]
            await fire(machines[n], event, reason="walk", error="e" if "fail" in event else None)
        await store.close()
        return machines

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.db"
        machines = asyncio.run(walk(path))
        with EventLog.open(path) as log:
            events = list(log.events())
    view = fold(events)
    assert audit(events).violations == []
    for n, machine in enumerate(machines):
        moved = any(e.stream == f"i{n}" for e in events)
        if not moved:
            assert f"i{n}" not in view.instances
            continue
        instance = view.instances[f"i{n}"]
        assert instance.state == machine.model.state
        assert instance.retry_count == machine.model.attempt


# -- resolve -----------------------------------------------------------------------------------

IDS = ["a1b2c3", "a1b2ff", "b7e8f9", "c0ffee"]
NAMES = {"a1b2c3": "web", "a1b2ff": "api", "b7e8f9": "docs", "c0ffee": "docs"}


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("a1b2c3", "a1b2c3"), ("web", "a1b2c3"), ("a1b2f", "a1b2ff"), ("b7", "b7e8f9"), ("c0ffee", "c0ffee")],
    ids=["id", "name", "prefix", "short-prefix", "id-beats-ambiguous-name"],
)
def test_resolve(ref: str, expected: str) -> None:
    assert resolve(ref, IDS, NAMES) == expected


@pytest.mark.parametrize(
    ("ref", "error", "message"),
    [
        ("a1b2", AmbiguousInstance, "'a1b2' matches 2 instances: a1b2c3, a1b2ff"),
        ("docs", AmbiguousInstance, "2 instances are named 'docs': b7e8f9, c0ffee"),
        ("nope", UnknownInstance, "no instance matches 'nope'"),
        ("", UnknownInstance, "no instance matches ''"),
    ],
    ids=["ambiguous-prefix", "ambiguous-name", "unknown", "empty"],
)
def test_resolve_refuses(ref: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        resolve(ref, IDS, NAMES)
    assert str(caught.value) == message


def test_resolve_shortens_a_long_list() -> None:
    ids = [f"ab{n:02d}" for n in range(8)]
    with pytest.raises(AmbiguousInstance, match=r"matches 8 instances: ab00, ab01, ab02, ab03, ab04 …$"):
        resolve("ab", ids, {})
