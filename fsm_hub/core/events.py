"""Typed, versioned records of everything that happens to an instance or to the hub."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

HUB_STREAM = "hub"
"""The stream that holds the hub's own events (`hub_started`, `hub_stopped`)."""

EVENT_FORMAT = 1
"""Version of the event payloads below; bumped with a migration when a payload changes shape."""


class EventType(StrEnum):
    INSTANCE_DISCOVERED = "instance_discovered"
    """data: name, directory, port, pid, url; a configured server adds kind, source and server
    (its description: names of env and headers, never their values)."""
    INSTANCE_UPDATED = "instance_updated"
    """data: the announcement fields that changed (same keys as instance_discovered)."""
    TRANSITION = "transition"
    """data: event, from, to, reason, attempt, error."""
    SESSION_CONNECTED = "session_connected"
    """data: session_id. Stored in the instance's stream."""
    SESSION_DISCONNECTED = "session_disconnected"
    """data: session_id, reason."""
    HUB_STARTED = "hub_started"
    """data: pid, version, instances_dir."""
    HUB_STOPPED = "hub_stopped"
    """data: pid, reason."""
    SUPERVISOR_FAILED = "supervisor_failed"
    """data: instance, error, restart (count in this run). Stored in the hub stream."""
    PROCESS_SPAWNED = "process_spawned"
    """data: pid, identity (boot id and start time). A configured stdio server's child, as spawned."""
    ORPHAN_ENDED = "orphan_ended"
    """data: pid, reason. A child of an earlier hub (killed, say), found still running and ended."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event a producer wants appended; the store gives it seq, version and time."""

    stream: str
    type: EventType
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as committed to the log.

    `data_json` is kept encoded: the fold needs only a handful of payloads, and decoding
    every row would cap folding far below the rate we need.
    """

    seq: int
    """Global position in the log, strictly increasing."""
    stream: str
    """Instance id, or `hub`."""
    version: int
    """Position within the stream, gapless from 1."""
    type: str
    at: str
    """Commit-request time, UTC ISO 8601 with microseconds (sorts lexically)."""
    data_json: str
    hash: bytes | None = field(default=None, compare=False)
    """Link of the hash chain (fsm_hub.core.chain), when it was read or written with the event."""

    @property
    def data(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.data_json)
        return decoded

    def to_json(self) -> dict[str, Any]:
        """The public shape of a stored event (CLI `--json`, MCP `instances_history`)."""
        return {
            "seq": self.seq,
            "stream": self.stream,
            "version": self.version,
            "type": self.type,
            "at": self.at,
            "data": self.data,
        }


encode_data = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":")).encode
"""An event's `data` as stored: compact JSON (one encoder object: this is on the append hot path)."""


_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def storable(text: str) -> str:
    """`text` as UTF-8 can hold it: each lone surrogate is replaced by U+FFFD.

    Python strings may carry surrogates (from `surrogateescape`d file names and bytes, or JSON
    `\\udc80` escapes) that neither UTF-8 nor SQLite accepts; the log keeps a replacement
    rather than refusing the event. Everything else is stored exactly.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub(REPLACEMENT, text)
    return text


_scan: Any = json.JSONDecoder().scan_once  # type: ignore[attr-defined]  # set in __init__, untyped


def decode_object(text: str) -> dict[str, Any] | None:
    """A stored payload as a dict, None if it is not one JSON object (the fold's hot path).

    The C scanner without `json.loads`' wrapper: a third less time per event on a big log.
    """
    try:
        value, end = _scan(text, 0)
    except (StopIteration, ValueError):
        return None
    if end != len(text) or not isinstance(value, dict):
        return None
    return value


def format_time(moment: datetime) -> str:
    """The one timestamp format of the log: UTC, microseconds, `+00:00`."""
    if moment.tzinfo is not UTC:  # the clock's own UTC moments skip the conversion (hot path)
        moment = (moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment).astimezone(UTC)
    return moment.isoformat(timespec="microseconds")


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 moment given by a user; a naive time means UTC."""
    moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


def transition_data(
    event: str,
    source: str,
    target: str,
    *,
    reason: str,
    attempt: int = 0,
    error: str | None = None,
) -> dict[str, Any]:
    return {
        "event": event,
        "from": source,
        "to": target,
        "reason": reason,
        "attempt": attempt,
        "error": error,
    }
