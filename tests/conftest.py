"""Shared fixtures. Each section belongs to one area; add yours as a new section."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# MCP servers (used by tests/test_client.py): real SDK servers in subprocesses, and in-process
# fault servers. The servers themselves live in tests/servers/.
# ---------------------------------------------------------------------------------------------
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import freezegun
import pytest

from tests.servers.faults import FakeMcp, Hang, Reset
from tests.servers.launch import SdkServerFactory, spawn_sdk_server, stop


@pytest.fixture(scope="session")
def sdk_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkServerFactory]:
    """``sdk_server(json=, stateless=, event_store=)`` → URL of a real MCP SDK server.

    One process per flag combination is shared by the whole session; ``fresh=True`` starts
    one of your own (do that if you change its tool list). All are killed at session end.
    """
    processes: list[subprocess.Popen[bytes]] = []
    shared: dict[tuple[bool, bool, bool], str] = {}

    def start(
        *, json: bool = False, stateless: bool = False, event_store: bool = False, fresh: bool = False
    ) -> str:
        key = (json, stateless, event_store)
        if key in shared and not fresh:
            return shared[key]
        log = tmp_path_factory.mktemp("sdk-server") / "stderr.log"
        process, url = spawn_sdk_server(log, json=json, stateless=stateless, event_store=event_store)
        processes.append(process)
        if not fresh:
            shared[key] = url
        return url

    yield start
    stop(processes)


@pytest.fixture
async def fake_mcp() -> AsyncIterator[Callable[..., Awaitable[FakeMcp]]]:
    """``await fake_mcp(**quirks)`` starts a FakeMcp in this test's loop; stopped at teardown."""
    started: list[FakeMcp] = []

    async def start(**quirks: Any) -> FakeMcp:
        fake = FakeMcp(**quirks)
        await fake.start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.stop()


@pytest.fixture
async def hang_url() -> AsyncIterator[str]:
    """URL of a server that accepts connections and never answers."""
    hang = Hang()
    yield await hang.start()
    await hang.stop()


@pytest.fixture
async def reset_url() -> AsyncIterator[str]:
    """URL of a server that reads the request and resets the connection."""
    reset = Reset()
    yield await reset.start()
    await reset.stop()


# ----------------------------------------------------------------------------- end MCP servers


# ---------------------------------------------------------------------------------------------
# Event log (used by test_machine, test_recorder, test_store, test_view, test_replay, test_cli,
# e2e/): a fresh log path, an open EventStore, hand-built logs (tests/logs.py).
# ---------------------------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from fsm_hub.store.sqlite import EventStore  # noqa: E402
from tests.logs import LogBuilder, Sample, build_sample  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: runs a real subprocess or a build; slower")


SUBPROCESS_FIXTURES = frozenset({"sdk_server", "sleeper"})
"""Fixtures that start a process (an SDK server; discovery's live pid)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a subprocess fixture is an e2e test wherever it lives."""
    for item in items:
        if SUBPROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


# Freezegun freezes time.monotonic too: the tests' own bounded waits must keep real time, or a
# frozen deadline never passes and a failing wait hangs instead of failing.
freezegun.configure(extend_ignore_list=["tests.supervision", "tests.live_hub"])


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where a fresh event log goes; its directory does not exist yet."""
    return tmp_path / "state" / "fsm-hub" / "events.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[EventStore]:
    """An open EventStore on a fresh log, closed at teardown."""
    opened = await EventStore.open(db_path)
    yield opened
    await opened.close()


@pytest.fixture
def log_builder() -> LogBuilder:
    """Builds StoredEvents by hand (seq, version, one second apart); `.write(path)` stores them."""
    return LogBuilder()


@pytest.fixture
def sample_log(tmp_path: Path) -> Sample:
    """The log of tests/logs.py's `build_sample`, written through the real store."""
    log = build_sample(LogBuilder())
    return Sample(log.write(tmp_path / "sample.db"), log)


