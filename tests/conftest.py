"""Shared fixtures. Each section belongs to one area; add yours as a new section."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# MCP servers (used by tests/test_client.py): real SDK servers in subprocesses, and in-process
# fault servers. The servers themselves live in tests/servers/.
# ---------------------------------------------------------------------------------------------
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

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

from fsm_hub.store import EventStore  # noqa: E402
from tests.logs import LogBuilder, Sample, build_sample  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: runs a real subprocess or a build; slower")


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
