"""The store's ports: what the hub and the commands need of an event log, whatever holds it.

`fsm_hub.store.sqlite` provides both; tests/store/test_store.py's `EventStoreContract` is the
contract any other backend runs unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, Protocol

from fsm_hub.core.audit import Audit
from fsm_hub.core.events import StoredEvent
from fsm_hub.core.view import Fold, View
from fsm_hub.store.snapshots import Folded


class EventWriter(Protocol):
    """Appends events through one writer; an append resolves once it is durable."""

    @property
    def last_seq(self) -> int:
        """The seq of the last event committed (or numbered) by this writer."""
        ...

    def append(
        self, stream: str, type: str, data: dict[str, Any], *, expected_version: int | None = None
    ) -> asyncio.Future[StoredEvent]:
        """Queue one event; the future resolves after its commit, or fails for this event alone."""
        ...

    def subscribe(self, subscriber: Callable[[Sequence[StoredEvent]], None]) -> None:
        """Be called with every committed batch, in log order, before its appends resolve."""
        ...

    def save_snapshot(self, fold: Fold) -> None:
        """Store `fold` (the log up to its head) as derived data; failures are only logged."""
        ...

    async def load_fold(self) -> Folded:
        """The fold of the whole log, from its newest usable snapshot plus the tail."""
        ...

    async def read(
        self, *, stream: str | None = None, until: str | None = None, last: int | None = None
    ) -> list[StoredEvent]:
        """Committed events in log order, without blocking the writer."""
        ...

    async def close(self) -> None:
        """Write what is queued, then stop."""
        ...


class EventReader(Protocol):
    """Reads a log for commands: no writer, no task."""

    def events(
        self, *, stream: str | None = None, until: datetime | None = None, last: int | None = None
    ) -> Iterator[StoredEvent]:
        """Events in log order, streamed."""
        ...

    def fold(self, *, until: datetime | None = None) -> View:
        """The view now (or at `until`), from a snapshot plus the tail."""
        ...

    def verify(self) -> Audit:
        """One streaming pass: versions, legality, the hash chain, the snapshots."""
        ...

    def resolve(self, ref: str) -> str:
        """The stream a full id, unique id prefix, unique name or `hub` names."""
        ...
