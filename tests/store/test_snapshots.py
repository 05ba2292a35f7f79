"""Snapshots are derived data: they change how fast the fold is read, never what it says."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from fsm_hub.core.events import parse_time
from fsm_hub.core.view import Fold, fold
from fsm_hub.store.snapshots import load_fold, stored_snapshots
from fsm_hub.store.sqlite import EventLog, EventStore
from tests.logs import LogBuilder, build_sample


def busy_log(builder: LogBuilder, instances: int = 30, rounds: int = 6) -> LogBuilder:
    """Instances that fail, retry, connect, get lost, with sessions coming and going."""
    builder.hub_started()
    for n in range(instances):
        builder.discover(f"i{n:03d}", f"name{n}", port=9000 + n)
    for r in range(rounds):
        for n in range(instances):
            stream = f"i{n:03d}"
            builder.transition(stream, "connect", "connecting", attempt=1)
            if (n + r) % 3 == 0:
                builder.transition(stream, "connect_failed", "retrying", attempt=1, error=f"refused {r}")
                builder.transition(stream, "connect", "connecting", attempt=2)
            builder.transition(stream, "connected", "active")
            if n % 4 == 0:
                builder.session(stream, f"s{r}-{n}")
            builder.transition(stream, "lost", "retrying", attempt=0, error=f"lost {r}")
    return builder


async def snapshot_at(path: Path, seq: int) -> None:
    """Store the fold of the log up to `seq` as its snapshot, through the store's writer."""
    with EventLog.open(path) as log:
        prefix = [e for e in _hashed(log) if e.seq <= seq]
    store = await EventStore.open(path)
    try:
        store.save_snapshot(Fold().apply(prefix))
    finally:
        await store.close()


def _hashed(log: EventLog) -> list:  # type: ignore[type-arg]
    from fsm_hub.store.snapshots import hashed_events

    assert log._connection is not None
    return list(hashed_events(log._connection))


@pytest.fixture
def busy(tmp_path: Path) -> tuple[Path, LogBuilder]:
    builder = busy_log(LogBuilder())
    return builder.write(tmp_path / "busy.db"), builder


def instances(path: Path, until: str | None = None) -> dict[str, object]:
    with EventLog.open(path) as log:
        view = log.fold(until=parse_time(until) if until else None)
    return {i.id: i.to_json() for i in view.instances.values()}


async def test_snapshot_plus_tail_equals_the_whole_fold(busy: tuple[Path, LogBuilder]) -> None:
    path, builder = busy
    expected = fold(builder.events)
    await snapshot_at(path, len(builder.events) // 2)
    with sqlite3.connect(path) as db:
        folded = load_fold(db)
    assert folded.snapshot_seq == len(builder.events) // 2
    assert folded.tail == len(builder.events) - folded.snapshot_seq
    assert folded.fold.view() == expected
    assert instances(path) == {i.id: i.to_json() for i in expected.instances.values()}


async def test_at_a_moment_after_the_snapshot_folds_snapshot_and_tail(busy: tuple[Path, LogBuilder]) -> None:
    path, builder = busy
    half = len(builder.events) // 2
    await snapshot_at(path, half)
    moment = builder.events[half + 40].at
    expected = fold(e for e in builder.events if e.at <= moment)
    with sqlite3.connect(path) as db:
        folded = load_fold(db, until=moment)
        before = load_fold(db, until=builder.events[half - 10].at)
    assert folded.snapshot_seq == half
    assert folded.fold.view() == expected
    assert before.snapshot_seq == 0  # a moment before the snapshot folds from the start
    assert before.fold.view() == fold(e for e in builder.events if e.at <= builder.events[half - 10].at)
    assert instances(path, moment) == {i.id: i.to_json() for i in expected.instances.values()}


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("UPDATE snapshots SET state = 'not json'", "corrupt"),
        ("UPDATE snapshots SET state = '{\"format\": 1}'", "corrupt"),
        ("UPDATE snapshots SET format = 99", "format 99"),
        ("UPDATE snapshots SET head_hash = zeroblob(32)", "not of this log's history"),
    ],
    ids=["not-json", "incomplete", "foreign-format", "other-history"],
)
async def test_a_bad_snapshot_is_ignored_with_a_warning_and_changes_nothing(
    busy: tuple[Path, LogBuilder], damage: str, why: str, tmp_path: Path
) -> None:
    path, builder = busy
    await snapshot_at(path, 100)
    with sqlite3.connect(path) as db:
        db.execute(damage)
    db.close()
    warnings: list[str] = []
    with sqlite3.connect(path) as db:
        folded = load_fold(db, warn=warnings.append)
    assert folded.snapshot_seq == 0 and folded.ignored == 1
    assert [w.split(" (")[0] for w in warnings] == ["warning: snapshot at seq 100 ignored"]
    assert why in warnings[0]
    assert folded.fold.view() == fold(builder.events)
    # ...and verify says the stored snapshot is wrong.
    with EventLog.open(path) as log:
        report = log.verify()
    flagged = any(p.startswith("snapshot at seq 100") for p in report.violations)
    assert flagged == (why != "not of this log's history")  # that one is a true fold, of another log


