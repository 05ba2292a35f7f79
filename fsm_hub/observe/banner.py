"""The short block `serve` writes on stderr at start: what this process is and where things are.

It goes through the `fsm_hub.banner` logger, so `--quiet` silences it without touching the
rest of stderr logging (`--log-level`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from fsm_hub import __version__
from fsm_hub.core.display import shown
from fsm_hub.observe import presence

if TYPE_CHECKING:
    from fsm_hub.serve.ownership import Owner
    from fsm_hub.serve.process import OwnedHub, ServeOptions

log = logging.getLogger("fsm_hub.banner")


def _directory(options: ServeOptions, refused: str | None) -> str:
    directory = options.instances_dir
    if refused:
        return f"{directory} (refused: {refused}; no instances will be discovered)"
    if not directory.is_dir():
        return f"{directory} (does not exist yet; watched until it appears)"
    return str(directory)


def lines(
    options: ServeOptions,
    *,
    role: str,
    endpoints: list[str],
    refused: str | None = None,
) -> list[str]:
    served = (["stdio"] if options.mcp else []) + endpoints
    config = options.config
    return [
        f"fsm-hub {__version__} (pid {os.getpid()})",
        f"  log:        {options.db}",
        f"  instances:  {shown(_directory(options, refused))}",
        *([f"  config:     {shown(_config(config))}"] if config else []),
        f"  serving:    {', '.join(served) if served else 'no client endpoint (supervising only)'}",
        f"  role:       {role}",
    ]


def _emit(block: list[str]) -> None:
    log.info("\n".join(block))


def owner(options: ServeOptions, owned: OwnedHub) -> None:
    """This process owns the log: say so on stderr and to `fsm-hub status` (`<db>.serving/`)."""
    urls = [e.url for e in owned.endpoints if e.token is None]
    public = [f"{url} (dashboard at {url.removesuffix('/mcp')}/)" for url in urls]
    refused = owned.hub.discovery.refused if owned.hub is not None else None
    _emit(lines(options, role="owns the log (supervising)", endpoints=public, refused=refused))
    presence.record(options.db, (["stdio"] if options.mcp else []) + urls)


def attached(options: ServeOptions, to: Owner) -> None:
    """Another process owns the log; this one relays its stdio client there."""
    role = f"attached to the owning hub, pid {to.pid} (takes over if it exits)"
    _emit(lines(options, role=role, endpoints=[]))
    presence.record(options.db, ["stdio"])


def _config(path: Path) -> str:
    return str(path) if path.exists() else f"{path} (does not exist: no configured servers)"
