"""An announcement file's content: parsed and validated, trusting nothing (pure, no I/O).

The files are written by other programs; every problem is an `InvalidAnnouncement` (cannot be
used as it is) or a `RefusedAnnouncement` (must not be used, e.g. a remote URL).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar
from urllib.parse import urlsplit

from fsm_hub.errors import InvalidAnnouncement, RefusedAnnouncement

MAX_FILE_SIZE = 64 * 1024
"""Announcements are a few hundred bytes; anything bigger is not one, and is not read."""
_MAX_PID = 2**31 - 1  # pid_t; a bigger number could not be passed to kill()

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Announcement:
    """One instance as its file announces it."""

    id: str
    name: str
    directory: str
    port: int
    pid: int | None
    url: str
    """The MCP endpoint: the file's `url`, else `http://127.0.0.1:{port}/mcp`."""
    executable: str | None
    started_at: datetime | None
    last_ping: datetime | None

    def evidence(self) -> tuple[int, int | None, str]:
        """What identifies this run of the server: if any of it changes, reconnect from scratch."""
        return (self.port, self.pid, self.url)


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
_GO_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)  # what Go writes for a time it never set


def parse_rfc3339(text: str) -> datetime:
    """RFC 3339 as Go writes it (RFC3339Nano: up to nine fractional digits); raises ValueError.

    `datetime.fromisoformat` in 3.11 rejects nanoseconds; they are truncated to microseconds.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    if zulu:
        tz = UTC
    else:
        offset = timedelta(hours=int(off_h), minutes=int(off_m))
        tz = timezone(-offset if sign == "-" else offset)
    micro = int((fraction or "0").ljust(6, "0")[:6])
    return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=tz)


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback address; `0.0.0.0` is not (it means "all interfaces")."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def parse_announcement(
    data: bytes, *, expected_id: str | None = None, allow_remote: bool = False
) -> Announcement:
    """Validate one file's bytes; raises InvalidAnnouncement or RefusedAnnouncement."""
    if not data.strip():
        raise InvalidAnnouncement("empty file")
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidAnnouncement("not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidAnnouncement(f"not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise InvalidAnnouncement(f"not a JSON object but {_json_type(document)}")

    instance_id = _required(_text(document, "id"), "id")
    if not instance_id:
        raise InvalidAnnouncement("'id' is empty")
    if instance_id.startswith("cfg-"):  # fsm_hub.discovery.config.ID_PREFIX: configured servers' ids
        raise RefusedAnnouncement(f"'id' {instance_id!r} claims a configured server's id (cfg-…)")
    if expected_id is not None and instance_id != expected_id:
        raise InvalidAnnouncement(f"'id' is {instance_id!r}, but the file is named for {expected_id!r}")
    port = _required(_integer(document, "port", 1, 65535), "port")
    process = document.get("process_info")
    if process is not None and not isinstance(process, dict):
        raise InvalidAnnouncement(f"'process_info' must be an object, got {_json_type(process)}")
    process = process or {}
    return Announcement(
        id=instance_id,
        name=_required(_text(document, "name"), "name"),
        directory=_text(document, "directory") or "",
        port=port,
        pid=_integer(process, "pid", 1, _MAX_PID, prefix="process_info."),
        url=_url(document, port, allow_remote),
        executable=_text(process, "executable", prefix="process_info."),
        started_at=_timestamp(document, "started_at"),
        last_ping=_timestamp(document, "last_ping"),
    )


def _required(value: _T | None, key: str) -> _T:
    if value is None:
        raise InvalidAnnouncement(f"'{key}' is missing")
    return value


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _text(obj: dict[str, Any], key: str, *, prefix: str = "") -> str | None:
    """The string at `key`, or None if absent or null."""
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidAnnouncement(f"'{prefix}{key}' must be a string, got {_json_type(value)}")
    return value


def _integer(obj: dict[str, Any], key: str, low: int, high: int, *, prefix: str = "") -> int | None:
    """The integer in low..high at `key`, or None if absent or null (JSON's `true` is no integer)."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidAnnouncement(f"'{prefix}{key}' must be an integer in {low}..{high}, got {short(value)}")
    return value


def _timestamp(obj: dict[str, Any], key: str) -> datetime | None:
    text = _text(obj, key)
    if text is None:
        return None
    try:
        moment = parse_rfc3339(text)
    except ValueError:
        raise InvalidAnnouncement(f"'{key}' is not an RFC 3339 time: {short(text)}") from None
    return None if moment == _GO_ZERO_TIME else moment


def _url(obj: dict[str, Any], port: int, allow_remote: bool) -> str:
    url = _text(obj, "url")
    if url is None:
        return f"http://127.0.0.1:{port}/mcp"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise InvalidAnnouncement(f"'url' is not a valid URL: {short(url)}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidAnnouncement(f"'url' must be an http(s) URL with a host, got {short(url)}")
    if not allow_remote and not is_loopback_host(host):
        raise RefusedAnnouncement(
            f"url {short(url)} is not on this machine (host {host} is not a loopback address);"
            " remote instances need allow_remote"
        )
    return url


def short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def one_line(text: str) -> str:
    """File names are chosen by other programs; keep a warning on one printable line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