async def test_deleting_snapshots_changes_no_answer(busy: tuple[Path, LogBuilder], tmp_path: Path) -> None:
    path, _ = busy
    await snapshot_at(path, 120)
    bare = tmp_path / "bare.db"
    shutil.copy(path, bare)
    with sqlite3.connect(bare) as db:
        db.execute("DELETE FROM snapshots")
    db.close()
    assert instances(path) == instances(bare)


async def test_verify_checks_every_stored_snapshot(busy: tuple[Path, LogBuilder]) -> None:
    path, _ = busy
    await snapshot_at(path, 50)
    await snapshot_at(path, 150)
    with EventLog.open(path) as log:
        clean = log.verify()
    assert (clean.violations, clean.snapshots_checked) == ([], 2)
    with sqlite3.connect(path) as db:  # a snapshot that lies about a state
        db.execute(
            "UPDATE snapshots SET state = replace(state, '\"retrying\"', '\"active\"') WHERE seq = 150"
        )
    db.close()
    with EventLog.open(path) as log:
        lying = log.verify()
    assert lying.violations == ["snapshot at seq 150: differs from the fold of the log up to it"]


async def test_only_the_newest_snapshots_are_kept(busy: tuple[Path, LogBuilder]) -> None:
    path, _ = busy
    for seq in (10, 20, 30, 40, 50):
        await snapshot_at(path, seq)
    with sqlite3.connect(path) as db:
        assert stored_snapshots(db) == [30, 40, 50]


def test_the_sample_log_folds_the_same_with_a_snapshot(tmp_path: Path) -> None:
    builder = build_sample(LogBuilder(step=timedelta(seconds=1)))
    path = builder.write(tmp_path / "s.db")
    asyncio.run(snapshot_at(path, 8))
    assert instances(path) == {i.id: i.to_json() for i in fold(builder.events).instances.values()}


async def test_a_snapshot_in_another_encoding_of_the_same_state_verifies(
    busy: tuple[Path, LogBuilder],
) -> None:
    """Verify compares the text first; a different text of an equal state is still equal."""
    path, _ = busy
    await snapshot_at(path, 150)
    with sqlite3.connect(path) as db:
        (state,) = db.execute("SELECT state FROM snapshots WHERE seq = 150").fetchone()
        spaced = json.dumps(json.loads(state), indent=1)
        assert spaced != state
        db.execute("UPDATE snapshots SET state = ? WHERE seq = 150", (spaced,))
    db.close()
    with EventLog.open(path) as log:
        report = log.verify()
    assert (report.violations, report.snapshots_checked) == ([], 1)
    with sqlite3.connect(path) as db:  # and a different state in that encoding is not
        lying = spaced.replace('"retrying"', '"active"')
        db.execute("UPDATE snapshots SET state = ? WHERE seq = 150", (lying,))
    db.close()
    with EventLog.open(path) as log:
        report = log.verify()
    assert report.violations == ["snapshot at seq 150: differs from the fold of the log up to it"]
