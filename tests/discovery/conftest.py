"""Fixtures of the discovery tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def instances(tmp_path: Path) -> Path:
    """An empty instances directory, ours alone (0700)."""
    directory = tmp_path / "instances"
    directory.mkdir(mode=0o700)
    return directory
