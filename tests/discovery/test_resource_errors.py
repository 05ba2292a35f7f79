"""Resource errors are not evidence: a directory we cannot read for a reason of our own (out of
file descriptors, of memory, an I/O error) changes nothing, and one that is refused and then safe
again brings its unchanged announcements back, with the reason.

The error is injected at the directory-read boundary (`os.scandir` for our directory only), and
also produced for real in a child process with a low RLIMIT_NOFILE.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fsm_hub.discovery.directory import Discovery, Found, Gone
from fsm_hub.store.sqlite import EventStore
from fsm_hub.supervision.hub import Hub
from tests.discovery.announcements import (
    IS_ROOT,
    NOBODY,
    REMOVED_AND_BACK,
    Warnings,
    announce,
    assert_back_for_the_refusal,
)
from tests.live_hub import FAST, LiveHub, until

LOCAL_ERRORS = [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.ENOBUFS]


class FailingScandir:
    """`os.scandir` that fails with `code` for one directory while `failing`, counting the looks."""

    def __init__(self, directory: Path, code: int) -> None:
        self.directory = directory
        self.code = code
        self.failing = True
        self.looks = 0
        self._real = os.scandir

    def __call__(self, path: Any = ".") -> Any:
        if Path(path) == self.directory:
            self.looks += 1
            if self.failing:
                raise OSError(self.code, os.strerror(self.code), str(path))
        return self._real(path)


@pytest.fixture
def fail_reading(
    instances: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[int], FailingScandir]]:
    def install(code: int) -> FailingScandir:
        failing = FailingScandir(instances, code)
        monkeypatch.setattr(os, "scandir", failing)
        return failing

    yield install


@pytest.mark.parametrize("code", LOCAL_ERRORS, ids=errno.errorcode.get)
def test_a_local_error_reading_the_directory_changes_nothing(
    instances: Path, fail_reading: Callable[[int], FailingScandir], code: int
) -> None:
    announce(instances, "a")
    warnings = Warnings()
    discovery = Discovery(instances, warn=warnings)
    [found] = discovery.poll_once()
    assert isinstance(found, Found)

    failing = fail_reading(code)
    assert discovery.poll_once() == []
    assert discovery.poll_once() == []
    assert failing.looks == 2
    assert list(discovery.current) == ["a"]
    assert discovery.refused is None
    assert discovery.failure is not None and os.strerror(code) in discovery.failure
    [warning] = warnings  # once, not once per look
    assert "unreadable for now" in warning and os.strerror(code) in warning and "keeping" in warning

    failing.failing = False
    assert discovery.poll_once() == []  # the same files: nothing to say about any instance
    assert list(discovery.current) == ["a"]
    assert discovery.failure is None
    assert warnings[-1].endswith("is readable again")


def test_changes_made_while_unreadable_show_once_it_is_readable(
    instances: Path, fail_reading: Callable[[int], FailingScandir]
) -> None:
    announce(instances, "a")
    discovery = Discovery(instances, warn=Warnings())
    discovery.poll_once()
    failing = fail_reading(errno.EMFILE)
    (instances / "a.json").unlink()
    announce(instances, "b")
    assert discovery.poll_once() == []

    failing.failing = False
    changes = discovery.poll_once()
    assert [type(c) for c in changes] == [Gone, Found]
    assert changes[0] == Gone("a", "instance file removed")


def test_a_local_error_reading_one_file_keeps_its_instance(
    instances: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = announce(instances, "a")
    discovery = Discovery(instances, warn=Warnings())
    discovery.poll_once()
    path.write_text(path.read_text())  # a rewrite: the parse cache must read it again
    real_open = os.open

    def open_failing(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(file) == path:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_failing)
    assert discovery.poll_once() == []
    assert list(discovery.current) == ["a"]


_CHILD = textwrap.dedent(
    """
    import json, os, resource, sys
    from pathlib import Path
    from fsm_hub.discovery.directory import Discovery

    warnings = []
    discovery = Discovery(Path(sys.argv[1]), warn=warnings.append)
    first = discovery.poll_once()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        exhausted = exc.errno
    during = discovery.poll_once()
    kept = sorted(discovery.current)
    for fd in held:
        os.close(fd)
    after = discovery.poll_once()
    print(json.dumps({
        "first": len(first), "exhausted": exhausted, "during": len(during), "kept": kept,
        "after": len(after), "current": sorted(discovery.current), "warnings": warnings,
    }))
    """
)


@pytest.mark.e2e
def test_real_fd_exhaustion_is_no_evidence(instances: Path) -> None:
    """A child process really runs out of descriptors (RLIMIT_NOFILE 64) and looks again."""
    announce(instances, "a")
    announce(instances, "b")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(instances)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["exhausted"] == errno.EMFILE
    assert outcome["first"] == 2
    assert outcome["during"] == 0 and outcome["kept"] == ["a", "b"]
    assert outcome["after"] == 0 and outcome["current"] == ["a", "b"]
    assert any("Too many open files" in w for w in outcome["warnings"])


def test_a_directory_unsafe_then_fixed_brings_its_announcements_back(instances: Path) -> None:
    announce(instances, "a")
    discovery = Discovery(instances, warn=Warnings())
    [found] = discovery.poll_once()
    assert isinstance(found, Found) and found.reason == ""

    instances.chmod(0o777)
    [gone] = discovery.poll_once()
    assert isinstance(gone, Gone) and gone.reason.startswith("instances directory refused: ")
    assert "writable by every user (mode 0777)" in gone.reason

    instances.chmod(0o700)
    [back] = discovery.poll_once()
    assert isinstance(back, Found)
    assert back.announcement == found.announcement
    assert back.reason == f"announcement usable again (was {gone.reason})"
    assert discovery.poll_once() == []


def test_a_file_removed_while_refused_and_written_again_is_simply_new(instances: Path) -> None:
    path = announce(instances, "a")
    discovery = Discovery(instances, warn=Warnings())
    discovery.poll_once()
    instances.chmod(0o777)
    discovery.poll_once()
    instances.chmod(0o700)
    path.unlink()
    assert discovery.poll_once() == []
    announce(instances, "a")
    [found] = discovery.poll_once()
    assert isinstance(found, Found) and found.reason == ""


@pytest.mark.skipif(not IS_ROOT, reason="needs root to give a file away")
def test_a_file_refused_then_fixed_comes_back_with_the_reason(instances: Path) -> None:
    path = announce(instances, "a")
    discovery = Discovery(instances, warn=Warnings())
    discovery.poll_once()
    os.chown(path, NOBODY, -1)
    [gone] = discovery.poll_once()
    assert isinstance(gone, Gone) and gone.reason.startswith("refused: ")
    os.chown(path, os.geteuid(), -1)
    [back] = discovery.poll_once()
    assert isinstance(back, Found) and back.reason == f"announcement usable again (was {gone.reason})"


@pytest.mark.skipif(IS_ROOT, reason="root reads a directory of mode 000")
def test_an_unreadable_directory_then_readable_brings_its_announcements_back(instances: Path) -> None:
    announce(instances, "a")
    discovery = Discovery(instances, warn=Warnings())
    discovery.poll_once()
    instances.chmod(0o000)
    try:
        [gone] = discovery.poll_once()
        assert isinstance(gone, Gone) and "Permission denied" in gone.reason
    finally:
        instances.chmod(0o700)
    [back] = discovery.poll_once()
    assert isinstance(back, Found) and back.reason.startswith("announcement usable again")


# --- through a live hub: what is recorded ----------------------------------------------------


async def recorded_active(live: LiveHub, stream: str) -> None:
    """Until the log (not only the supervisor) says `stream` is active: bounded, no fixed sleep."""
    await live.reach(stream, "active")
    for _ in range(1000):
        recorded = await transitions(live, stream)
        if recorded and recorded[-1][2] == "active":
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{stream} never recorded active")


async def transitions(live: LiveHub, stream: str) -> list[tuple[str, str, str, str]]:
    return [
        (e.data["event"], e.data["from"], e.data["to"], e.data["reason"])
        for e in await live.events(stream)
        if e.type == "transition"
    ]


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENOMEM], ids=errno.errorcode.get)
async def test_a_hub_records_nothing_for_a_healthy_instance_while_the_directory_fails(
    live_hub: Any, fake_mcp: Any, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    live: LiveHub = await live_hub()
    fake = await fake_mcp()
    live.announce("a", fake.url)
    await recorded_active(live, "a")
    before = await transitions(live, "a")

    failing = FailingScandir(live.instances_dir, code)
    monkeypatch.setattr(os, "scandir", failing)
    await until(lambda: failing.looks >= 5, 5, "five failed looks")
    failing.failing = False
    looks = failing.looks
    await until(lambda: failing.looks >= looks + 2, 5, "two good looks")

    assert live.hub.state("a") == "active"
    assert await transitions(live, "a") == before
    assert [t[0] for t in before] == ["connect", "connected"]


async def test_a_hub_brings_back_an_instance_removed_for_an_unsafe_directory(
    live_hub: Any, fake_mcp: Any
) -> None:
    live: LiveHub = await live_hub()
    fake = await fake_mcp()
    live.announce("a", fake.url)
    await recorded_active(live, "a")

    live.instances_dir.chmod(0o777)
    await live.reach("a", "dead")
    live.instances_dir.chmod(0o700)
    await recorded_active(live, "a")

    recorded = await transitions(live, "a")
    assert [t[:3] for t in recorded] == REMOVED_AND_BACK
    assert_back_for_the_refusal(recorded[2][3], recorded[3][3])


@dataclass
class Restart:
    """A hub that had `a` (a real in-process MCP server) active, stopped; `again()` starts a new
    hub on the same log and directory, with a discovery that reports to `warnings`."""

    live: LiveHub
    warnings: Warnings

    async def again(self) -> LiveHub:
        discovery = Discovery(
            self.live.instances_dir, use_watcher=False, poll_interval=0.02, warn=self.warnings
        )
        self.live.hub = Hub(self.live.store, discovery, timing=FAST)
        await self.live.hub.start()
        return self.live


@pytest.fixture
async def restart(instances: Path, tmp_path: Path, fake_mcp: Any) -> AsyncIterator[Restart]:
    fake = await fake_mcp()
    store = await EventStore.open(tmp_path / "events.db")
    restart = Restart(
        LiveHub(Hub(store, Discovery(instances, warn=Warnings()), timing=FAST), store, instances), Warnings()
    )
    restart.live.announce("a", fake.url)
    await restart.live.hub.start()
    await recorded_active(restart.live, "a")
    await restart.live.hub.stop("restart")
    yield restart
    await restart.live.hub.stop("test over")
    await store.close()


async def test_a_hub_started_while_the_directory_fails_removes_nothing(
    restart: Restart, instances: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log says `a` is active; the hub restarts out of descriptors: `a` is not missing."""
    failing = FailingScandir(instances, errno.EMFILE)
    monkeypatch.setattr(os, "scandir", failing)
    live = await restart.again()
    await recorded_active(live, "a")
    await until(lambda: failing.looks >= 3, 5, "three failed looks")
    failing.failing = False
    await until(lambda: any("readable again" in w for w in restart.warnings), 5, "a good look")
    looks = failing.looks
    await until(lambda: failing.looks >= looks + 2, 5, "two more looks")
    assert live.hub.state("a") == "active"
    events = [t[0] for t in await transitions(live, "a")]
    assert "remove" not in events and events[-1] == "connected"


async def test_a_hub_started_on_an_unsafe_directory_brings_its_instances_back_once_fixed(
    restart: Restart, instances: Path
) -> None:
    os.chmod(instances, 0o777)
    live = await restart.again()
    await live.reach("a", "dead")
    os.chmod(instances, 0o700)
    await recorded_active(live, "a")
    recorded = (await transitions(live, "a"))[2:]
    assert [t[:3] for t in recorded] == [
        ("rediscover", "active", "discovered"),
        ("remove", "discovered", "dead"),
        ("rediscover", "dead", "discovered"),
        ("connect", "discovered", "connecting"),
        ("connected", "connecting", "active"),
    ]
    assert_back_for_the_refusal(recorded[1][3], recorded[2][3])
