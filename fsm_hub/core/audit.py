"""Audit of a whole log in one streaming pass: every stream gapless, every transition legal and
continuous, the hash chain unbroken, every stored snapshot equal to the fold at its seq.

Memory is O(instances): the events go by once and are not kept.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fsm_hub.core.chain import GENESIS, link
from fsm_hub.core.events import EventType, StoredEvent, decode_object
from fsm_hub.core.machine import legal_targets
from fsm_hub.core.view import SNAPSHOT_FORMAT, Fold, View

_MAX_REPORTED = 20
_DECODED_CACHE = 4096
"""Distinct transition payloads kept decoded during one audit (memory stays bounded)."""
_TRANSITION = EventType.TRANSITION.value
_DISCOVERED = EventType.INSTANCE_DISCOVERED.value
SnapshotLoader = Callable[[int], "tuple[int, str] | None"]
"""seq → (format, state JSON) of the snapshot stored at that seq."""


@dataclass(slots=True)
class Audit:
    events: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    """The first problems found, in log order (at most 20), each naming its seq."""
    violation_count: int = 0
    view: View | None = None
    head_seq: int = 0
    head_hash: str | None = None
    """Hex hash of the last event, as the chain computes it (None for an empty log)."""
    first_broken_seq: int | None = None
    """The first seq at which the hash chain breaks."""
    snapshots_checked: int = 0

    def violate(self, message: str) -> None:
        self.violation_count += 1
        if len(self.violations) < _MAX_REPORTED:
            self.violations.append(message)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.violation_count == 0,
            "events": self.events,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "problems": list(self.violations),
        }


def audit(
    events: Iterable[StoredEvent],
    *,
    chain: bool = False,
    snapshots: Sequence[int] = (),
    load_snapshot: SnapshotLoader | None = None,
) -> Audit:
    """Fold the log while checking it; never raises on bad data.

    With `chain`, each event's stored hash must be the link the chain computes (events must be
    read with their hashes). `snapshots` (seqs, ascending) are each compared to the fold there.
    """
    legal = legal_targets()
    decoded: dict[str, dict[str, Any] | None] = {}
    result = Audit()
    versions: dict[str, int] = {}
    states: dict[str, str] = {}
    last_seq = 0
    previous = GENESIS
    fold = Fold()
    pending = list(snapshots)
    pending.reverse()  # pop() from the end: the next snapshot due
    by_type = result.by_type
    count = 0
    for event in events:
        count += 1
        by_type[event.type] += 1
        seq = event.seq
        if seq <= last_seq:
            result.violate(f"seq {seq} ({event.stream} v{event.version}): seq does not increase")
        last_seq = seq
        stream = event.stream
        expected = versions.get(stream, 0) + 1
        if event.version != expected:
            result.violate(f"seq {seq} ({stream} v{event.version}): version gap, expected v{expected}")
        versions[stream] = event.version
        if chain:
            computed = link(previous, seq, stream, event.version, event.type, event.at, event.data_json)
            if event.hash != computed:
                if result.first_broken_seq is None:
                    result.first_broken_seq = seq
                result.violate(
                    f"seq {seq} ({stream} v{event.version}): hash chain broken"
                    " (a row was edited, deleted, inserted or reordered here)"
                )
            # Go on from what is stored: one forged row is one problem, not all that follow.
            previous = event.hash if isinstance(event.hash, bytes) else computed
        data: dict[str, Any] | None = None
        if event.type == _TRANSITION:
            data = _transition(event, legal, states, result, decoded)
        elif event.type == _DISCOVERED:
            states.setdefault(stream, "discovered")
        fold.apply_decoded(event, data)
        while pending and pending[-1] <= seq:
            _check_snapshot(pending.pop(), seq, fold, load_snapshot, result)
    for orphan in reversed(pending):
        result.violate(f"snapshot at seq {orphan}: beyond the log's last event (seq {last_seq})")
    result.events = count
    result.head_seq = last_seq
    result.head_hash = previous.hex() if count else None
    result.view = fold.view()
    return result


def _transition(
    event: StoredEvent,
    legal: dict[tuple[str, str], frozenset[str]],
    states: dict[str, str],
    result: Audit,
    decoded: dict[str, dict[str, Any] | None],
) -> dict[str, Any] | None:
    # Payloads repeat (same event, states, reason, attempt, error): decode each text once.
    # The decoded dicts are only read, never changed; the cache is bounded.
    text = event.data_json
    try:
        data = decoded[text]
    except KeyError:
        data = decode_object(text)
        if len(decoded) >= _DECODED_CACHE:
            decoded.clear()
        decoded[text] = data
    try:
        if data is None:
            raise TypeError
        name, source, target = data["event"], data["from"], data["to"]
        allowed = legal.get((name, source), ())
    except (KeyError, TypeError):
        result.violate(f"seq {event.seq} ({event.stream} v{event.version}): malformed transition payload")
        return None
    if target not in allowed:
        where = f"seq {event.seq} ({event.stream} v{event.version})"
        result.violate(f"{where}: illegal transition {name}: {source} → {target}")
    current = states.get(event.stream, "discovered")
    if source != current:
        where = f"seq {event.seq} ({event.stream} v{event.version})"
        result.violate(f"{where}: {name} starts from {source} but the state was {current}")
    states[event.stream] = target
    return data


def _check_snapshot(
    seq: int, at_seq: int, fold: Fold, load: SnapshotLoader | None, result: Audit
) -> None:
    result.snapshots_checked += 1
    if seq != at_seq:
        result.violate(f"snapshot at seq {seq}: there is no event {seq}")
        return
    stored = load(seq) if load is not None else None
    if stored is None:
        return
    fmt, state = stored
    if fmt != SNAPSHOT_FORMAT:
        result.violate(f"snapshot at seq {seq}: format {fmt}, this fsm-hub writes {SNAPSHOT_FORMAT}")
        return
    try:
        decoded = json.loads(state)
    except ValueError:
        result.violate(f"snapshot at seq {seq}: corrupt (not JSON)")
        return
    folded = json.loads(json.dumps(fold.to_snapshot(), ensure_ascii=False))
    if decoded != folded:
        result.violate(f"snapshot at seq {seq}: differs from the fold of the log up to it")
