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
- A directory (or file) that cannot be read for a reason of our own — out of file descriptors
  (EMFILE, ENFILE), of memory (ENOMEM), an I/O error — tells nothing about the instances:
  nothing changes until it can be read again. Only a refusal (unsafe or EACCES) withdraws them,
  and an instance withdrawn so comes back, unchanged, as `Found` with the reason it is back.
- Only `<id>.json` counts; hidden files (brummer's `.tmp-instance-*`, `.discovery.lock`)
  and other names are ignored without a word.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeAlias

from watchfiles import awatch

from fsm_hub.discovery.announcement import (
    MAX_FILE_SIZE,
    Announcement,
    is_loopback_host,
    one_line,
    parse_announcement,
    parse_rfc3339,
)
from fsm_hub.discovery.security import directory_refusal, read_own_file
from fsm_hub.errors import DiscoveryError, RefusedAnnouncement

__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "ENV_INSTANCES_DIR",
    "MAX_FILE_SIZE",
    "Announcement",
    "Change",
    "Changed",
    "Discovery",
    "Found",
    "Gone",
    "Problem",
    "ScanResult",
    "Updated",
    "default_instances_dir",
    "directory_refusal",
    "is_loopback_host",
    "parse_announcement",
    "parse_rfc3339",
    "process_is_running",
    "scan",
    "warn_to_stderr",
]

ENV_INSTANCES_DIR = "FSM_HUB_INSTANCES_DIR"
DEFAULT_POLL_INTERVAL = 1.0
_WATCH_STEP_MS = 50  # how often the watch thread looks at its stop event, too

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
class Found:
    """A new instance (→ instance_discovered), or one withdrawn by a refusal that is usable again."""

    announcement: Announcement
    reason: str = ""
    """Why a withdrawn instance is back (→ rediscover, e.g. "instances directory usable again");
    empty for an instance seen for the first time."""


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
        return one_line(self.message)


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
    failed: str | None = None
    """Why the directory could not be looked at now for a reason of our own (EMFILE, ENOMEM,
    EIO, ...): no evidence about any instance, so nothing changes."""


_REFUSING_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENAMETOOLONG})
"""Directory errors that say something about the directory itself; any other error (EMFILE,
ENFILE, ENOMEM, EIO, EINTR, ...) is a local failure, which is no evidence about instances."""


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
        if exc.errno not in _REFUSING_ERRORS:
            failure = one_line(f"cannot read {directory} ({exc.strerror or exc})")
            message = f"instances directory unreadable for now: {failure}; keeping what was known"
            return ScanResult({}, {}, frozenset(), (Problem(directory, message, ""),), None, failure)
        refusal = f"cannot read {directory} ({exc.strerror})"
    if refusal:
        refusal = one_line(refusal)
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
            data = read_own_file(path)
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


# --- turning scans into changes --------------------------------------------------------------


def _reconcile(
    previous: Mapping[str, Announcement], result: ScanResult
) -> tuple[dict[str, Announcement], list[Change]]:
    """The next `current` and the changes that lead there, in id order."""
    if result.failed is not None:
        return dict(previous), []
    current = dict(result.announcements)
    changes: list[Change] = []
    for instance_id in sorted(previous.keys() | current.keys()):
        old, new = previous.get(instance_id), current.get(instance_id)
        if new is old:
            continue  # the same parsed file as last time (the parse cache): nothing to compare
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
        self._failure: str | None = None
        self._recovered = False
        self._withdrawn: dict[str, str] = {}
        """Ids reported Gone because they were refused, with the reason: back as `Found` with one."""
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

    @property
    def failure(self) -> str | None:
        """Why the last look at the directory failed for a local reason (EMFILE, ...), or None."""
        return self._failure

    def poll_once(self) -> list[Change]:
        """Scan now; return what changed since the last scan (the first time: all as Found)."""
        result = _scan(self.directory, self.allow_remote, self._parsed)
        for problem in result.problems:
            if problem not in self._reported:
                self._warn(str(problem))
        if result.failed is not None:
            self._reported |= frozenset(result.problems)
            self._failure = result.failed
            return []
        if self._failure is not None:
            self._failure = None
            self._recovered = True
            self._warn(f"instances directory {one_line(str(self.directory))} is readable again")
        self._reported = frozenset(result.problems)
        self._refused = result.refused
        self._current, changes = _reconcile(self._current, result)
        return self._note_withdrawals(result, changes)

    def withdraw(self, instance_id: str, reason: str) -> None:
        """Note that `instance_id` was removed because of `reason` (a refusal the hub saw at
        start): if its announcement turns up usable, it comes back as `Found` with a reason."""
        self._withdrawn[instance_id] = reason

    def _note_withdrawals(self, result: ScanResult, changes: list[Change]) -> list[Change]:
        """Remember what a refusal withdrew; give what comes back unchanged the reason it is back."""
        back: list[Change] = []
        for change in changes:
            if isinstance(change, Gone) and (result.refused or change.reason.startswith("refused:")):
                self._withdrawn[change.instance_id] = change.reason
            elif isinstance(change, Found) and change.announcement.id in self._withdrawn:
                was = self._withdrawn.pop(change.announcement.id)
                change = replace(change, reason=f"announcement usable again (was {was})")
            back.append(change)
        if result.refused is None and self._withdrawn:
            for instance_id in list(self._withdrawn):
                if not result.stale.get(instance_id, "").startswith("refused:") and (
                    instance_id not in result.unreadable
                ):
                    del self._withdrawn[instance_id]  # its file is gone: a new one is simply new
        return back

    async def changes(self) -> AsyncGenerator[list[Change], None]:
        """The initial set first (always, even empty, so the hub can reconcile), then each
        non-empty batch, and a batch (even empty) when a directory that could not be read is
        readable again. Cancelling the consuming task stops the watcher with it."""
        if self._consumed:
            raise DiscoveryError("Discovery.changes() is already being consumed")
        self._consumed = True
        wake = asyncio.Event()
        watcher = _DirectoryWatcher(self.directory, wake, self._say_once)
        try:
            # In a thread: a first look at 10,000 files takes a quarter of a second or more, and
            # the hub answers its clients meanwhile.
            batch, first = await asyncio.to_thread(self.poll_once), True
            while True:
                if batch or first or self._recovered:
                    first, self._recovered = False, False
                    watcher.serve(asyncio.current_task())
                    yield batch
                watcher.serve(asyncio.current_task())  # another task may resume us (the hub does)
                if self._use_watcher:
                    watcher.follow(self.directory if self._refused is None else None)
                await self._tick(wake if watcher.running else None)
                wake.clear()
                batch = await asyncio.to_thread(self.poll_once)
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
        message = one_line(message)
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
