"""Discovery against real files in tmp_path and real processes; no test waits on a timer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncGenerator, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from fsm_hub.discovery.directory import (
    MAX_FILE_SIZE,
    Announcement,
    Change,
    Changed,
    Discovery,
    Found,
    Gone,
    Updated,
    default_instances_dir,
    parse_rfc3339,
    scan,
)
from tests.discovery.announcements import (
    DROP,
    IS_ROOT,
    NOBODY,
    Warnings,
    announce,
    document,
    write_atomically,
)


class ManualSleep:
    """A sleeper that returns only when the test says `tick()`."""

    def __init__(self) -> None:
        self.ticks: asyncio.Queue[None] = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        await self.ticks.get()

    def tick(self) -> None:
        self.ticks.put_nowait(None)


async def sleep_forever(seconds: float) -> None:
    await asyncio.Event().wait()


async def take(changes: AsyncGenerator[list[Change], None]) -> list[Change]:
    return await anext(changes)


async def next_batch(changes: AsyncGenerator[list[Change], None]) -> list[Change]:
    return await asyncio.wait_for(take(changes), 5)


@pytest.fixture
def warnings() -> Warnings:
    return Warnings()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real process whose pid an announcement can carry; the test may kill it."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()  # reaped: a zombie still answers kill(pid, 0)


# --- reading files -----------------------------------------------------------------------------


def test_a_brummer_file_is_found_with_every_field(instances: Path, warnings: Warnings) -> None:
    announce(instances)

    result = scan(instances, warn=warnings)

    assert result.announcements == {
        "abc123": Announcement(
            id="abc123",
            name="web",
            directory="/src/web",
            port=7777,
            pid=os.getpid(),
            url="http://127.0.0.1:7777/mcp",
            executable="/usr/local/bin/brummer",
            started_at=datetime(2025, 6, 1, 10, 0, 0, 123456, tzinfo=UTC),
            last_ping=datetime(2025, 6, 1, 10, 0, 5, 500000, tzinfo=UTC),
        )
    }
    assert result.refused is None
    assert warnings == []


def test_a_minimal_file_without_process_info_is_found(instances: Path) -> None:
    announce(instances, process_info=DROP, started_at=DROP, last_ping=DROP, directory=DROP)

    found = scan(instances, warn=Warnings()).announcements["abc123"]

    assert (found.pid, found.executable, found.started_at, found.directory) == (None, None, None, "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-06-01T10:00:00.123456789Z", datetime(2025, 6, 1, 10, 0, 0, 123456, tzinfo=UTC)),
        (
            "2025-06-01T12:00:00.999999999+02:00",
            datetime(2025, 6, 1, 12, 0, 0, 999999, tzinfo=timezone(timedelta(hours=2))),
        ),
        (
            "2025-06-01T02:30:00.1-07:30",
            datetime(2025, 6, 1, 2, 30, 0, 100000, tzinfo=timezone(-timedelta(hours=7, minutes=30))),
        ),
        ("2025-06-01T10:00:00Z", datetime(2025, 6, 1, 10, 0, 0, tzinfo=UTC)),
    ],
)
def test_rfc3339_with_nanoseconds_and_offsets(text: str, expected: datetime) -> None:
    parsed = parse_rfc3339(text)

    assert parsed == expected
    assert parsed.utcoffset() == expected.utcoffset()


def test_go_zero_time_means_unset(instances: Path) -> None:
    announce(instances, started_at="0001-01-01T00:00:00Z")

    assert scan(instances, warn=Warnings()).announcements["abc123"].started_at is None


BAD_FILES: dict[str, bytes] = {
    "half-written": json.dumps(document("bad")).encode()[:40],
    "garbage": b"\x00\xffnot json at all",
    "empty": b"",
    "non-object": b'["bad", 7777]',
    "deeply nested": b"[" * 50_000,
    "port as string": json.dumps(document("bad", port="7777")).encode(),
    "port zero": json.dumps(document("bad", port=0)).encode(),
    "port too big": json.dumps(document("bad", port=65536)).encode(),
    "port boolean": json.dumps(document("bad", port=True)).encode(),
    "port float": json.dumps(document("bad", port=7777.0)).encode(),
    "port missing": json.dumps(document("bad", port=DROP)).encode(),
    "id missing": json.dumps(document("bad", id=DROP)).encode(),
    "id empty": json.dumps(document("bad", id="")).encode(),
    "id not the file name": json.dumps(document("other")).encode(),
    "name not a string": json.dumps(document("bad", name=5)).encode(),
    "negative pid": json.dumps(document("bad", process_info={"pid": -1})).encode(),
    "pid as string": json.dumps(document("bad", process_info={"pid": "12"})).encode(),
    "process_info a list": json.dumps(document("bad", process_info=[1])).encode(),
    "bad timestamp": json.dumps(document("bad", last_ping="yesterday")).encode(),
    "ftp url": json.dumps(document("bad", url="ftp://127.0.0.1/mcp")).encode(),
    "url without host": json.dumps(document("bad", url="http:///mcp")).encode(),
    "url with bad port": json.dumps(document("bad", url="http://127.0.0.1:99999/mcp")).encode(),
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_file_is_skipped_with_one_warning(instances: Path, warnings: Warnings, content: bytes) -> None:
    announce(instances, "good")
    write_atomically(instances / "bad.json", content)

    result = scan(instances, warn=warnings)

    assert list(result.announcements) == ["good"]
    assert len(warnings) == 1
    assert "bad.json" in warnings[0]
    assert "\n" not in warnings[0]


def test_an_oversized_file_is_not_read(instances: Path, warnings: Warnings) -> None:
    announce(instances, "good")
    padding = " " * MAX_FILE_SIZE
    write_atomically(instances / "big.json", json.dumps(document("big", name=padding)).encode())

    result = scan(instances, warn=warnings)

    assert list(result.announcements) == ["good"]
    assert len(warnings) == 1
    assert "larger than 64 KiB" in warnings[0]


def test_a_symlink_is_not_followed(instances: Path, tmp_path: Path, warnings: Warnings) -> None:
    announce(tmp_path, "linked")
    (instances / "linked.json").symlink_to(tmp_path / "linked.json")
    announce(instances, "good")

    result = scan(instances, warn=warnings)

    assert list(result.announcements) == ["good"]
    assert len(warnings) == 1
    assert "symbolic link" in warnings[0]


def test_a_directory_named_like_a_file_is_skipped(instances: Path, warnings: Warnings) -> None:
    (instances / "odd.json").mkdir()

    assert scan(instances, warn=warnings).announcements == {}
    assert len(warnings) == 1


def test_temp_and_other_files_are_ignored_silently(instances: Path, warnings: Warnings) -> None:
    for name in (".tmp-instance-123", ".abc.json", "abc.json.tmp", "abc.json~", "notes.txt", ".json"):
        (instances / name).write_text("garbage")
    (instances / ".discovery.lock").write_text("")

    assert scan(instances, warn=warnings).announcements == {}
    assert warnings == []


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_a_file_owned_by_another_user_is_ignored(instances: Path, warnings: Warnings) -> None:
    os.chown(announce(instances, "planted"), NOBODY, NOBODY)
    announce(instances, "good")

    result = scan(instances, warn=warnings)

    assert list(result.announcements) == ["good"]
    assert len(warnings) == 1
    assert f"owned by uid {NOBODY}" in warnings[0]


# --- the directory ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o702])
def test_a_world_writable_directory_is_refused(instances: Path, warnings: Warnings, mode: int) -> None:
    announce(instances)
    instances.chmod(mode)
    discovery = Discovery(instances, warn=warnings, use_watcher=False)

    assert discovery.poll_once() == []
    assert discovery.current == {}
    assert discovery.refused is not None
    assert "writable by every user" in discovery.refused
    assert len(warnings) == 1
    assert discovery.poll_once() == []
    assert len(warnings) == 1  # said once, not every poll


def test_a_directory_writable_by_our_own_group_is_used(instances: Path) -> None:
    announce(instances)
    os.chown(instances, -1, os.getegid())
    instances.chmod(0o770)

    assert list(scan(instances, warn=Warnings()).announcements) == ["abc123"]


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_a_directory_writable_by_another_group_is_refused(instances: Path) -> None:
    announce(instances)
    os.chown(instances, -1, NOBODY)
    instances.chmod(0o770)

    result = scan(instances, warn=Warnings())

    assert result.announcements == {}
    assert result.refused is not None
    assert f"writable by group {NOBODY}" in result.refused


@pytest.mark.skipif(not IS_ROOT, reason="chown to another user needs root")
def test_a_directory_owned_by_another_user_is_refused(instances: Path) -> None:
    announce(instances)
    os.chown(instances, NOBODY, -1)

    result = scan(instances, warn=Warnings())

    assert result.announcements == {}
    assert result.refused is not None
    assert f"owned by uid {NOBODY}" in result.refused


def test_a_file_in_place_of_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "instances").write_text("")

    result = scan(tmp_path / "instances", warn=Warnings())

    assert result.refused is not None
    assert "not a directory" in result.refused


def test_a_missing_directory_is_not_an_error(tmp_path: Path, warnings: Warnings) -> None:
    result = scan(tmp_path / "not-yet", warn=warnings)

    assert (result.announcements, result.refused, warnings) == ({}, None, [])


def test_known_instances_are_gone_when_the_directory_turns_unsafe(instances: Path) -> None:
    announce(instances)
    discovery = Discovery(instances, warn=Warnings(), use_watcher=False)
    discovery.poll_once()
    instances.chmod(0o777)

    [gone] = discovery.poll_once()

    assert isinstance(gone, Gone)
    assert gone.reason.startswith("instances directory refused:")


# --- urls ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5:1/mcp",
        "http://0.0.0.0:1/mcp",
        "http://example.com/mcp",
        "http://127.0.0.1.nip.io/mcp",
    ],
)
def test_a_remote_url_is_refused(instances: Path, warnings: Warnings, url: str) -> None:
    announce(instances, url=url)

    result = scan(instances, warn=warnings)

    assert result.announcements == {}
    assert len(warnings) == 1
    assert "refused" in warnings[0]
    assert "loopback" in warnings[0]


@pytest.mark.parametrize("url", ["http://10.0.0.5:1/mcp", "http://0.0.0.0:1/mcp", "https://example.com/mcp"])
def test_a_remote_url_is_accepted_with_allow_remote(instances: Path, url: str) -> None:
    announce(instances, url=url)

    result = scan(instances, allow_remote=True, warn=Warnings())

    assert result.announcements["abc123"].url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:9000/mcp",
        "http://localhost:9000/mcp",
        "https://LOCALHOST/mcp",
        "http://[::1]:9000/mcp",
        "http://[::ffff:127.0.0.1]:9000/mcp",
    ],
)
def test_loopback_urls_are_accepted(instances: Path, url: str) -> None:
    announce(instances, url=url)

    assert scan(instances, warn=Warnings()).announcements["abc123"].url == url


def test_the_url_defaults_to_the_port(instances: Path) -> None:
    announce(instances, port=4321)

    assert scan(instances, warn=Warnings()).announcements["abc123"].url == "http://127.0.0.1:4321/mcp"


# --- changes between scans -------------------------------------------------------------------


@pytest.fixture
def discovery(instances: Path, warnings: Warnings) -> Discovery:
    return Discovery(instances, warn=warnings, use_watcher=False)


def test_the_first_scan_reports_everything_as_found(instances: Path, discovery: Discovery) -> None:
    announce(instances, "a")
    announce(instances, "b")

    batch = discovery.poll_once()

    assert [type(c) for c in batch] == [Found, Found]
    assert sorted(discovery.current) == ["a", "b"]


@pytest.mark.parametrize(
    "change",
    [{"port": 8888}, {"process_info": {"pid": 1}}, {"url": "http://localhost:7777/mcp"}],
    ids=["port", "pid", "url"],
)
def test_new_evidence_is_changed(instances: Path, discovery: Discovery, change: dict[str, Any]) -> None:
    announce(instances)
    [found] = discovery.poll_once()
    announce(instances, **change)

    [changed] = discovery.poll_once()

    assert isinstance(found, Found)
    assert changed == Changed(discovery.current["abc123"], found.announcement)


def test_a_new_name_is_updated(instances: Path, discovery: Discovery) -> None:
    announce(instances)
    discovery.poll_once()
    announce(instances, name="api")

    assert discovery.poll_once() == [Updated(discovery.current["abc123"])]
    assert discovery.current["abc123"].name == "api"


def test_a_new_last_ping_alone_is_no_news(instances: Path, discovery: Discovery) -> None:
    announce(instances)
    discovery.poll_once()
    announce(instances, last_ping="2025-06-01T10:09:00.000000001Z")

    assert discovery.poll_once() == []
    assert discovery.current["abc123"].last_ping == datetime(2025, 6, 1, 10, 9, tzinfo=UTC)


def test_nothing_new_is_an_empty_batch(instances: Path, discovery: Discovery) -> None:
    announce(instances)
    discovery.poll_once()

    assert discovery.poll_once() == []


def test_a_deleted_file_is_gone(instances: Path, discovery: Discovery) -> None:
    path = announce(instances)
    discovery.poll_once()
    path.unlink()

    assert discovery.poll_once() == [Gone("abc123", "instance file removed")]
    assert discovery.current == {}


def test_a_dead_process_is_gone_once_and_found_again_on_restart(
    instances: Path, discovery: Discovery, sleeper: subprocess.Popen[bytes]
) -> None:
    announce(instances, process_info={"pid": sleeper.pid})
    assert [type(c) for c in discovery.poll_once()] == [Found]
    kill(sleeper)

    assert discovery.poll_once() == [Gone("abc123", f"process {sleeper.pid} is gone")]
    assert discovery.poll_once() == []
    announce(instances, process_info={"pid": os.getpid()})
    assert discovery.poll_once() == [Found(discovery.current["abc123"])]


def test_a_file_with_a_dead_pid_is_never_found(
    instances: Path, discovery: Discovery, sleeper: subprocess.Popen[bytes], warnings: Warnings
) -> None:
    kill(sleeper)
    announce(instances, process_info={"pid": sleeper.pid})

    assert discovery.poll_once() == []
    assert warnings == []


def test_a_known_file_caught_mid_write_keeps_the_instance(
    instances: Path, discovery: Discovery, warnings: Warnings
) -> None:
    path = announce(instances)
    [found] = discovery.poll_once()
    path.write_text('{"id": "abc1')  # a writer that does not rename

    assert isinstance(found, Found)
    assert discovery.poll_once() == []
    assert discovery.current == {"abc123": found.announcement}
    assert len(warnings) == 1
    announce(instances)
    assert discovery.poll_once() == []


def test_a_known_unreadable_file_whose_process_died_is_gone(
    instances: Path, discovery: Discovery, sleeper: subprocess.Popen[bytes]
) -> None:
    path = announce(instances, process_info={"pid": sleeper.pid})
    discovery.poll_once()
    path.write_text("")
    kill(sleeper)

    assert discovery.poll_once() == [Gone("abc123", f"process {sleeper.pid} is gone")]


def test_a_known_instance_that_turns_remote_is_gone(instances: Path, discovery: Discovery) -> None:
    announce(instances)
    discovery.poll_once()
    announce(instances, url="http://10.0.0.5:1/mcp")

    [gone] = discovery.poll_once()

    assert isinstance(gone, Gone)
    assert gone.reason.startswith("refused: url")


def test_a_problem_is_warned_once_per_content(
    instances: Path, discovery: Discovery, warnings: Warnings
) -> None:
    bad = instances / "bad.json"
    write_atomically(bad, b"garbage")
    discovery.poll_once()
    discovery.poll_once()
    assert len(warnings) == 1

    write_atomically(bad, b"other garbage")
    discovery.poll_once()
    discovery.poll_once()
    assert len(warnings) == 2

    announce(instances, "bad")
    write_atomically(bad, b"garbage")
    discovery.poll_once()
    assert len(warnings) == 3  # fixed, then broken again: worth saying again


# --- the changes() stream --------------------------------------------------------------------


async def test_the_first_batch_comes_even_when_empty(instances: Path) -> None:
    changes = Discovery(instances, warn=Warnings(), use_watcher=False, sleep=sleep_forever).changes()

    assert await next_batch(changes) == []
    await changes.aclose()


async def test_a_directory_created_later_is_picked_up(tmp_path: Path, warnings: Warnings) -> None:
    clock = ManualSleep()
    directory = tmp_path / "brummer" / "instances"
    changes = Discovery(directory, warn=warnings, use_watcher=False, sleep=clock).changes()
    assert await next_batch(changes) == []

    directory.mkdir(parents=True, mode=0o700)
    announce(directory)
    clock.tick()

    [found] = await next_batch(changes)
    assert isinstance(found, Found)
    assert warnings == []
    await changes.aclose()


async def test_polling_reports_changes_tick_by_tick(
    instances: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    clock = ManualSleep()
    discovery = Discovery(instances, warn=Warnings(), use_watcher=False, sleep=clock)
    changes = discovery.changes()
    assert await next_batch(changes) == []

    announce(instances, "a", process_info={"pid": sleeper.pid})
    announce(instances, "b")
    clock.tick()
    assert [type(c) for c in await next_batch(changes)] == [Found, Found]

    clock.tick()  # nothing new: no batch, the loop sleeps again
    kill(sleeper)
    clock.tick()
    assert await next_batch(changes) == [Gone("a", f"process {sleeper.pid} is gone")]
    assert list(discovery.current) == ["b"]
    await changes.aclose()


async def test_the_watcher_reports_an_atomic_write_without_a_poll(instances: Path) -> None:
    changes = Discovery(instances, warn=Warnings(), sleep=sleep_forever).changes()
    assert await next_batch(changes) == []
    pending = asyncio.create_task(take(changes))
    for _ in range(20):  # let the watch task start watching; no timer involved
        await asyncio.sleep(0)

    announce(instances)

    [found] = await asyncio.wait_for(pending, 5)
    assert isinstance(found, Found)
    await changes.aclose()


async def test_cancelling_the_consumer_stops_everything(instances: Path) -> None:
    batches: list[list[Change]] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for batch in Discovery(instances, warn=Warnings(), sleep=sleep_forever).changes():
            batches.append(batch)
            first.set()

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)  # the first look runs in a thread
    for _ in range(20):
        await asyncio.sleep(0)
    assert batches == [[]]
    assert len(asyncio.all_tasks()) > 2  # the consumer and its watcher

    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer

    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_the_watcher_follows_the_task_that_resumes_it(instances: Path) -> None:
    """The hub takes the first batch in its start task and the rest in another task; a task
    that ends stops the watcher, the next one to resume the stream starts it again."""
    changes = Discovery(instances, warn=Warnings(), sleep=sleep_forever).changes()
    assert await asyncio.create_task(take(changes)) == []

    for instance_id in ("a", "b"):
        pending = asyncio.create_task(take(changes))
        for _ in range(20):
            await asyncio.sleep(0)
        announce(instances, instance_id)
        [found] = await asyncio.wait_for(pending, 5)  # only the watcher can wake it
        assert isinstance(found, Found)
        assert found.announcement.id == instance_id
    await changes.aclose()


# --- where to look ---------------------------------------------------------------------------


def test_default_instances_dir_prefers_our_variable() -> None:
    env = {"FSM_HUB_INSTANCES_DIR": "/srv/announce", "XDG_RUNTIME_DIR": "/run/user/1000"}

    assert default_instances_dir(env) == Path("/srv/announce")


def test_default_instances_dir_follows_xdg_runtime_dir() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}

    assert default_instances_dir(env) == Path("/run/user/1000/brummer/instances")


def test_default_instances_dir_falls_back_to_the_temp_dir() -> None:
    assert default_instances_dir({"XDG_RUNTIME_DIR": ""}) == (
        Path(tempfile.gettempdir()) / "brummer" / "instances"
    )


# --- unchanged files are not re-read ---------------------------------------------------------


def test_a_same_size_rewrite_with_the_old_mtime_is_still_seen(instances: Path) -> None:
    path = announce(instances, port=7001)
    discovery = Discovery(instances, warn=Warnings(), use_watcher=False)
    discovery.poll_once()
    before = os.stat(path)
    path.write_text(path.read_text().replace("7001", "7002"))  # same size, in place
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime

    [changed] = discovery.poll_once()

    assert isinstance(changed, Changed) and changed.announcement.port == 7002


def test_a_known_file_swapped_for_a_symlink_is_refused(instances: Path, tmp_path: Path) -> None:
    path = announce(instances)
    discovery = Discovery(instances, warn=Warnings(), use_watcher=False)
    discovery.poll_once()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(elsewhere)

    [gone] = discovery.poll_once()

    assert isinstance(gone, Gone) and "symbolic link" in gone.reason


def test_an_unchanged_file_of_a_dead_process_is_gone(
    instances: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    announce(instances, process_info={"pid": sleeper.pid, "executable": "sleep"})
    discovery = Discovery(instances, warn=Warnings(), use_watcher=False)
    [found] = discovery.poll_once()
    assert isinstance(found, Found)
    kill(sleeper)

    [gone] = discovery.poll_once()  # the file is untouched, so only the pid check can tell

    assert gone == Gone("abc123", f"process {sleeper.pid} is gone")
