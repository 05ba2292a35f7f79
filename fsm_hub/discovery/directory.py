"""Finding running instances from the announcement files brummer (or any MCP server) writes.

One JSON file per instance, `<id>.json`, in a directory that is often under a shared temp
dir. The files are written by other programs, so nothing here trusts them: every problem
is a warning and a skipped file, never an exception that stops discovery.

Decisions the file format leaves open:

- The file name is the id. A file whose `id` differs from its stem is skipped with a
  warning: brummer always writes `<id>.json`, and trusting the content would let two
  files claim one id.
- A known instance whose file turns unreadable (a non-atomic writer caught mid-write) keeps
  its last good announcement until the file is readable again, deleted, or its process dies.
  A file that turns *refused* (remote URL, symlink, foreign owner, oversized) is `Gone`.
- An instance reported `Gone` because its process died, whose file later shows a running
  process, comes back as `Found`: after `Gone` the hub has dropped it, so it is new again.
- The directory must be ours and writable by no one else: world-writable (sticky or not),
  or group-writable by a group other than our effective group, is refused as a whole.
  Files not owned by us, symlinks, non-regular and oversized files are refused one by one.
- Only `<id>.json` counts; hidden files (brummer's `.tmp-instance-*`, `.discovery.lock`)
  and other names are ignored without a word.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeAlias, TypeVar
from urllib.parse import urlsplit

from watchfiles import awatch

from fsm_hub.discovery.security import directory_refusal
from fsm_hub.errors import DiscoveryError, InvalidAnnouncement, RefusedAnnouncement

ENV_INSTANCES_DIR = "FSM_HUB_INSTANCES_DIR"
MAX_FILE_SIZE = 64 * 1024
"""Announcements are a few hundred bytes; anything bigger is not one, and is not read."""
DEFAULT_POLL_INTERVAL = 1.0
_MAX_PID = 2**31 - 1  # pid_t; a bigger number could not be passed to kill()
_WATCH_STEP_MS = 50  # how often the watch thread looks at its stop event, too

_T = TypeVar("_T")

Warn: TypeAlias = Callable[[str], None]
Sleep: TypeAlias = Callable[[float], Awaitable[None]]


def warn_to_stderr(message: str) -> None:
    """The default warning callback: one line on stderr."""
    print(f"fsm-hub: {message}", file=sys.stderr, flush=True)


def default_instances_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where brummer announces its instances, unless `FSM_HUB_INSTANCES_DIR` says otherwise."""
    if override := env.get(ENV_INSTANCES_DIR):
        return Path(override).expanduser()
    if runtime := env.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "brummer" / "instances"
    return Path(tempfile.gettempdir()) / "brummer" / "instances"


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


@dataclass(frozen=True, slots=True)
class Found:
    """A new instance (→ instance_discovered)."""

    announcement: Announcement


@dataclass(frozen=True, slots=True)
class Changed:
    """Port, pid or url changed: the old connection is worthless (→ rediscover)."""

    announcement: Announcement
    previous: Announcement


@dataclass(frozen=True, slots=True)
class Updated:
    """Something else changed, e.g. the name (→ instance_updated); `last_ping` alone is no news."""

    announcement: Announcement


@dataclass(frozen=True, slots=True)
class Gone:
    """The file was removed, its process died, or it is refused now (→ remove)."""

    instance_id: str
    reason: str


Change: TypeAlias = Found | Changed | Updated | Gone


# --- reading one file ------------------------------------------------------------------------

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
        raise InvalidAnnouncement(f"'{prefix}{key}' must be an integer in {low}..{high}, got {_short(value)}")
    return value


