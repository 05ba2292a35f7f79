"""Hand-built event logs: known seqs, versions and times, written through the real EventStore."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fsm_hub.core.events import HUB_STREAM, StoredEvent, encode_data, format_time, transition_data
from fsm_hub.store.sqlite import EventStore

START = datetime(2026, 3, 14, 3, 14, 15, 926535, tzinfo=UTC)


@dataclass
class LogBuilder:
    """Events as the store would number them; `at` advances one `step` per event."""

    start: datetime = START
    step: timedelta = timedelta(seconds=1)
    events: list[StoredEvent] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)
    """Each instance's state after the transitions added so far."""
    versions: dict[str, int] = field(default_factory=dict)

    def add(self, stream: str, type: str, data: dict[str, Any]) -> StoredEvent:
        version = self.versions.get(stream, 0) + 1
        self.versions[stream] = version
        at = format_time(self.start + self.step * len(self.events))
        event = StoredEvent(len(self.events) + 1, stream, version, type, at, encode_data(data))
        self.events.append(event)
        return event

    def discover(self, stream: str, name: str, *, port: int = 8000, pid: int = 4242) -> StoredEvent:
        self.states.setdefault(stream, "discovered")
        data = {"name": name, "directory": f"/src/{name}", "port": port, "pid": pid,
                "url": f"http://127.0.0.1:{port}/mcp"}
        return self.add(stream, "instance_discovered", data)

    def transition(
        self, stream: str, event: str, to: str, *, attempt: int = 0, error: str | None = None,
        source: str | None = None, reason: str = "test",
    ) -> StoredEvent:
        source = source if source is not None else self.states.get(stream, "discovered")
        self.states[stream] = to
        data = transition_data(event, source, to, reason=reason, attempt=attempt, error=error)
        return self.add(stream, "transition", data)

    def session(self, stream: str, session_id: str, *, connected: bool = True) -> StoredEvent:
        if connected:
            return self.add(stream, "session_connected", {"session_id": session_id})
        return self.add(stream, "session_disconnected", {"session_id": session_id, "reason": "closed"})

    def hub_started(self) -> StoredEvent:
        return self.add(HUB_STREAM, "hub_started", {"pid": 1, "version": "0.1.0", "instances_dir": "/run"})

    def hub_stopped(self) -> StoredEvent:
        return self.add(HUB_STREAM, "hub_stopped", {"pid": 1, "reason": "signal"})

    async def write_async(self, path: Path) -> list[StoredEvent]:
        """Append every event through a fresh EventStore whose clock gives the built times."""
        times: Iterator[datetime] = (self.start + self.step * n for n in range(len(self.events)))
        store = await EventStore.open(path, clock=lambda: next(times))
        try:
            stored = [await store.append(e.stream, e.type, e.data) for e in self.events]
        finally:
            await store.close()
        assert stored == self.events, "the store numbered the log differently than built"
        return stored

    def write(self, path: Path) -> Path:
        asyncio.run(self.write_async(path))
        return path


@dataclass(frozen=True)
class Sample:
    """A small log covering every state, sessions, an ambiguous name and an ambiguous prefix."""

    path: Path
    log: LogBuilder

    WEB = "a1b2c3d4e5f60001"
    """'web': active, one session."""
    API = "a1b2c3d4e5f60002"
    """'api': retrying after two refused connects (prefix `a1b2` is ambiguous)."""
    DOCS = "b7e8f9000000aaaa"
    """'docs': lost, then given up: dead."""
    DOCS_TOO = "b7e8f9000000bbbb"
    """Another 'docs' (the name is ambiguous), only discovered."""


def build_sample(log: LogBuilder) -> LogBuilder:
    log.hub_started()                                                   # seq 1
    log.discover(Sample.WEB, "web", port=8001)                          # 2
    log.discover(Sample.API, "api", port=8002)                          # 3
    log.transition(Sample.WEB, "connect", "connecting", attempt=1)      # 4
    log.transition(Sample.WEB, "connected", "active")                   # 5
    log.session(Sample.WEB, "session-1")                                # 6
    log.transition(Sample.API, "connect", "connecting", attempt=1)      # 7
    log.transition(Sample.API, "connect_failed", "retrying", attempt=1, error="connection refused")
    log.transition(Sample.API, "connect", "connecting", attempt=2)      # 9
    log.transition(Sample.API, "connect_failed", "retrying", attempt=2, error="connection refused")
    log.discover(Sample.DOCS, "docs", port=8003)                        # 11
    log.transition(Sample.DOCS, "connect", "connecting", attempt=1)     # 12
    log.transition(Sample.DOCS, "connected", "active")                  # 13
    log.transition(Sample.DOCS, "lost", "retrying", error="connection reset")
    log.transition(Sample.DOCS, "give_up", "dead", error="gave up")     # 15
    log.discover(Sample.DOCS_TOO, "docs", port=8004)                    # 16
    return log


def refuse_transitions_to(db: Path, state: str, why: str = "disk says no") -> None:
    """Make the log file itself refuse every transition to `state` (a real SQLite failure)."""
    with sqlite3.connect(db) as connection:
        connection.execute(
            f"CREATE TRIGGER refuse_{state} BEFORE INSERT ON events"
            f" WHEN NEW.type = 'transition' AND json_extract(NEW.data, '$.to') = '{state}'"
            f" BEGIN SELECT RAISE(ABORT, '{why}'); END"
        )


def accept_transitions_to(db: Path, state: str) -> None:
    with sqlite3.connect(db) as connection:
        connection.execute(f"DROP TRIGGER refuse_{state}")
