"""Start and stop the SDK test server as a real subprocess on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from tests.servers.faults import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_LIMIT = 20.0


class SdkServerFactory(Protocol):
    """What the ``sdk_server`` fixture hands a test: flags in, endpoint URL out."""

    def __call__(
        self, *, json: bool = False, stateless: bool = False, event_store: bool = False, fresh: bool = False
    ) -> str: ...


def spawn_sdk_server(
    log: Path, *, json: bool = False, stateless: bool = False, event_store: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m tests.servers.sdk_server`` and return once its port accepts connections."""
    port = free_port()
    flags = [
        flag
        for flag, on in (("--json", json), ("--stateless", stateless), ("--event-store", event_store))
        if on
    ]
    return _spawn("tests.servers.sdk_server", port, flags, log)


def spawn_fault_server(log: Path, mode: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m tests.servers.faults --mode MODE``; return once its port accepts connections."""
    return _spawn("tests.servers.faults", free_port(), ["--mode", mode], log)


def _spawn(module: str, port: int, flags: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    return spawn_listening([sys.executable, "-m", module, "--port", str(port), *flags], port, log)


def spawn_listening(
    argv: list[str], port: int, log: Path, *, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `argv` (stderr into `log`) and return once it accepts connections on `port`."""
    with log.open("wb") as stderr:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        _wait_until_accepting(port, process, log)
    except BaseException:
        stop([process])
        raise
    return process, f"http://127.0.0.1:{port}/mcp"


def _wait_until_accepting(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"SDK server exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.03)
    raise RuntimeError(f"SDK server did not listen on {port} within {STARTUP_LIMIT:g}s:\n{log.read_text()}")


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """Terminate, then kill whatever is still alive after a grace period."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

