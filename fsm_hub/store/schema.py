"""Opening an event log file safely: recognise it, refuse foreign files, apply migrations."""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from fsm_hub.core.chain import GENESIS, link
from fsm_hub.errors import NotAnEventLog, SchemaTooNew, StoreError

APPLICATION_ID = 0x46534D48  # 'FSMH', set by migration 0001
SQLITE_MAGIC = b"SQLite format 3\x00"
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The numbered `.sql` files, in order: packaged in the wheel, or beside the source tree."""
    packaged = resources.files("fsm_hub").joinpath("migrations")
    found: list[Migration] = []
    if packaged.is_dir():
        entries = [(e.name, e.read_text(encoding="utf-8")) for e in packaged.iterdir()]
    else:
        source = Path(__file__).resolve().parents[2] / "migrations"
        entries = [(p.name, p.read_text(encoding="utf-8")) for p in source.iterdir()]
    for name, sql in entries:
        match = _MIGRATION_NAME.match(name)
        if match:
            found.append(Migration(int(match.group(1)), name, sql))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise StoreError("fsm-hub is installed without a gapless set of migrations")
    return found


def latest_version() -> int:
    return len(migrations())


def create_file(path: Path) -> None:
    """Create the log file owner-only before SQLite does (SQLite copies its mode to -wal/-shm)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StoreError(f"cannot create event log {path}: {exc.strerror}") from None
    os.close(fd)


def check_header(path: Path) -> None:
    """Refuse garbage before SQLite sees it: an empty file is a new log, anything else must be SQLite."""
    try:
        with path.open("rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise StoreError(f"cannot read event log {path}: {exc.strerror}") from None
    if head and head != SQLITE_MAGIC:
        raise NotAnEventLog(f"{path} is not an fsm-hub event log (not a SQLite database)")


def prepare(connection: sqlite3.Connection, path: Path) -> int:
    """Check the db is ours (or empty) and bring its schema up to date; return its version."""
    try:
        app_id = connection.execute("PRAGMA application_id").fetchone()[0]
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        tables = connection.execute(
            "SELECT count(*) FROM sqlite_master WHERE type IN ('table', 'view')"
        ).fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise NotAnEventLog(f"{path} is not an fsm-hub event log ({exc})") from None
    if app_id != APPLICATION_ID and (app_id != 0 or tables or version):
        raise NotAnEventLog(
            f"{path} is a SQLite database of another program, not an fsm-hub event log;"
            " left untouched"
        )
    known = migrations()
    if version > len(known):
        raise SchemaTooNew(
            f"{path} has schema version {version}, newer than this fsm-hub understands"
            f" ({len(known)}); upgrade fsm-hub"
        )
    for migration in known[version:]:
        apply(connection, migration)
    return len(known)


def backfill_hash_chain(connection: sqlite3.Connection) -> None:
    """Migration 0002's data step: chain the rows already in the log, in seq order."""
    previous, after = GENESIS, 0
    while True:
        rows = connection.execute(
            "SELECT seq, stream, version, type, at, data FROM events WHERE seq > ? ORDER BY seq LIMIT 10000",
            (after,),
        ).fetchall()
        if not rows:
            return
        hashes = []
        for row in rows:
            previous = link(previous, *row)
            hashes.append((previous, row[0]))
        connection.executemany("UPDATE events SET hash = ? WHERE seq = ?", hashes)
        after = rows[-1][0]


DATA_STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {2: backfill_hash_chain}
"""Migrations whose data SQL alone cannot compute, run in the migration's transaction."""


def apply(connection: sqlite3.Connection, migration: Migration) -> None:
    applied_at = datetime.now(UTC).isoformat(timespec="microseconds")
    script = (
        "BEGIN IMMEDIATE;\n"
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL);\n"
        f"{migration.sql}\n;\n"
    )
    try:
        connection.executescript(script)  # leaves its transaction open for the steps below
        step = DATA_STEPS.get(migration.version)
        if step is not None:
            step(connection)
        connection.execute(
            "INSERT INTO schema_migrations VALUES (?, ?, ?)",
            (migration.version, migration.name, applied_at),
        )
        connection.execute(f"PRAGMA user_version = {migration.version}")
        connection.execute("COMMIT")
    except sqlite3.Error as exc:
        if connection.in_transaction:
            connection.rollback()
        raise StoreError(f"migration {migration.name} failed: {exc}") from None