def _timestamp(obj: dict[str, Any], key: str) -> datetime | None:
    text = _text(obj, key)
    if text is None:
        return None
    try:
        moment = parse_rfc3339(text)
    except ValueError:
        raise InvalidAnnouncement(f"'{key}' is not an RFC 3339 time: {_short(text)}") from None
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
        raise InvalidAnnouncement(f"'url' is not a valid URL: {_short(url)}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidAnnouncement(f"'url' must be an http(s) URL with a host, got {_short(url)}")
    if not allow_remote and not is_loopback_host(host):
        raise RefusedAnnouncement(
            f"url {_short(url)} is not on this machine (host {host} is not a loopback address);"
            " remote instances need allow_remote"
        )
    return url


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(text: str) -> str:
    """File names are chosen by other programs; keep a warning on one printable line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def process_is_running(pid: int) -> bool:
    """Signal 0 checks existence without touching the process; EPERM means it exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's process; anything odd: don't drop an instance on it
        return True
    return True


# --- scanning the directory ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a file (or the directory) was not used, and what was seen, so it is reported once."""

    path: Path
    message: str
    seen: str
    """Content digest, or inode/size/mtime for files not read: a new value is worth a new warning."""

    def __str__(self) -> str:
        return _one_line(self.message)


@dataclass(frozen=True, slots=True)
class ScanResult:
    """One look at the directory."""

    announcements: dict[str, Announcement]
    """Usable instances by id: well-formed, allowed, process running."""
    stale: dict[str, str]
    """Ids whose file exists but must not be used (process gone, refused), with the reason."""
    unreadable: frozenset[str]
    """Ids whose file exists but cannot be read as an announcement right now."""
    problems: tuple[Problem, ...]
    refused: str | None
    """Why the whole directory is not used, or None (a missing directory is not refused)."""


def scan(directory: Path, *, allow_remote: bool = False, warn: Warn = warn_to_stderr) -> ScanResult:
    """Look at the directory once, warning about every file skipped."""
    result = _scan(Path(directory), allow_remote)
    for problem in result.problems:
        warn(str(problem))
    return result


FileKey = tuple[int, int, int, int, int, int, int]
ParseCache = dict[str, tuple[FileKey, Announcement]]


def _file_key(entry: os.DirEntry[str]) -> FileKey | None:
    """What tells an unchanged file (not following links): a swap, rewrite or chmod changes it."""
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid)


