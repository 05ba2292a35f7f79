"""The event log on SQLite: one writer task with group commit, and plain readers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from fsm_hub.core.audit import Audit, audit, audit_rows
from fsm_hub.core.chain import GENESIS, link_labelled, stream_label
from fsm_hub.core.events import (
    HUB_STREAM,
    NewEvent,
    StoredEvent,
    encode_data,
    format_time,
    storable,
    utc_now,
)
from fsm_hub.core.view import SNAPSHOT_FORMAT, Fold, View, resolve
from fsm_hub.errors import ConcurrencyError, StoreError
from fsm_hub.store.port import EventReader, EventWriter
from fsm_hub.store.schema import check_header, create_file, prepare
from fsm_hub.store.snapshots import (
    Folded,
    load_fold,
    snapshot_state,
    stored_snapshots,
)

_INSERT = "INSERT INTO events (seq, stream, version, type, at, data, hash) VALUES (?, ?, ?, ?, ?, ?, ?)"
_SAVE_SNAPSHOT = (
    "INSERT OR REPLACE INTO snapshots (seq, format, head_hash, max_at, taken_at, state)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
_HEAD = "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1"
_PRUNE_SNAPSHOTS = (
    "DELETE FROM snapshots WHERE seq < (SELECT seq FROM snapshots ORDER BY seq DESC LIMIT 1 OFFSET ?)"
)
KEEP_SNAPSHOTS = 3
"""Snapshots kept: the newest few (`instances --at` an older moment folds from the start)."""
_COLUMNS = "seq, stream, version, type, at, data"
_VERIFY = "SELECT seq, stream, version, type, at, data, hash FROM events ORDER BY seq"

log = logging.getLogger(__name__)
Subscriber = Callable[[Sequence[StoredEvent]], None]


def default_db_path(env: dict[str, str] | os._Environ[str] | None = None) -> Path:
    """`$FSM_HUB_DB`, else `$XDG_STATE_HOME/fsm-hub/events.db`, else `~/.local/state/…`."""
    env = os.environ if env is None else env
    if env.get("FSM_HUB_DB"):
        return Path(env["FSM_HUB_DB"]).expanduser()
    state = env.get("XDG_STATE_HOME") or ""
    base = Path(state) if Path(state).is_absolute() else Path.home() / ".local" / "state"
    return base / "fsm-hub" / "events.db"


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating owner-only if missing) and migrate; raises one-line StoreErrors."""
    create_file(path)
    check_header(path)
    try:
        connection = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open event log {path}: {exc}") from None
    try:
        prepare(connection, path)
        connection.execute("PRAGMA journal_mode=WAL")
    except BaseException:
        connection.close()
        raise
    return connection


def select_events(
    *, stream: str | None = None, until: str | None = None, last: int | None = None
) -> tuple[str, tuple[Any, ...]]:
    """SQL for events in log order, optionally one stream's, up to a moment, or its last N."""
    where: list[str] = []
    params: list[Any] = []
    if stream is not None:
        where.append("stream = ?")
        params.append(stream)
    if until is not None:
        where.append("at <= ?")
        params.append(until)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    if last is not None:
        order = "version" if stream is not None else "seq"
        sql = (
            f"SELECT * FROM (SELECT {_COLUMNS} FROM events{clause} ORDER BY {order} DESC"
            f" LIMIT ?) ORDER BY seq"
        )
        params.append(last)
    else:
        sql = f"SELECT {_COLUMNS} FROM events{clause} ORDER BY seq"
    return sql, tuple(params)


