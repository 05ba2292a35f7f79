"""Announcing a server that is not brummer: write the same instance file brummer writes.

The file is validated with the parser discovery uses, written owner-only (0600) to a
temporary name and renamed into place, so the hub never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fsm_hub.discovery.directory import parse_announcement
from fsm_hub.errors import FsmHubError

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def instance_document(
    name: str, port: int, *, url: str | None, pid: int | None, directory: str, instance_id: str
) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    document: dict[str, Any] = {
        "id": instance_id,
        "name": name,
        "directory": directory,
        "port": port,
        "started_at": now,
        "last_ping": now,
    }
    if url is not None:
        document["url"] = url
    if pid is not None:
        document["process_info"] = {"pid": pid}
    return document


def new_id(name: str) -> str:
    """A readable, unique file id: the name's safe characters plus random hex."""
    stem = _ID_UNSAFE.sub("-", name).strip("-.")[:40] or "instance"
    return f"{stem}-{secrets.token_hex(4)}"


def write_instance_file(directory: Path, document: dict[str, Any], *, allow_remote: bool = False) -> Path:
    """Validate, then write `<directory>/<id>.json` atomically, owner-only."""
    data = json.dumps(document, indent=2).encode()
    try:
        parse_announcement(data, expected_id=document["id"], allow_remote=allow_remote)
    except FsmHubError as exc:
        raise FsmHubError(f"not a valid instance file: {exc}") from None
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = directory / f"{document['id']}.json"
    temporary = directory / f".{document['id']}.json.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return target
