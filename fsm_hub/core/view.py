"""The current view, never stored: a pure fold over the event log.

The live hub, the MCP tools and every CLI command read this one fold. Folding a prefix of the
log gives the view as it was at that moment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fsm_hub.core.events import EventType, StoredEvent, decode_object
from fsm_hub.errors import AmbiguousInstance, UnknownInstance

_TRANSITION = EventType.TRANSITION.value
_DISCOVERED = EventType.INSTANCE_DISCOVERED.value
_UPDATED = EventType.INSTANCE_UPDATED.value
_SESSION_CONNECTED = EventType.SESSION_CONNECTED.value
_SESSION_DISCONNECTED = EventType.SESSION_DISCONNECTED.value
_HUB_STARTED = EventType.HUB_STARTED.value
_HUB_STOPPED = EventType.HUB_STOPPED.value
_PROCESS_SPAWNED = EventType.PROCESS_SPAWNED.value
_ORPHAN_ENDED = EventType.ORPHAN_ENDED.value
_ANNOUNCED = ("name", "directory", "port", "url", "pid", "kind", "source")


@dataclass(frozen=True, slots=True)
class InstanceView:
    id: str
    name: str
    directory: str
    port: int | None
    url: str | None
    pid: int | None
    state: str
    since: str
    """Time of the last transition (or of discovery, before any)."""
    retry_count: int
    """Connect attempts since the instance was last active."""
    last_error: str | None
    """Error of the latest failure; cleared once the instance is active again."""
    sessions: tuple[str, ...]
    """Ids of the MCP sessions bound to this instance."""
    kind: str = "announced"
    """`announced` (an instance file), `stdio` or `http` (a configured server)."""
    source: str = ""
    """The instances directory or the config file it comes from."""
    child: tuple[int, str] | None = None
    """A configured stdio server's last spawned child: (pid, identity), until an orphan end."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "directory": self.directory,
            "port": self.port,
            "url": self.url,
            "pid": self.pid,
            "state": self.state,
            "since": self.since,
            "retry_count": self.retry_count,
            "last_error": self.last_error,
            "sessions": list(self.sessions),
            "kind": self.kind,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True)
class View:
    instances: Mapping[str, InstanceView]
    sessions: Mapping[str, str]
    """Session id → the instance it is bound to."""
    last_seq: int
    events: int
    hub_started_at: str | None
    """Time of the latest `hub_started`, None once the hub has stopped."""

    def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for instance in self.instances.values():
            counts[instance.state] = counts.get(instance.state, 0) + 1
        return counts


@dataclass(slots=True)
class _Instance:
    """What the view needs of one instance, and nothing more: memory is O(instances)."""

    id: str
    discovered_at: str
    fields: dict[str, Any] = field(default_factory=dict)
    state: str = "discovered"
    since: str = ""
    retry_count: int = 0
    last_error: str | None = None

    def take(self, at: str, target: str, retry_count: int, error: str | None) -> None:
        """Apply one transition's effect (see `transition_effect`) committed at `at`."""
        self.state, self.since = target, at
        if target == "active":
            self.retry_count, self.last_error = 0, None
        else:
            self.retry_count = retry_count
            if error:
                self.last_error = error

    def to_row(self) -> list[Any]:
        return [self.id, self.discovered_at, self.fields, self.state, self.since,
                self.retry_count, self.last_error]


SNAPSHOT_FORMAT = 1
"""Shape of `Fold.to_snapshot()`; a stored snapshot of another format is ignored and rebuilt."""


