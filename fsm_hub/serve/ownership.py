"""Exactly one `fsm-hub serve` owns a log: it holds `<db>.lock` and advertises its endpoint.

Other `serve --mcp` processes on the same log attach to that endpoint; when the owner exits
its lock is released by the kernel, and an attached process takes over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Owner:
    pid: int
    url: str
    token: str


class Ownership:
    def __init__(self, db: Path) -> None:
        # The lock is the real file's: a symlink, a relative path or another alias of the same
        # log must find the same lock, or two processes would both own (and supervise) it.
        db = db.resolve()
        self.lock_path = db.with_name(db.name + ".lock")
        self.info_path = db.with_name(db.name + ".owner.json")
        self._fd: int | None = None

    @property
    def owned(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def advertise(self, url: str, token: str) -> None:
        """Publish the owner's private endpoint, owner-only, atomically."""
        payload = json.dumps({"pid": os.getpid(), "url": url, "token": token})
        temporary = self.info_path.with_name(self.info_path.name + f".{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(payload)
        os.replace(temporary, self.info_path)

    def read(self) -> Owner | None:
        try:
            data: Any = json.loads(self.info_path.read_text())
            return Owner(int(data["pid"]), str(data["url"]), str(data["token"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def release(self) -> None:
        if self._fd is None:
            return
        owner = self.read()
        if owner is not None and owner.pid == os.getpid():
            with contextlib.suppress(OSError):
                self.info_path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
