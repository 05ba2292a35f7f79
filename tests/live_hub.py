"""A real hub in the test's loop — store, discovery, supervisors on real (short) timers — for the
tests of what sits on top of it: MCP sessions and the HTTP endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsm_hub.core.events import StoredEvent
from fsm_hub.mcp.protocol import LATEST
from fsm_hub.mcp.session import Session
from fsm_hub.store.sqlite import EventStore
from fsm_hub.supervision.hub import Hub
from fsm_hub.supervision.supervisor import Timing

FAST = Timing(
    ping_interval=0.05,
    ping_timeout=0.1,
    ping_misses=1,
    connect_timeout=1.0,
    start_timeout=1.0,
    backoff_base=0.01,
    backoff_cap=0.02,
    retry_attempts=2,
    call_timeout=30.0,
)
"""Supervision fast enough that an instance going away is noticed within a few tenths of a second."""

CALM = dataclasses.replace(FAST, ping_interval=3600.0)
"""FAST connects, but no ping comes during a test: for tests that assert a steady state, which a
0.1 s ping timeout on a loaded machine would otherwise turn into `lost` now and then."""


@dataclass
class LiveHub:
    hub: Hub
    store: EventStore
    instances_dir: Path
    sessions: list[Session] = field(default_factory=list)

    def announce(self, instance_id: str, url: str, name: str | None = None) -> None:
        """Announce `url` without a pid: only pings tell whether it is there."""
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        document = {
            "id": instance_id,
            "name": name or instance_id,
            "directory": "/",
            "port": port,
            "url": url,
        }
        temporary = self.instances_dir / f".tmp-{instance_id}"
        temporary.write_text(json.dumps(document))
        temporary.replace(self.instances_dir / f"{instance_id}.json")

    async def reach(self, instance_id: str, state: str, timeout: float = 5.0) -> None:
        await until(lambda: self.hub.state(instance_id) == state, timeout, f"{instance_id} {state}")

    def session(
        self, session_id: str = "s1", *, initialized: bool = True
    ) -> tuple[Session, list[dict[str, Any]]]:
        """A session whose server-initiated messages land in the returned list.

        `initialized` stands for a handshake already made (requests other than initialize and
        ping are refused before it); pass False to test the handshake itself.
        """
        emitted: list[dict[str, Any]] = []
        session = Session(self.hub, session_id, emitted.append)
        if initialized:
            session.protocol_version = LATEST
        self.sessions.append(session)
        return session, emitted

    async def events(self, stream: str) -> list[StoredEvent]:
        return await self.store.read(stream=stream)

    async def kinds(self, stream: str, prefix: str = "") -> list[str]:
        return [e.type for e in await self.events(stream) if e.type.startswith(prefix)]


async def until(condition: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Wait (real time, bounded) until `condition()` is truthy."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or condition}")
        await asyncio.sleep(0.005)
