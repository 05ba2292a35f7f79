"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.lab import Lab
from tests.servers.launch import stop


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    lab.instances_dir.mkdir(mode=0o700)
    yield lab
    for process in lab.processes:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
    stop(lab.processes)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e spawns processes: mark it so `-m "not e2e"` is the fast loop."""
    for item in items:
        if "/tests/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