# ----------------------------------------------------------------------------- end event log


# ---------------------------------------------------------------------------------------------
# Supervision (used by test_supervisor, test_hub): virtual time for supervisors' timers and an
# MCP server whose availability a test switches. Helpers live in tests/supervision.py.
# ---------------------------------------------------------------------------------------------
pytest.register_assert_rewrite("tests.supervision")  # its helpers assert the timers they see

from tests.servers.flaky import FlakyMcp  # noqa: E402
from tests.supervision import ManualClock  # noqa: E402


@pytest.fixture
def clock() -> ManualClock:
    """The `sleep` to inject: virtual seconds that pass only on `clock.advance(seconds)`."""
    return ManualClock()


@pytest.fixture
async def flaky_mcp() -> AsyncIterator[Callable[..., Awaitable[FlakyMcp]]]:
    """``await flaky_mcp(**quirks)`` starts a FlakyMcp (pause/resume, down/up); stopped at teardown."""
    started: list[FlakyMcp] = []

    async def start(**quirks: Any) -> FlakyMcp:
        flaky = FlakyMcp(**quirks)
        await flaky.start()
        started.append(flaky)
        return flaky

    yield start
    for flaky in started:
        flaky.resume()
        await flaky.stop()


# ----------------------------------------------------------------------------- end supervision


# ---------------------------------------------------------------------------------------------
# MCP serving (used by test_mcp_server, test_http_server): a live hub in the test's loop, with
# instances that are in-process fault servers (tests/servers/) on short real timers.
# ---------------------------------------------------------------------------------------------
from fsm_hub.discovery.directory import Discovery  # noqa: E402
from fsm_hub.supervision.hub import Hub  # noqa: E402
from fsm_hub.supervision.supervisor import Timing  # noqa: E402
from tests.live_hub import FAST, LiveHub  # noqa: E402
from tests.servers.slow import SlowMcp  # noqa: E402


@pytest.fixture
async def live_hub(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[LiveHub]]]:
    """``await live_hub(timing=FAST)``: a started Hub on a fresh log and instances directory.

    Its sessions (made with ``live.session()``) are closed and the hub stopped at teardown.
    """
    started: list[LiveHub] = []

    async def start(timing: Timing = FAST) -> LiveHub:
        instances = tmp_path / f"instances-{len(started)}"
        instances.mkdir(mode=0o700)
        store = await EventStore.open(tmp_path / f"hub-{len(started)}.db")
        discovery = Discovery(instances, use_watcher=False, poll_interval=0.02, warn=lambda _: None)
        hub = Hub(store, discovery, timing=timing)
        await hub.start()
        live = LiveHub(hub, store, instances)
        started.append(live)
        return live

    yield start
    for live in started:
        for session in live.sessions:
            if not session.closed:
                await session.close("test over")
        await live.hub.stop("test over")
        await live.store.close()


@pytest.fixture
async def slow_mcp() -> AsyncIterator[SlowMcp]:
    """A FakeMcp whose `sleep` tool never answers and which records `notifications/cancelled`."""
    slow = SlowMcp()
    await slow.start()
    yield slow
    await slow.stop()


# ----------------------------------------------------------------------------- end MCP serving


@pytest.fixture(autouse=True)
def _own_config_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test (nor the hubs it spawns) may read or write the user's configured servers."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config-home")))
    monkeypatch.delenv("FSM_HUB_CONFIG", raising=False)


# -- a lab: a temp directory with an instances dir and a log, and the processes a test started --

import os  # noqa: E402
import signal  # noqa: E402

from tests.e2e.lab import Lab  # noqa: E402


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """Used by the end-to-end tests and the hub's own: every process it started is stopped (and
    resumed first, if a test left it SIGSTOPped)."""
    lab = Lab(tmp_path)
    lab.instances_dir.mkdir(mode=0o700)
    yield lab
    for process in lab.processes:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
    stop(lab.processes)
