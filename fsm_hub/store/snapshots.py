"""Reading the fold from a log file: the newest usable snapshot, then the events after it.

A snapshot is derived data. One that is unreadable, of another format, or not of this log's
history (its head hash differs from the event at its seq) is skipped with a warning, and the
next older one (or the whole log) is folded instead: no answer changes, only the speed.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import starmap

from fsm_hub.core.events import StoredEvent
from fsm_hub.core.view import SNAPSHOT_FORMAT, Fold

SNAPSHOT_EVERY = 10_000
"""Events between two snapshots of the live hub (and one more on every clean stop)."""

_COLUMNS_HASHED = "seq, stream, version, type, at, data, hash"
log = logging.getLogger(__name__)
Warn = Callable[[str], None]


@dataclass(slots=True)
class Folded:
    fold: Fold
    snapshot_seq: int
    """The seq of the snapshot folded from (0: the whole log was folded)."""
    ignored: int
    """Snapshots skipped as unusable (each with a warning)."""
    tail: int
    """Events folded after the snapshot."""


def has_snapshots(connection: sqlite3.Connection) -> bool:
    found = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'snapshots'"
    ).fetchone()
    return found is not None


def load_fold(
    connection: sqlite3.Connection, *, until: str | None = None, warn: Warn = log.warning
) -> Folded:
    """The fold of every event (with `at` ≤ `until`, if given), from a snapshot where one fits."""
    fold, since, ignored = Fold(), 0, 0
    if has_snapshots(connection):
        candidates = connection.execute(
            "SELECT seq FROM snapshots WHERE ? IS NULL OR max_at <= ? ORDER BY seq DESC", (until, until)
        ).fetchall()
        for (seq,) in candidates:
            problem, restored = check_snapshot(connection, seq)
            if restored is not None:
                fold, since = restored, seq
                break
            ignored += 1
            warn(f"warning: snapshot at seq {seq} ignored ({problem})")
    where = "seq > ?" + ("" if until is None else " AND at <= ?")
    params: tuple[object, ...] = (since,) if until is None else (since, until)
    before = fold.events
    sql = f"SELECT {_COLUMNS_HASHED} FROM events WHERE {where} ORDER BY seq"
    fold.apply(StoredEvent(*row) for row in connection.execute(sql, params))
    return Folded(fold, since, ignored, fold.events - before)


def check_snapshot(connection: sqlite3.Connection, seq: int) -> tuple[str, Fold | None]:
    """(why it is unusable, None), or ('', the fold it holds)."""
    row = connection.execute(
        "SELECT s.format, s.state, s.head_hash, e.hash FROM snapshots s"
        " LEFT JOIN events e ON e.seq = s.seq WHERE s.seq = ?",
        (seq,),
    ).fetchone()
    if row is None:
        return "gone", None
    fmt, state, head_hash, event_hash = row
    if fmt != SNAPSHOT_FORMAT:
        return f"format {fmt}, this fsm-hub writes {SNAPSHOT_FORMAT}", None
    if event_hash is None or head_hash != event_hash:
        return "not of this log's history", None
    try:
        restored = Fold.from_snapshot(json.loads(state))
    except (ValueError, TypeError) as exc:
        return f"corrupt: {exc}", None
    if restored.last_seq != seq:
        return f"corrupt: it says seq {restored.last_seq}", None
    restored.head_hash = event_hash
    return "", restored


def stored_snapshots(connection: sqlite3.Connection) -> list[int]:
    """The seqs that have a snapshot (small: one per SNAPSHOT_EVERY events)."""
    if not has_snapshots(connection):
        return []
    return [row[0] for row in connection.execute("SELECT seq FROM snapshots ORDER BY seq")]


def snapshot_state(connection: sqlite3.Connection, seq: int) -> tuple[int, str] | None:
    row = connection.execute("SELECT format, state FROM snapshots WHERE seq = ?", (seq,)).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def hashed_events(connection: sqlite3.Connection) -> Iterator[StoredEvent]:
    """Every event with its hash, in seq order, streamed (never the whole log in memory)."""
    return starmap(StoredEvent, connection.execute(f"SELECT {_COLUMNS_HASHED} FROM events ORDER BY seq"))
