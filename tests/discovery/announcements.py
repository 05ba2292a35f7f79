"""Announcement files as brummer writes them, and a warn callback that remembers: shared by the
discovery tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534
DROP = object()
"""Pass as a field value to `announce` to leave the field out."""


def document(instance_id: str = "abc123", /, **fields: Any) -> dict[str, Any]:
    """A brummer announcement, as brummer writes it, for a process that is running (us)."""
    doc: dict[str, Any] = {
        "id": instance_id,
        "name": "web",
        "directory": "/src/web",
        "port": 7777,
        "started_at": "2025-06-01T10:00:00.123456789Z",
        "last_ping": "2025-06-01T10:00:05.5Z",
        "process_info": {"pid": os.getpid(), "executable": "/usr/local/bin/brummer"},
    }
    doc.update(fields)
    return {key: value for key, value in doc.items() if value is not DROP}


def write_atomically(path: Path, content: bytes) -> None:
    """What brummer does: a hidden temp file in the same directory, then rename."""
    temp = path.parent / f".tmp-instance-{path.stem}"
    temp.write_bytes(content)
    os.replace(temp, path)


def announce(folder: Path, instance_id: str = "abc123", /, **fields: Any) -> Path:
    path = folder / f"{instance_id}.json"
    write_atomically(path, json.dumps(document(instance_id, **fields)).encode())
    return path


class Warnings(list[str]):
    """A warn callback that remembers."""

    def __call__(self, message: str) -> None:
        self.append(message)


REMOVED_AND_BACK = [
    ("connect", "discovered", "connecting"),
    ("connected", "connecting", "active"),
    ("remove", "active", "dead"),
    ("rediscover", "dead", "discovered"),
    ("connect", "discovered", "connecting"),
    ("connected", "connecting", "active"),
]
"""(event, from, to) of an instance removed because its directory turned unsafe, then fixed."""


def assert_back_for_the_refusal(removed: str, back: str) -> None:
    """The reasons recorded for `remove` and for the `rediscover` after the directory was fixed."""
    assert (
        removed.startswith("instances directory refused: ")
        and "writable by every user (mode 0777)" in removed
    )
    assert back == f"announcement usable again (was {removed})"
