"""What the log says about a server when it appears or changes, and why it is rediscovered.

The payloads of `instance_discovered` / `instance_updated` for announced and configured servers,
and the reasons recorded with `rediscover`: small pure functions the hub records with.
"""

from __future__ import annotations

from typing import Any

from fsm_hub.core.view import InstanceView
from fsm_hub.discovery.config import ServerSpec
from fsm_hub.discovery.directory import Announcement


def announced(announcement: Announcement) -> dict[str, Any]:
    """The payload of `instance_discovered` / `instance_updated`."""
    return {
        "name": announcement.name,
        "directory": announcement.directory,
        "port": announcement.port,
        "pid": announcement.pid,
        "url": announcement.url,
    }


def evidence(instance: InstanceView) -> tuple[int | None, int | None, str | None]:
    return (instance.port, instance.pid, instance.url)


def configured_payload(spec: ServerSpec) -> dict[str, Any]:
    """The payload of `instance_discovered` / `instance_updated` for a configured server.

    Names of env and headers only, command/args/url as written: never a secret value.
    """
    description = spec.describe()
    server = description.to_json()
    server.pop("fingerprint")  # keyed per process: it would tell nothing in a later run
    return {
        "name": spec.name,
        "directory": "",
        "port": None,
        "pid": None,
        "url": description.url,
        "kind": spec.kind,
        "source": spec.source,
        "server": server,
    }


def config_changed(before: ServerSpec, after: ServerSpec) -> str:
    old, new = before.describe(), after.describe()
    changes = [
        name
        for name, a, b in (
            ("command", old.command, new.command),
            ("args", old.args, new.args),
            ("cwd", old.cwd, new.cwd),
            ("url", old.url, new.url),
            ("env names", old.env, new.env),
            ("header names", old.headers, new.headers),
        )
        if a != b
    ]
    return "config changed: " + (", ".join(changes) if changes else "env or header values")


def what_changed(before: InstanceView, after: Announcement) -> str:
    changes = [
        _change(name, old, new)
        for name, old, new in (
            ("port", before.port, after.port),
            ("pid", before.pid, after.pid),
            ("url", before.url, after.url),
        )
        if old != new
    ]
    return "re-announced: " + ", ".join(changes)


def _change(name: str, old: object, new: object) -> str:
    """`pid 1 → 2`; an unknown side is left out rather than shown as `None`."""
    if old is None:
        return f"{name} {new} (not announced before)"
    if new is None:
        return f"{name} {old} no longer announced"
    return f"{name} {old} → {new}"
