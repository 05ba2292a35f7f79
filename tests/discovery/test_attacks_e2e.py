"""The red-team attacks on discovery against the real console script: a hub really out of file
descriptors, and an instances directory made world-writable and then fixed; what was recorded is
read back through `fsm-hub history --json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.discovery.announcements import REMOVED_AND_BACK, assert_back_for_the_refusal
from tests.e2e.lab import FSM_HUB, Lab, eventually, transitions
from tests.servers.faults import free_port

pytestmark = pytest.mark.e2e

FD_LIMIT = 160
"""The hub's RLIMIT_NOFILE: room to start and connect, little enough to exhaust from outside."""


class HubProcess:
    """`fsm-hub serve --http` with its stderr in a file, read back on demand."""

    def __init__(self, process: asyncio.subprocess.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr

    @property
    def lines(self) -> list[str]:
        return self.stderr.read_text(errors="replace").splitlines()

    def said(self, fragment: str) -> bool:
        return any(fragment in line for line in self.lines)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@contextlib.asynccontextmanager
async def hub(lab: Lab, *, fd_limit: int | None = None) -> AsyncIterator[tuple[HubProcess, int]]:
    port = free_port()

    def limit() -> None:
        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    args = [
        "serve",
        "--http",
        f"127.0.0.1:{port}",
        "--db",
        str(lab.db),
        "--instances-dir",
        str(lab.instances_dir),
    ]
    # Pings every second: pings failing for lack of fds must record nothing either.
    stderr = lab.root / "hub-stderr.log"
    with stderr.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            FSM_HUB, *args, "--ping-interval", "1",
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=sink, preexec_fn=limit,
        )  # fmt: skip
    running = HubProcess(process, stderr)
    try:
        yield running, port
    finally:
        await running.stop()


def recorded(lab: Lab, ref: str) -> list[tuple[str, str, str]]:
    """(event, from, to) of each recorded transition; none while the log does not know `ref`."""
    if lab.cli("history", ref, "--json").returncode != 0:
        return []
    return [(event, source, target) for event, source, target, _ in transitions(lab, ref)]


async def test_a_hub_out_of_file_descriptors_records_no_healthy_instance_dead(lab: Lab) -> None:
    lab.start("a1b2c3", "web")
    held: list[socket.socket] = []
    async with hub(lab, fd_limit=FD_LIMIT) as (running, port):
        await eventually(lambda: recorded(lab, "web")[-1:] == [("connected", "connecting", "active")], 30)

        # Half-open connections until the hub has no descriptor left (as in the attack).
        async def exhaust() -> bool:
            for _ in range(20):
                sock = socket.socket()
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError, OSError):
                    sock.connect(("127.0.0.1", port))
                held.append(sock)
            return running.said("Too many open files")

        try:
            await eventually(exhaust, 30)
            await eventually(lambda: running.said("instances directory unreadable for now"), 30)
        finally:
            for sock in held:
                sock.close()
        await eventually(lambda: running.said("is readable again"), 30)
        assert recorded(lab, "web") == [
            ("connect", "discovered", "connecting"),
            ("connected", "connecting", "active"),
        ]
    assert recorded(lab, "web")[-1][2] == "active"  # stopping the hub is no death either
    assert not any("Traceback" in line for line in running.lines if "directory" in line)


async def test_a_directory_made_world_writable_then_fixed_brings_the_instance_back(lab: Lab) -> None:
    lab.start("a1b2c3", "web")
    async with hub(lab) as (running, _):
        await eventually(lambda: recorded(lab, "web")[-1:] == [("connected", "connecting", "active")], 30)
        lab.instances_dir.chmod(0o777)
        await eventually(lambda: recorded(lab, "web")[-1:] == [("remove", "active", "dead")], 30)
        lab.instances_dir.chmod(0o700)
        await eventually(lambda: recorded(lab, "web")[-1:] == [("connected", "connecting", "active")], 30)
        assert running.said("instances directory refused"), running.lines

    history = transitions(lab, "web")
    assert [t[:3] for t in history] == REMOVED_AND_BACK
    assert_back_for_the_refusal(history[2][3], history[3][3])
    assert os.stat(lab.instances_dir).st_mode & 0o777 == 0o700
