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

from fsm_hub.core.chain import GENESIS, link_labelled, stream_label
from fsm_hub.core.events import EventType, StoredEvent, decode_object
from fsm_hub.core.machine import legal_targets
from fsm_hub.core.view import SNAPSHOT_FORMAT, Fold, View, transition_effect

_MAX_REPORTED = 20
_DECODED_CACHE = 4096
"""Distinct transition payloads kept checked during one audit (memory stays bounded)."""
_TRANSITION = EventType.TRANSITION.value
SnapshotLoader = Callable[[int], "tuple[int, str] | None"]
"""seq → (format, state JSON) of the snapshot stored at that seq."""
Row = tuple[int, str, int, str, str, str, bytes | None]
"""An event as the log stores it: seq, stream, version, type, at, data (JSON text), hash."""


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
    rows = ((e.seq, e.stream, e.version, e.type, e.at, e.data_json, e.hash) for e in events)
    return audit_rows(rows, chain=chain, snapshots=snapshots, load_snapshot=load_snapshot)


@dataclass(slots=True)
class _Stream:
    """What the audit tracks per stream while the log goes by."""

    version: int
    state: str
    label: str
    """The stream's part of the chain's canonical bytes: `\\n<length>:<stream>\\n`."""
    instance: Any = None
    """The fold's accumulator for this stream, once it has a transition."""


def audit_rows(
    rows: Iterable[Row],
    *,
    chain: bool = False,
    snapshots: Sequence[int] = (),
    load_snapshot: SnapshotLoader | None = None,
) -> Audit:
    """`audit` over raw rows, as sqlite3 hands them over (`replay --verify`).

    The loop runs once per event, so it is kept flat: no row objects; the chain link made with
    the stream's part of its canonical bytes kept per stream; each distinct transition payload
    decoded and looked up in the legality table once (payloads repeat); the fold's per-instance
    state changed in place.
    """
    legal = legal_targets()
    effects: dict[str, _Effect] = {}
    result = Audit()
    streams: dict[str, _Stream] = {}
    fold = Fold()
    pending = list(snapshots)
    pending.reverse()  # pop() from the end: the next snapshot due
    due = pending[-1] if pending else _NEVER
    by_type: Counter[str] = Counter()
    last_seq = 0
    count = transitions = 0
    max_at = ""
    violate = result.violate
    previous = GENESIS
    first_broken: int | None = None
    for seq, stream, version, kind, at, text, stored in rows:
        count += 1
        if seq <= last_seq:
            violate(f"seq {seq} ({stream} v{version}): seq does not increase")
        last_seq = seq
        track = streams.get(stream)
        if track is None:
            track = streams[stream] = _Stream(0, "discovered", stream_label(stream))
        if version != track.version + 1:
            violate(f"seq {seq} ({stream} v{version}): version gap, expected v{track.version + 1}")
        track.version = version
        if chain:
            computed = link_labelled(previous, seq, track.label, version, kind, at, text)
            if stored != computed:
                if first_broken is None:
                    first_broken = seq
                violate(
                    f"seq {seq} ({stream} v{version}): hash chain broken"
                    " (a row was edited, deleted, inserted or reordered here)"
                )
            # Go on from what is stored: one forged row is one problem, not all that follow.
            previous = stored if isinstance(stored, bytes) else computed
        if at > max_at:
            max_at = at
        if kind == _TRANSITION:
            transitions += 1
            effect = effects.get(text)
            if effect is None:
                effect = _effect(text, legal)
                if len(effects) >= _DECODED_CACHE:
                    effects.clear()
                effects[text] = effect
            name, source, target, illegal, change = effect
            if name is None:
                violate(f"seq {seq} ({stream} v{version}): malformed transition payload")
            else:
                if illegal:
                    where = f"seq {seq} ({stream} v{version})"
                    violate(f"{where}: illegal transition {name}: {source} → {target}")
                if source != track.state:
                    violate(f"seq {seq} ({stream} v{version}): {name} starts from {source}"
                            f" but the state was {track.state}")  # fmt: skip
                track.state = target
            instance = track.instance
            if instance is None:
                instance = track.instance = fold.accumulator(stream, at)
            if change is not None:
                instance.take(at, *change)
        else:
            by_type[kind] += 1
            fold.apply((StoredEvent(seq, stream, version, kind, at, text, stored),))
        if seq >= due:
            fold.caught_up(events=count, last_seq=seq, max_at=max_at, head_hash=stored)
            while pending and pending[-1] <= seq:
                _check_snapshot(pending.pop(), seq, fold, load_snapshot, result)
            due = pending[-1] if pending else _NEVER
    for orphan in reversed(pending):
        violate(f"snapshot at seq {orphan}: beyond the log's last event (seq {last_seq})")
    if transitions:
        by_type[_TRANSITION] = transitions
    result.first_broken_seq = first_broken
    result.by_type = by_type
    result.events = count
    result.head_seq = last_seq
    result.head_hash = previous.hex() if count else None
    if count:
        fold.caught_up(events=count, last_seq=last_seq, max_at=max_at, head_hash=stored)
    result.view = fold.view()
    return result


_NEVER = 1 << 62
"""A seq no log reaches (an int: comparing each row's int seq with a float costs)."""
_Effect = tuple[str | None, str, str, bool, tuple[str, int, str | None] | None]
"""A transition payload, checked once: (event, from, to, illegal?, its effect on the fold)."""


def _effect(text: str, legal: dict[tuple[str, str], frozenset[str]]) -> _Effect:
    data = decode_object(text)
    change = None if data is None else transition_effect(data)
    try:
        if data is None:
            raise TypeError
        name, source, target = data["event"], data["from"], data["to"]
        allowed = legal.get((name, source), ())
    except (KeyError, TypeError):
        return None, "", "", False, change
    return name, source, target, target not in allowed, change


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
    folded = fold.to_snapshot()
    # The hub writes snapshots in exactly this encoding: equal text is equal state (fast path).
    if json.dumps(folded, ensure_ascii=False, separators=(",", ":")) == state:
        return
    try:
        decoded = json.loads(state)
    except ValueError:
        result.violate(f"snapshot at seq {seq}: corrupt (not JSON)")
        return
    if decoded != json.loads(json.dumps(folded, ensure_ascii=False)):
        result.violate(f"snapshot at seq {seq}: differs from the fold of the log up to it")