def _scan(directory: Path, allow_remote: bool, cache: ParseCache | None = None) -> ScanResult:
    """One look at the directory. With `cache`, files unchanged since the last look are not
    re-read or re-parsed (a poll of 1,000 instances every second would otherwise cost ~2 % of a
    core); their process is still checked every time."""
    try:
        st = os.stat(directory)
        refusal = directory_refusal(directory, st)
        entries = [] if refusal else sorted(os.scandir(directory), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return ScanResult({}, {}, frozenset(), (), None)  # not there yet: polling will see it
    except OSError as exc:
        refusal = f"cannot read {directory} ({exc.strerror})"
    if refusal:
        refusal = _one_line(refusal)
        message = f"instances directory refused: {refusal}; no instances will be discovered"
        return ScanResult({}, {}, frozenset(), (Problem(directory, message, ""),), refusal)

    announcements: dict[str, Announcement] = {}
    stale: dict[str, str] = {}
    unreadable: set[str] = set()
    problems: list[Problem] = []
    seen: set[str] = set()

    def skip(file_id: str, path: Path, exc: DiscoveryError, seen: str) -> None:
        if isinstance(exc, RefusedAnnouncement):
            stale[file_id] = f"refused: {exc}"
            message = f"instance file {path} refused: {exc}"
        else:
            unreadable.add(file_id)
            message = f"instance file {path} ignored: {exc}"
        problems.append(Problem(path, message, seen))

    for entry in entries:
        name = entry.name
        if not name.endswith(".json") or name.startswith("."):
            continue  # not an announcement: temp files (`.tmp-instance-*`), editor backups, ...
        file_id = name.removesuffix(".json")
        path = Path(entry.path)
        key = _file_key(entry) if cache is not None else None
        hit = cache.get(name) if cache is not None else None
        if hit is not None and key is not None and hit[0] == key:
            seen.add(name)
            _keep(hit[1], announcements, stale)
            continue
        try:
            data = _read(path)
        except FileNotFoundError:
            continue  # removed since the listing: the same as not listed
        except DiscoveryError as exc:
            skip(file_id, path, exc, _stat_seen(path))
            continue
        try:
            announcement = parse_announcement(data, expected_id=file_id, allow_remote=allow_remote)
        except DiscoveryError as exc:
            skip(file_id, path, exc, hashlib.sha256(data).hexdigest())
            continue
        if cache is not None and key is not None:
            cache[name] = (key, announcement)
            seen.add(name)
        _keep(announcement, announcements, stale)
    if cache is not None:
        for name in cache.keys() - seen:
            del cache[name]
    return ScanResult(announcements, stale, frozenset(unreadable), tuple(problems), None)


def _keep(announcement: Announcement, announcements: dict[str, Announcement], stale: dict[str, str]) -> None:
    if announcement.pid is not None and not process_is_running(announcement.pid):
        stale[announcement.id] = f"process {announcement.pid} is gone"
    else:
        announcements[announcement.id] = announcement


def _stat_seen(path: Path) -> str:
    try:
        st = os.lstat(path)
    except OSError:
        return ""
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _read(path: Path) -> bytes:
    """Open without following links and check the open file itself, so a swap can't fool us."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP from O_NOFOLLOW, EACCES, ...
        if os.path.islink(path):
            raise RefusedAnnouncement("it is a symbolic link") from None
        raise InvalidAnnouncement(f"cannot open it ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedAnnouncement("it is not a regular file")
        if st.st_uid != os.geteuid():
            raise RefusedAnnouncement(f"it is owned by uid {st.st_uid}, not by us")
        if st.st_size > MAX_FILE_SIZE:
            raise RefusedAnnouncement(f"it is larger than {MAX_FILE_SIZE // 1024} KiB")
        data = b""
        while len(data) <= MAX_FILE_SIZE and (chunk := os.read(fd, MAX_FILE_SIZE + 1 - len(data))):
            data += chunk
    except OSError as exc:  # EIO and friends: one bad file must not stop the scan
        raise InvalidAnnouncement(f"cannot read it ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_SIZE:  # it grew while we read
        raise RefusedAnnouncement(f"it is larger than {MAX_FILE_SIZE // 1024} KiB")
    return data


# --- turning scans into changes --------------------------------------------------------------


def _reconcile(
    previous: Mapping[str, Announcement], result: ScanResult
) -> tuple[dict[str, Announcement], list[Change]]:
    """The next `current` and the changes that lead there, in id order."""
    current = dict(result.announcements)
    changes: list[Change] = []
    for instance_id in sorted(previous.keys() | current.keys()):
        old, new = previous.get(instance_id), current.get(instance_id)
        if new is None and old is not None:
            alive = old.pid is None or process_is_running(old.pid)
            if instance_id in result.unreadable and alive:
                current[instance_id] = old  # probably caught mid-write: wait for the next look
            elif result.refused:
                changes.append(Gone(instance_id, f"instances directory refused: {result.refused}"))
            elif instance_id in result.stale:
                changes.append(Gone(instance_id, result.stale[instance_id]))
            elif instance_id in result.unreadable:
                changes.append(Gone(instance_id, f"process {old.pid} is gone"))
            else:
                changes.append(Gone(instance_id, "instance file removed"))
        elif new is not None and old is None:
            changes.append(Found(new))
        elif new is not None and old is not None:
            if new.evidence() != old.evidence():
                changes.append(Changed(new, old))
            elif replace(new, last_ping=None) != replace(old, last_ping=None):
                changes.append(Updated(new))
    return current, changes


class Discovery:
    """Turns successive scans of one directory into batches of changes.

    `changes()` owns the state: consume it from one task. The watcher only makes scans
    come sooner; the poll every `poll_interval` is what catches dead processes and
    covers a watcher that cannot run (no inotify, directory missing or replaced).
    """

    def __init__(
        self,
        directory: Path,
        *,
        allow_remote: bool = False,
        warn: Warn = warn_to_stderr,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        use_watcher: bool = True,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.directory = Path(directory)
        self.allow_remote = allow_remote
        self.poll_interval = poll_interval
        self._warn = warn
        self._sleep = sleep
        self._use_watcher = use_watcher
        self._current: dict[str, Announcement] = {}
        self._parsed: ParseCache = {}
        self._refused: str | None = None
        self._reported: frozenset[Problem] = frozenset()
        self._said: set[str] = set()
        self._consumed = False

    @property
    def current(self) -> dict[str, Announcement]:
        """The instances as of the last scan, by id (a copy)."""
        return dict(self._current)

    @property
    def refused(self) -> str | None:
        """Why the directory is not used (for hub_status), or None."""
        return self._refused

    def poll_once(self) -> list[Change]:
        """Scan now; return what changed since the last scan (the first time: all as Found)."""
        result = _scan(self.directory, self.allow_remote, self._parsed)
        for problem in result.problems:
            if problem not in self._reported:
                self._warn(str(problem))
        self._reported = frozenset(result.problems)
        self._refused = result.refused
        self._current, changes = _reconcile(self._current, result)
        return changes

    async def changes(self) -> AsyncGenerator[list[Change], None]:
        """The initial set first (always, even empty, so the hub can reconcile), then each
        non-empty batch. Cancelling the consuming task stops the watcher with it."""
        if self._consumed:
            raise DiscoveryError("Discovery.changes() is already being consumed")
        self._consumed = True
        wake = asyncio.Event()
        watcher = _DirectoryWatcher(self.directory, wake, self._say_once)
        try:
            batch, first = self.poll_once(), True
            while True:
                if batch or first:
                    first = False
                    watcher.serve(asyncio.current_task())
                    yield batch
                watcher.serve(asyncio.current_task())  # another task may resume us (the hub does)
                if self._use_watcher:
                    watcher.follow(self.directory if self._refused is None else None)
                await self._tick(wake if watcher.running else None)
                wake.clear()
                batch = self.poll_once()
        finally:
            await watcher.close()
            self._consumed = False

    async def _tick(self, wake: asyncio.Event | None) -> None:
        """Sleep one poll interval, or less if the watcher saw something."""
        if wake is None:
            await self._sleep(self.poll_interval)
            return
        waiters = [asyncio.ensure_future(self._sleep(self.poll_interval)), asyncio.ensure_future(wake.wait())]
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in done:
                waiter.result()  # a failing sleeper should fail loudly
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    def _say_once(self, message: str) -> None:
        message = _one_line(message)
        if message not in self._said:
            self._said.add(message)
            self._warn(message)


class _DirectoryWatcher:
    """One `awatch` task on the directory, (re)started by the poll loop when needed."""

    def __init__(self, directory: Path, wake: asyncio.Event, warn: Warn) -> None:
        self._directory = directory
        self._wake = wake
        self._warn = warn
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._consumer: asyncio.Task[Any] | None = None
        self._identity: tuple[int, int] | None = None
        """(st_dev, st_ino) of the directory watched, or last tried: failing once is enough."""

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def follow(self, directory: Path | None) -> None:
        """Watch `directory` if it exists; restart if it was replaced; stop if None."""
        identity = _identity(directory) if directory is not None else None
        if identity == self._identity:
            return
        self.stop()
        self._identity = identity
        if identity is not None:
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._run(self._stop, identity))

    async def _run(self, stop: asyncio.Event, identity: tuple[int, int]) -> None:
        try:
            async for _ in awatch(
                self._directory,
                watch_filter=None,
                recursive=False,
                stop_event=stop,
                step=_WATCH_STEP_MS,
                debounce=500,
            ):
                self._wake.set()
        except Exception as exc:  # inotify limits, permissions, ...: polling carries on
            if _identity(self._directory) == identity:  # a vanished directory is no failure
                self._warn(f"cannot watch {self._directory} ({exc}); polling it instead")

    def serve(self, consumer: asyncio.Task[Any] | None) -> None:
        """Stop when `consumer` ends, even while the generator sits at a `yield` and cannot
        run its `finally`. A later consumer (the hub takes the first batch in another task)
        restarts the watch through `follow`."""
        if consumer is self._consumer:
            return
        if self._consumer is not None:
            self._consumer.remove_done_callback(self._consumer_done)
        if consumer is not None:
            consumer.add_done_callback(self._consumer_done)
        self._consumer = consumer

    def _consumer_done(self, _: object) -> None:
        self.stop()

    def stop(self) -> None:
        # The watch runs in a thread that checks `stop` every step; cancelling alone would
        # leave it blocked until its timeout.
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        self._identity = None

    async def close(self) -> None:
        self.serve(None)
        self.stop()
        if self._task is not None:
            await asyncio.wait([self._task])
            self._task = None


def _identity(directory: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
