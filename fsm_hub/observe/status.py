"""Is a hub running on this log, and what does the log hold? Read without touching either.

A hub is running when the owner file `<db>.owner.json` names a live process; the log tells
when it started, and `hub_stopped` (or its absence after a crash) when it ended.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsm_hub.core.events import EventType, StoredEvent
from fsm_hub.core.view import View
from fsm_hub.discovery.directory import process_is_running
from fsm_hub.observe.presence import serving
from fsm_hub.serve.ownership import Owner, Ownership


def running_owner(db: Path) -> Owner | None:
    """The owner advertised for `db`, if its process is alive."""
    owner = Ownership(db).read()
    return owner if owner is not None and process_is_running(owner.pid) else None


@dataclass(frozen=True, slots=True)
class HubRun:
    """The latest hub run the log records."""

    pid: int | None
    started_at: str | None
    stopped_at: str | None
    """`hub_stopped` time; None while it runs, or if it ended without one (killed)."""
    stop_reason: str | None
    last_event_at: str | None
    version: str | None
    instances_dir: str | None


def latest_run(hub_events: list[StoredEvent], last_event_at: str | None) -> HubRun:
    started: StoredEvent | None = None
    stopped: StoredEvent | None = None
    for event in hub_events:
        if event.type == EventType.HUB_STARTED:
            started, stopped = event, None
        elif event.type == EventType.HUB_STOPPED:
            stopped = event
    data = started.data if started else {}
    return HubRun(
        pid=data.get("pid"),
        started_at=started.at if started else None,
        stopped_at=stopped.at if stopped else None,
        stop_reason=stopped.data.get("reason") if stopped else None,
        last_event_at=last_event_at,
        version=data.get("version"),
        instances_dir=data.get("instances_dir"),
    )


def stopped_note(run: HubRun) -> str:
    """The line `instances` prints when no hub runs: states are as of the hub's end."""
    if run.started_at is None:
        return "no hub has run on this log yet"
    if run.stopped_at is not None:
        return f"no hub is running; hub stopped at {run.stopped_at}: states as of then"
    return (
        f"no hub is running; the last one (pid {run.pid}) ended without recording a stop:"
        f" states as of its last event at {run.last_event_at}"
    )


def head_hash(db: Path) -> str | None:
    """The hash of the newest event, for logs that chain hashes (older logs have none)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
            columns = {row[1] for row in connection.execute("PRAGMA table_info(events)")}
            if "hash" not in columns:
                return None
            row = connection.execute("SELECT hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return None
    if not row or row[0] is None:
        return None
    value = row[0]
    return value.hex() if isinstance(value, bytes) else str(value)


def status(db: Path, view: View, run: HubRun, owner: Owner | None) -> dict[str, Any]:
    """The `fsm-hub status --json` document."""
    size = sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
    processes = serving(db) if owner is not None else []
    mine = next((p for p in processes if owner is not None and p.pid == owner.pid), None)
    return {
        "hub": {
            "running": owner is not None,
            "pid": owner.pid if owner else None,
            "since": run.started_at if owner else None,
            "endpoint": owner.url if owner else None,
            "serves": list(mine.endpoints) if mine else [],
            "attached": [p.to_json() for p in processes if owner is not None and p.pid != owner.pid],
            "version": run.version,
            "instances_dir": run.instances_dir,
            "last_pid": run.pid,
            "last_started_at": run.started_at,
            "last_stopped_at": run.stopped_at,
            "last_stop_reason": run.stop_reason,
        },
        "instances": {"total": len(view.instances), "by_state": dict(sorted(view.count_by_state().items()))},
        "log": {
            "path": str(db),
            "bytes": size,
            "events": view.events,
            "last_seq": view.last_seq,
            "last_event_at": run.last_event_at,
            "head_hash": head_hash(db),
        },
    }

