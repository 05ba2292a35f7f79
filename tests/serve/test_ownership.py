"""One owner per real file: the lock is the resolved log's, whatever path names it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fsm_hub.serve.ownership import Ownership


def test_a_symlink_to_the_log_finds_the_same_owner(tmp_path: Path) -> None:
    real = tmp_path / "state" / "events.db"
    real.parent.mkdir()
    real.touch()
    alias = tmp_path / "alias.db"
    alias.symlink_to(real)
    owner = Ownership(real)
    assert owner.try_acquire()
    try:
        assert not Ownership(alias).try_acquire()
        assert Ownership(alias).lock_path == owner.lock_path
    finally:
        owner.release()
    other = Ownership(alias)
    assert other.try_acquire()  # free again once released
    other.release()


def test_a_relative_path_finds_the_same_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "events.db").touch()
    owner = Ownership(tmp_path / "logs" / "events.db")
    assert owner.try_acquire()
    try:
        monkeypatch.chdir(tmp_path / "logs")
        assert not Ownership(Path("events.db")).try_acquire()
        monkeypatch.chdir(tmp_path)
        assert not Ownership(Path("logs") / ".." / "logs" / "events.db").try_acquire()
    finally:
        owner.release()
    assert os.path.exists(owner.lock_path)