class EventLog:
    """Read side for commands: a plain sqlite3 connection, no writer, no task."""

    def __init__(self, path: Path, connection: sqlite3.Connection | None) -> None:
        self.path = path
        self._connection = connection

    @classmethod
    def open(cls, path: Path) -> EventLog:
        """A missing file reads as an empty log and is not created."""
        if not path.exists():
            return cls(path, None)
        return cls(path, _connect(path))

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def events(
        self,
        *,
        stream: str | None = None,
        until: datetime | None = None,
        last: int | None = None,
    ) -> Iterator[StoredEvent]:
        if self._connection is None:
            return iter(())
        sql, params = select_events(
            stream=stream, until=format_time(until) if until else None, last=last
        )
        try:
            cursor = self._connection.execute(sql, params)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read event log {self.path}: {exc}") from None
        return (StoredEvent(*row) for row in cursor)

    def fold(self, *, until: datetime | None = None) -> View:
        """The view (as it was at `until`), from the newest usable snapshot plus the events after it."""
        if self._connection is None:
            return Fold().view()
        try:
            return load_fold(self._connection, until=format_time(until) if until else None).fold.view()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read event log {self.path}: {exc}") from None

    def verify(self) -> Audit:
        """`replay --verify`: one streaming pass over the log, chain and snapshots included."""
        if self._connection is None:
            return audit(())
        db = self._connection
        try:
            seqs = stored_snapshots(db)
            return audit_rows(
                db.execute(_VERIFY),
                chain=True,
                snapshots=seqs,
                load_snapshot=lambda seq: snapshot_state(db, seq),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read event log {self.path}: {exc}") from None

    def count(self) -> int:
        if self._connection is None:
            return 0
        return int(self._connection.execute("SELECT count(*) FROM events").fetchone()[0])

    def resolve(self, ref: str) -> str:
        """The stream `ref` names (full id, unique id prefix, unique name, or `hub`).

        Uses the indexes only, so it stays fast on a log of millions of events.
        """
        if ref == HUB_STREAM or self._connection is None:
            return resolve(ref, [HUB_STREAM] if ref == HUB_STREAM else [], {})
        db = self._connection
        if db.execute("SELECT 1 FROM events WHERE stream = ? LIMIT 1", (ref,)).fetchone():
            return ref
        names: dict[str, str] = {}
        for stream, data in db.execute(
            "SELECT stream, data FROM events INDEXED BY events_announcements"
            " WHERE type IN ('instance_discovered', 'instance_updated') ORDER BY seq"
        ):
            name = json.loads(data).get("name")
            if isinstance(name, str):
                names[stream] = name
        prefixed = [
            row[0]
            for row in db.execute(
                "SELECT DISTINCT stream FROM events WHERE stream >= ? AND stream < ?",
                (ref, ref + "\U0010ffff"),
            )
            if row[0] != HUB_STREAM
        ]
        return resolve(ref, prefixed, names)


@dataclass(slots=True)
class _Pending:
    stream: str
    type: str
    at: str
    data_json: str
    expected_version: int | None
    future: asyncio.Future[StoredEvent]
    retried: bool = False


@dataclass(slots=True)
class _Batch:
    rows: list[tuple[int, str, int, str, str, str, bytes]] = field(default_factory=list)
    pending: list[_Pending] = field(default_factory=list)


class EventStore:
    """Appends events through exactly one writer task; an append resolves after its commit.

    Producers put events on a list and wake the writer; the writer takes everything queued,
    writes it with one executemany in one transaction (group commit), then resolves each
    producer's future. Under load a transaction holds as many events as arrived meanwhile.
    """

    def __init__(
        self, path: Path, connection: aiosqlite.Connection, clock: Callable[[], datetime]
    ) -> None:
        self.path = path
        self._db = connection
        self._clock = clock
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._versions: dict[str, int] = {}
        self._labels: dict[str, str] = {}
        """Each stream's part of the chain's canonical bytes (`chain.stream_label`), kept."""
        self._seq = 0
        self._head = GENESIS
        self._snapshot: tuple[int, int, bytes, str, str, str] | None = None
        self._subscribers: list[Subscriber] = []
        self._reader: aiosqlite.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, path: Path, *, clock: Callable[[], datetime] = utc_now
    ) -> EventStore:
        path = Path(path)
        await asyncio.to_thread(lambda: _connect(path).close())
        try:
            connection = await aiosqlite.connect(path)
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute("PRAGMA synchronous=FULL")  # durable commits
            await connection.execute("PRAGMA busy_timeout=5000")
            rows = list(await connection.execute_fetchall(_HEAD))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open event log {path}: {exc}") from None
        store = cls(path, connection, clock)
        store._set_head(rows)
        store._task = asyncio.create_task(store._run(), name="fsm-hub-writer")
        return store

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call `subscriber` with every committed batch, in log order, before acks resolve."""
        self._subscribers.append(subscriber)

    @property
    def last_seq(self) -> int:
        return self._seq

    def _set_head(self, rows: Sequence[Any]) -> None:
        if rows:
            self._seq, self._head = int(rows[0][0]), rows[0][1] or GENESIS
        else:
            self._seq, self._head = 0, GENESIS

    def save_snapshot(self, fold: Fold) -> None:
        """Have the writer store `fold`'s state, which must be the log up to its head, in turn.

        Only the latest request is kept; a snapshot is derived data, so a failure is logged only.
        """
        head = fold.head_hash
        if head is None or fold.last_seq == 0:
            return
        state = json.dumps(fold.to_snapshot(), ensure_ascii=False, separators=(",", ":"))
        taken = format_time(self._clock())
        self._snapshot = (fold.last_seq, SNAPSHOT_FORMAT, head, fold.max_at, taken, storable(state))
        self._wakeup.set()

    def append(
        self,
        stream: str,
        type: str,
        data: dict[str, Any],
        *,
        expected_version: int | None = None,
    ) -> asyncio.Future[StoredEvent]:
        """Queue one event; the returned future resolves once its transaction has committed.

        With `expected_version`, the append fails with ConcurrencyError unless the stream's
        last version is exactly that (0 for a new stream).
        """
        if self._closing:
            raise StoreError("the event store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[StoredEvent] = loop.create_future()
        self._queue.append(
            _Pending(
                storable(stream),
                storable(type),
                format_time(self._clock()),
                storable(encode_data(data)),
                expected_version,
                future,
            )
        )
        self._wakeup.set()
        return future

    async def append_all(self, events: Sequence[NewEvent]) -> list[StoredEvent]:
        futures = [self.append(e.stream, e.type, e.data) for e in events]
        return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        """Write everything already queued, then stop the writer and close the connections."""
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._reader is not None:
            await self._reader.close()
        await self._db.close()

    # -- the writer ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._queue and self._snapshot is not None:
                snapshot, self._snapshot = self._snapshot, None
                await self._write_snapshot(snapshot)
                continue
            if not self._queue:
                if self._closing:
                    return
                # Cleared only once the queue is seen empty: a wakeup can never be lost.
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            queued, self._queue = self._queue, []
            try:
                await self._write(queued)
            except Exception as exc:  # never die with producers waiting: fail their appends
                log.exception("event log writer failed")
                for pending in queued:
                    _fail(pending, StoreError(f"cannot write event log {self.path}: {exc}"))

    async def _write(self, queued: list[_Pending]) -> None:
        batch = await self._number(queued)
        if not batch.rows:
            return
        try:
            # One hop to the connection's thread for both statements, not one each: a durable
            # commit per batch bounds the writer, and each hop adds a wake-up to every batch.
            # aiosqlite has no public call for it; `_execute` is what its own methods use.
            db = self._db
            await db._execute(_insert_and_commit, db._conn, batch.rows)  # type: ignore[no-untyped-call]
        except Exception as exc:
            await self._forget_positions()
            await self._isolate(batch, exc)
            return
        stored = [StoredEvent(*row) for row in batch.rows]
        for subscriber in self._subscribers:
            try:
                subscriber(stored)
            except Exception:  # a broken reader must not stop the log: the events are committed
                log.exception("event log subscriber failed")
        for pending, event in zip(batch.pending, stored, strict=True):
            if not pending.future.done():
                pending.future.set_result(event)

    async def _write_snapshot(self, snapshot: tuple[int, int, bytes, str, str, str]) -> None:
        try:
            await self._db.execute(_SAVE_SNAPSHOT, snapshot)
            await self._db.execute(_PRUNE_SNAPSHOTS, (KEEP_SNAPSHOTS - 1,))
            await self._db.commit()
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                await self._db.rollback()
            log.warning("fsm-hub: could not save a snapshot of %s at seq %d: %s", self.path, snapshot[0], exc)

    async def _isolate(self, batch: _Batch, error: Exception) -> None:
        """After a failed transaction: write its events one by one, so a bad one fails alone.

        A blind append that lost a race for its stream version is numbered again once.
        """
        if len(batch.pending) > 1:
            for pending in batch.pending:
                await self._write([pending])
            return
        [pending] = batch.pending
        if _is_version_conflict(error):
            if pending.expected_version is None and not pending.retried:
                pending.retried = True
                await self._write([pending])
            else:
                stream = pending.stream
                _fail(pending, ConcurrencyError(f"stream {stream!r} was appended to meanwhile"))
            return
        _fail(pending, StoreError(f"cannot write event log {self.path}: {error}"))

    async def _number(self, queued: list[_Pending]) -> _Batch:
        """Give each queued event its seq and stream version; refuse stale expectations."""
        unknown = {p.stream for p in queued} - self._versions.keys()
        if unknown:
            await self._load_versions(unknown)
        batch = _Batch()
        rows, numbered = batch.rows, batch.pending
        versions, seq, head, labels = self._versions, self._seq, self._head, self._labels
        for pending in queued:
            stream = pending.stream
            current = versions[stream]
            expected = pending.expected_version
            if expected is not None and expected != current:
                _fail(
                    pending,
                    ConcurrencyError(f"stream {stream!r} is at version {current}, not {expected}"),
                )
                continue
            seq += 1
            version = versions[stream] = current + 1
            kind, at, data = pending.type, pending.at, pending.data_json
            label = labels.get(stream)
            if label is None:
                label = labels[stream] = stream_label(stream)
            head = link_labelled(head, seq, label, version, kind, at, data)
            rows.append((seq, stream, version, kind, at, data, head))
            numbered.append(pending)
        self._seq, self._head = seq, head
        return batch

    async def _load_versions(self, streams: set[str]) -> None:
        ordered = sorted(streams)
        marks = ",".join("?" * len(ordered))
        sql = f"SELECT stream, max(version) FROM events WHERE stream IN ({marks}) GROUP BY stream"
        found = {stream: int(v) for stream, v in await self._db.execute_fetchall(sql, ordered)}
        for stream in ordered:
            self._versions[stream] = found.get(stream, 0)

    async def _forget_positions(self) -> None:
        """Roll back and re-read where the log ends: the cached positions may be wrong now."""
        with contextlib.suppress(sqlite3.Error):
            await self._db.rollback()
        self._versions.clear()
        self._set_head(list(await self._db.execute_fetchall(_HEAD)))

    # -- reads for the live hub ---------------------------------------------------------------

    async def load_fold(self) -> Folded:
        """The fold of the whole log, from its newest usable snapshot plus the events after it."""

        def load() -> Folded:
            connection = sqlite3.connect(self.path)
            try:
                return load_fold(connection)
            finally:
                connection.close()

        try:
            return await asyncio.to_thread(load)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read event log {self.path}: {exc}") from None

    async def read(
        self, *, stream: str | None = None, until: str | None = None, last: int | None = None
    ) -> list[StoredEvent]:
        """Committed events, through a separate read connection so reads never block writes."""
        if self._reader is None:
            self._reader = await aiosqlite.connect(self.path)
        sql, params = select_events(stream=stream, until=until, last=last)
        rows = await self._reader.execute_fetchall(sql, params)
        return [StoredEvent(*row) for row in rows]


def _insert_and_commit(connection: sqlite3.Connection, rows: list[Any]) -> None:
    """One batch, one transaction (sqlite3 opens it at the INSERT): runs on aiosqlite's thread."""
    connection.executemany(_INSERT, rows)
    connection.commit()


def _is_version_conflict(error: Exception) -> bool:
    """Another writer took the seq or the stream version first (not a trigger, not a CHECK)."""
    return isinstance(error, sqlite3.IntegrityError) and "UNIQUE constraint failed: events." in str(error)


def _fail(pending: _Pending, error: Exception) -> None:
    if not pending.future.done():  # the producer may have given up waiting
        pending.future.set_exception(error)


def _conforms(log: EventLog, store: EventStore) -> tuple[EventReader, EventWriter]:
    return log, store  # mypy checks that both classes provide their port