class Fold:
    """Accumulates events in log order; `view()` gives the view so far.

    Each event updates only its own instance, in constant time; `view()` rebuilds the
    InstanceView of the instances that changed since the last call and shares the rest.
    """

    def __init__(self) -> None:
        self._instances: dict[str, _Instance] = {}
        self._views: dict[str, InstanceView] = {}
        self._dirty: set[str] = set()
        self._sessions: dict[str, str] = {}
        self._last_seq = 0
        self._events = 0
        self._max_at = ""
        self._hub_started_at: str | None = None
        self.head_hash: bytes | None = None
        """Chain hash of the last event folded, if it was read with it (not part of a snapshot)."""

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def events(self) -> int:
        return self._events

    @property
    def max_at(self) -> str:
        """The latest `at` folded so far ('' before any event)."""
        return self._max_at

    def apply(self, events: Iterable[StoredEvent]) -> Fold:
        instances = self._instances
        dirty = self._dirty
        count = 0
        max_at = self._max_at
        event: StoredEvent | None = None
        for event in events:
            count += 1
            if event.at > max_at:
                max_at = event.at
            stream = event.stream
            if event.type == _TRANSITION:
                instance = instances.get(stream)
                if instance is None:
                    instance = instances[stream] = _Instance(stream, event.at)
                _transition(instance, event)
                dirty.add(stream)
            else:
                self._apply_rare(event)
        self._events += count
        self._max_at = max_at
        if event is not None:
            self._last_seq = event.seq
            self.head_hash = event.hash
        return self

    def accumulator(self, stream: str, at: str) -> _Instance:
        """The mutable state of `stream`'s instance, made if new (for `replay --verify`'s loop).

        Whoever changes it directly must call `caught_up` before reading the fold.
        """
        instance = self._instances.get(stream)
        if instance is None:
            instance = self._instances[stream] = _Instance(stream, at)
        return instance

    def caught_up(self, *, events: int, last_seq: int, max_at: str, head_hash: bytes | None) -> None:
        """Set the counters after changes made through `accumulator`; every view is rebuilt."""
        self._events, self._last_seq, self._max_at, self.head_hash = events, last_seq, max_at, head_hash
        self._dirty.update(self._instances)

    def _apply_rare(self, event: StoredEvent) -> None:
        kind = event.type
        if kind == _DISCOVERED or kind == _UPDATED:
            instance = self._instances.get(event.stream)
            if instance is None:
                instance = self._instances[event.stream] = _Instance(event.stream, event.at)
            data = _decode(event)
            instance.fields.update({k: data[k] for k in _ANNOUNCED if k in data})
            self._dirty.add(event.stream)
        elif kind == _PROCESS_SPAWNED or kind == _ORPHAN_ENDED:
            instance = self._instances.get(event.stream)
            if instance is not None:
                data = _decode(event)
                if kind == _PROCESS_SPAWNED:
                    instance.fields.update(pid=data.get("pid"), identity=data.get("identity"))
                else:
                    instance.fields.pop("identity", None)
                self._dirty.add(event.stream)
        elif kind == _SESSION_CONNECTED:
            session = _decode(event).get("session_id")
            if isinstance(session, str):
                self._sessions[session] = event.stream
                self._dirty.add(event.stream)
        elif kind == _SESSION_DISCONNECTED:
            gone = self._sessions.pop(str(_decode(event).get("session_id")), None)
            if gone is not None:
                self._dirty.add(gone)
        elif kind == _HUB_STARTED:
            self._end_sessions()  # sessions never outlive the hub that served them
            self._hub_started_at = event.at
        elif kind == _HUB_STOPPED:
            self._end_sessions()
            self._hub_started_at = None

    def _end_sessions(self) -> None:
        self._dirty.update(self._sessions.values())
        self._sessions.clear()

    def instance(self, instance_id: str) -> InstanceView | None:
        """One instance's view, without building the others'."""
        if instance_id in self._dirty:
            self._refresh()
        return self._views.get(instance_id)

    def view(self) -> View:
        self._refresh()
        return View(
            instances=MappingProxyType(dict(self._views)),
            sessions=MappingProxyType(dict(self._sessions)),
            last_seq=self._last_seq,
            events=self._events,
            hub_started_at=self._hub_started_at,
        )

    def _refresh(self) -> None:
        if not self._dirty:
            return
        by_instance: dict[str, list[str]] = {}
        for session, instance_id in self._sessions.items():
            if instance_id in self._dirty:
                by_instance.setdefault(instance_id, []).append(session)
        for key in self._dirty:
            acc = self._instances.get(key)
            if acc is not None:
                self._views[key] = _finish(acc, tuple(by_instance.get(key, ())))
        self._dirty.clear()

    # -- snapshots ---------------------------------------------------------------------------

    def to_snapshot(self) -> dict[str, Any]:
        """The fold's whole state as plain JSON data; `from_snapshot` gives the same fold back."""
        return {
            "format": SNAPSHOT_FORMAT,
            "last_seq": self._last_seq,
            "events": self._events,
            "max_at": self._max_at,
            "hub_started_at": self._hub_started_at,
            "instances": [i.to_row() for i in self._instances.values()],
            "sessions": [[s, i] for s, i in self._sessions.items()],
        }

    @classmethod
    def from_snapshot(cls, state: dict[str, Any]) -> Fold:
        """Raises ValueError if `state` is not a snapshot this version wrote."""
        if not isinstance(state, dict) or state.get("format") != SNAPSHOT_FORMAT:
            raise ValueError("not a snapshot of this format")
        try:
            fold = cls()
            fold._last_seq = int(state["last_seq"])
            fold._events = int(state["events"])
            fold._max_at = str(state["max_at"])
            started = state["hub_started_at"]
            fold._hub_started_at = None if started is None else str(started)
            for row in state["instances"]:
                id_, discovered_at, fields, status, since, retry_count, last_error = row
                if not isinstance(fields, dict):
                    raise ValueError("instance fields are not an object")
                fold._instances[str(id_)] = _Instance(
                    str(id_), str(discovered_at), fields, str(status), str(since),
                    int(retry_count), None if last_error is None else str(last_error),
                )
            for session, instance_id in state["sessions"]:
                fold._sessions[str(session)] = str(instance_id)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed snapshot: {exc}") from None
        fold._dirty.update(fold._instances)
        return fold


