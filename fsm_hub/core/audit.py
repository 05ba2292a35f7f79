"""Audit of a whole log: every stream gapless, every transition legal and continuous."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from fsm_hub.core.events import EventType, StoredEvent
from fsm_hub.core.machine import legal_targets
from fsm_hub.core.view import Fold, View

_MAX_REPORTED = 20


@dataclass(slots=True)
class Audit:
    events: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    view: View | None = None

    def violate(self, message: str) -> None:
        self.violation_count += 1
        if len(self.violations) < _MAX_REPORTED:
            self.violations.append(message)


def audit(events: Iterable[StoredEvent]) -> Audit:
    """Fold the log while checking it against the machine; never raises on bad data."""
    legal = legal_targets()
    result = Audit()
    versions: dict[str, int] = {}
    states: dict[str, str] = {}
    last_seq = 0
    fold = Fold()
    for event in events:
        result.events += 1
        result.by_type[event.type] += 1
        where = f"seq {event.seq} ({event.stream} v{event.version})"
        if event.seq <= last_seq:
            result.violate(f"{where}: seq does not increase")
        last_seq = event.seq
        expected = versions.get(event.stream, 0) + 1
        if event.version != expected:
            result.violate(f"{where}: version gap, expected v{expected}")
        versions[event.stream] = event.version
        if event.type == EventType.INSTANCE_DISCOVERED:
            states.setdefault(event.stream, "discovered")
        elif event.type == EventType.TRANSITION:
            try:
                data = event.data
                name, source, target = data["event"], data["from"], data["to"]
            except (ValueError, KeyError, TypeError):
                result.violate(f"{where}: malformed transition payload")
                continue
            if target not in legal.get((name, source), ()):
                result.violate(f"{where}: illegal transition {name}: {source} → {target}")
            current = states.get(event.stream, "discovered")
            if source != current:
                result.violate(f"{where}: {name} starts from {source} but the state was {current}")
            states[event.stream] = target
        fold.apply((event,))
    result.view = fold.view()
    return result
