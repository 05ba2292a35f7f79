"""Which `serve` processes use a log now: one small file each in `<db>.serving/`, for `status`.

Written at start (owner-only, atomically) and removed at exit; a file whose process is gone
(killed) is ignored by readers. The owner is whichever of them `<db>.owner.json` names.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsm_hub.core.events import format_time, utc_now
from fsm_hub.discovery.directory import process_is_running


def presence_dir(db: Path) -> Path:
    return db.with_name(db.name + ".serving")


@dataclass(frozen=True, slots=True)
class Serving:
    pid: int
    since: str
    endpoints: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "since": self.since, "endpoints": list(self.endpoints)}


def record(db: Path, endpoints: list[str]) -> None:
    """Say that this process serves `db`, until it exits. Best effort: status is a courtesy."""
    directory = presence_dir(db)
    path = directory / f"{os.getpid()}.json"
    payload = json.dumps({"pid": os.getpid(), "since": format_time(utc_now()), "endpoints": endpoints})
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        temporary = directory / f".{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(payload)
        os.replace(temporary, path)
    except OSError:
        return
    atexit.register(_forget, path)


def _forget(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def serving(db: Path) -> list[Serving]:
    """The live processes serving `db`, oldest first."""
    found: list[Serving] = []
    try:
        entries = list(presence_dir(db).glob("*.json"))
    except OSError:
        return found
    for entry in entries:
        try:
            data = json.loads(entry.read_text())
            item = Serving(int(data["pid"]), str(data["since"]), tuple(str(e) for e in data["endpoints"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if process_is_running(item.pid):
            found.append(item)
    return sorted(found, key=lambda s: (s.since, s.pid))
