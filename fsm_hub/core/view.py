"""The current view, never stored: a pure fold over the event log.

The live hub, the MCP tools and every CLI command read this one fold. Folding a prefix of the
log gives the view as it was at that moment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fsm_hub.core.events import EventType, StoredEvent
from fsm_hub.errors import AmbiguousInstance, UnknownInstance

_TRANSITION = EventType.TRANSITION.value
_DISCOVERED = EventType.INSTANCE_DISCOVERED.value
_UPDATED = EventType.INSTANCE_UPDATED.value
_SESSION_CONNECTED = EventType.SESSION_CONNECTED.value
_SESSION_DISCONNECTED = EventType.SESSION_DISCONNECTED.value
_HUB_STARTED = EventType.HUB_STARTED.value
_HUB_STOPPED = EventType.HUB_STOPPED.value
_ANNOUNCED = ("name", "directory", "port", "url", "pid")


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
    id: str
    discovered_at: str
    fields: dict[str, Any] = field(default_factory=dict)
    transitions: list[StoredEvent] = field(default_factory=list)


class Fold:
    """Accumulates events in log order; `view()` gives the view so far.

    Transition payloads stay encoded until `view()`, which decodes only the few it needs
    per instance: that is what lets a fold run at millions of events a second.
    """

    def __init__(self) -> None:
        self._instances: dict[str, _Instance] = {}
        self._sessions: dict[str, str] = {}
        self._last_seq = 0
        self._events = 0
        self._hub_started_at: str | None = None

    def apply(self, events: Iterable[StoredEvent]) -> Fold:
        instances = self._instances
        count = 0
        event: StoredEvent | None = None
        for event in events:
            count += 1
            kind = event.type
            if kind == _TRANSITION:
                instance = instances.get(event.stream)
                if instance is None:
                    instance = instances[event.stream] = _Instance(event.stream, event.at)
                instance.transitions.append(event)
            else:
                self._apply_rare(event)
        self._events += count
        if event is not None:
            self._last_seq = event.seq
        return self

    def _apply_rare(self, event: StoredEvent) -> None:
        kind = event.type
        if kind == _DISCOVERED or kind == _UPDATED:
            instance = self._instances.get(event.stream)
            if instance is None:
                instance = self._instances[event.stream] = _Instance(event.stream, event.at)
            data = event.data
            instance.fields.update({k: data[k] for k in _ANNOUNCED if k in data})
        elif kind == _SESSION_CONNECTED:
            self._sessions[event.data["session_id"]] = event.stream
        elif kind == _SESSION_DISCONNECTED:
            self._sessions.pop(event.data["session_id"], None)
        elif kind == _HUB_STARTED:
            self._sessions.clear()  # sessions never outlive the hub that served them
            self._hub_started_at = event.at
        elif kind == _HUB_STOPPED:
            self._sessions.clear()
            self._hub_started_at = None

    def instance(self, instance_id: str) -> InstanceView | None:
        """One instance's view without building every other one's (discovery asks per file)."""
        acc = self._instances.get(instance_id)
        if acc is None:
            return None
        return _finish(acc, tuple(s for s, i in self._sessions.items() if i == instance_id))

    def view(self) -> View:
        by_instance: dict[str, list[str]] = {}
        for session, instance_id in self._sessions.items():
            by_instance.setdefault(instance_id, []).append(session)
        instances = {
            key: _finish(acc, tuple(by_instance.get(key, ())))
            for key, acc in self._instances.items()
        }
        return View(
            instances=MappingProxyType(instances),
            sessions=MappingProxyType(dict(self._sessions)),
            last_seq=self._last_seq,
            events=self._events,
            hub_started_at=self._hub_started_at,
        )


def _finish(acc: _Instance, sessions: tuple[str, ...]) -> InstanceView:
    state, since, retry_count, last_error = "discovered", acc.discovered_at, 0, None
    if acc.transitions:
        last = acc.transitions[-1].data
        state, since = last["to"], acc.transitions[-1].at
        retry_count = 0 if state == "active" else int(last.get("attempt") or 0)
        for event in reversed(acc.transitions):
            data = last if event is acc.transitions[-1] else event.data
            if data.get("to") == "active":
                break
            if data.get("error"):
                last_error = str(data["error"])
                break
    fields = acc.fields
    return InstanceView(
        id=acc.id,
        name=str(fields.get("name") or acc.id),
        directory=str(fields.get("directory") or ""),
        port=fields.get("port"),
        url=fields.get("url"),
        pid=fields.get("pid"),
        state=state,
        since=since,
        retry_count=retry_count,
        last_error=last_error,
        sessions=sessions,
    )


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