def _decode(event: StoredEvent) -> dict[str, Any]:
    return decode_object(event.data_json) or {}


def _transition(instance: _Instance, event: StoredEvent) -> None:
    effect = transition_effect(_decode(event))
    if effect is not None:
        instance.take(event.at, *effect)


def transition_effect(data: dict[str, Any]) -> tuple[str, int, str | None] | None:
    """What a transition payload does to its instance: (target, retry count, error to keep).

    None for a malformed payload: `replay --verify` reports it; the view keeps the last good state.
    """
    target = data.get("to")
    if not isinstance(target, str):
        return None
    if target == "active":
        return target, 0, None
    return target, int(data.get("attempt") or 0), str(data["error"]) if data.get("error") else None


def _finish(acc: _Instance, sessions: tuple[str, ...]) -> InstanceView:
    fields = acc.fields
    return InstanceView(
        id=acc.id,
        name=str(fields.get("name") or acc.id),
        directory=str(fields.get("directory") or ""),
        port=fields.get("port"),
        url=fields.get("url"),
        pid=fields.get("pid"),
        state=acc.state,
        since=acc.since or acc.discovered_at,
        retry_count=acc.retry_count,
        last_error=acc.last_error,
        sessions=sessions,
        kind=str(fields.get("kind") or "announced"),
        source=str(fields.get("source") or ""),
        child=_child(fields),
    )


def _child(fields: dict[str, Any]) -> tuple[int, str] | None:
    pid, identity = fields.get("pid"), fields.get("identity")
    return (pid, identity) if isinstance(pid, int) and isinstance(identity, str) else None


def fold(events: Iterable[StoredEvent]) -> View:
    """The view after `events` (in log order)."""
    return Fold().apply(events).view()


def resolve(ref: str, ids: Iterable[str], names: Mapping[str, str]) -> str:
    """The one instance id that `ref` names: a full id, a unique id prefix, or a unique name."""
    known = list(ids)
    if ref in known:
        return ref
    by_name = sorted(i for i, name in names.items() if name == ref)
    if len(by_name) == 1:
        return by_name[0]
    if by_name:
        raise AmbiguousInstance(f"{len(by_name)} instances are named {ref!r}: {', '.join(by_name)}")
    by_prefix = sorted(i for i in known if ref and i.startswith(ref))
    if len(by_prefix) == 1:
        return by_prefix[0]
    if by_prefix:
        shown = ", ".join(by_prefix[:5]) + (" …" if len(by_prefix) > 5 else "")
        raise AmbiguousInstance(f"{ref!r} matches {len(by_prefix)} instances: {shown}")
    raise UnknownInstance(f"no instance matches {ref!r}")
