"""Benchmark: start-up and discovery of many instance files by a real `fsm-hub serve --mcp`.

Not a test: prints a table. Two scenarios per size N:

  * present: N files are in the directory before the hub starts. Measured: the time from spawning
    the hub to its answer to `initialize`, to its answer to a `hub_status` call, and until
    `hub_status` counts N instances.
  * written: the hub starts on an empty directory; once it has answered `initialize`, N files are
    written (atomically, as brummer does) as fast as we can. Measured: until `hub_status` counts N
    instances (or --deadline passes: then how many it had).

The hub runs with --retry-attempts 1 unless --hub-args says otherwise: every file names a running
process (a `sleep` we spawn) and a port nothing listens on, so each instance makes one refused
connect and is dead — per-instance supervision work that stops, so what grows with N is
discovery. (With the default 8 attempts, N refused instances keep the hub busy retrying for a
minute whatever discovery costs: run with --hub-args "" to see it.)

Plus the hub's CPU time (utime + stime from /proc/<pid>/stat) at the moment all were counted, and
the longest a `hub_status` call took meanwhile (polled every 0.2 s: how long the hub stays
unresponsive to its client).

    python tools/bench_discovery.py [--sizes 1000,3000,10000] [--runs 3] [--deadline 120]
                                    [--hub-args "--retry-attempts 1"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUB = str(Path(sys.executable).with_name("fsm-hub"))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def refused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_file(directory: Path, index: int, pid: int, port: int) -> None:
    instance_id = f"bench{index:06d}"
    payload = {
        "id": instance_id,
        "name": f"bench-{index}",
        "directory": "/src/bench",
        "port": port,
        "started_at": "2026-11-25T03:14:15.926535897Z",
        "last_ping": "2026-11-25T03:14:15.926535897Z",
        "process_info": {"pid": pid, "executable": "/usr/bin/sleep"},
    }
    temporary = directory / f".tmp-{instance_id}"
    temporary.write_text(json.dumps(payload))
    temporary.replace(directory / f"{instance_id}.json")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Client:
    """A line-delimited JSON-RPC client on the hub's stdio."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._next = 0

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self._next += 1
        request = {"jsonrpc": "2.0", "id": self._next, "method": method, "params": params or {}}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        await self.process.stdin.drain()
        while True:
            line = await self.process.stdout.readline()
            if not line:
                raise RuntimeError("the hub closed stdout")
            message = json.loads(line)
            if message.get("id") == self._next:
                return dict(message)

    async def instances(self) -> int:
        reply = await self.call("tools/call", {"name": "hub_status", "arguments": {}})
        return int(reply["result"]["structuredContent"]["instances"])


@dataclass
class Outcome:
    initialize: float | None
    first_status: float | None
    all_counted: float | None
    counted: int
    cpu: float
    worst_status: float


async def run_once(size: int, written: bool, deadline: float, pid: int, hub_args: list[str]) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="fsm-hub-bench-") as root:
        instances = Path(root) / "instances"
        instances.mkdir(mode=0o700)
        port = refused_port()
        if not written:
            for index in range(size):
                write_file(instances, index, pid, port)
        args = ["serve", "--mcp", "--db", f"{root}/events.db", "--instances-dir", str(instances), *hub_args]
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            HUB, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        client = Client(process)
        try:
            await client.call(
                "initialize",
                {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "bench", "version": "0"},
                },
            )
            initialized = time.monotonic() - started
            if written:
                began = time.monotonic()
                await asyncio.to_thread(lambda: [write_file(instances, i, pid, port) for i in range(size)])
                started = began  # "written" counts from the first file written
            first_status: float | None = None
            counted, worst = 0, 0.0
            while time.monotonic() - started < deadline:
                asked = time.monotonic()
                counted = await client.instances()
                took = time.monotonic() - asked
                worst = max(worst, took)
                if first_status is None:
                    first_status = time.monotonic() - (started if not written else began)
                if counted >= size:
                    took_all, cpu = time.monotonic() - started, cpu_seconds(process.pid)
                    return Outcome(initialized, first_status, took_all, counted, cpu, worst)
                await asyncio.sleep(0.2)
            return Outcome(initialized, first_status, None, counted, cpu_seconds(process.pid), worst)
        finally:
            if process.stdin is not None:
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()


def median(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "—"
    text = f"{statistics.median(known):.2f}"
    return text if len(known) == len(values) else f"{text} ({len(values) - len(known)} missed)"


async def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--sizes", default="1000,3000,10000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--scenarios", default="present,written")
    parser.add_argument("--hub-args", default="--retry-attempts 1")
    options = parser.parse_args()
    sizes = [int(s) for s in options.sizes.split(",")]
    scenarios = options.scenarios.split(",")
    sleeper = await asyncio.create_subprocess_exec("sleep", "100000")
    rows: list[tuple[str, int, list[Outcome]]] = []
    try:
        for scenario in scenarios:
            for size in sizes:
                outcomes = []
                for _ in range(options.runs):
                    written = scenario == "written"
                    hub_args = options.hub_args.split()
                    outcomes.append(await run_once(size, written, options.deadline, sleeper.pid, hub_args))
                    print(f"  {scenario} {size}: {outcomes[-1]}", file=sys.stderr, flush=True)
                rows.append((scenario, size, outcomes))
    finally:
        sleeper.kill()
        await sleeper.wait()
    load = os.getloadavg()[0]
    print(f"\nmedians of {options.runs} runs; hub args {options.hub_args!r}; load average {load:.1f}")
    print(f"on {os.cpu_count()} cores (a shared machine: other work was running)\n")
    header = f"{'scenario':<9}{'files':>7}{'initialize s':>14}{'1st status s':>14}{'all counted s':>15}"
    header += f"{'counted':>9}{'cpu s':>8}{'µs cpu/file':>13}{'worst status s':>16}"
    print(header)
    for scenario, size, outcomes in rows:
        counted = int(statistics.median(o.counted for o in outcomes))
        cpu = statistics.median(o.cpu for o in outcomes)
        print(
            f"{scenario:<9}{size:>7}{median([o.initialize for o in outcomes]):>14}"
            f"{median([o.first_status for o in outcomes]):>14}{median([o.all_counted for o in outcomes]):>15}"
            f"{counted:>9}{cpu:>8.1f}{cpu / size * 1e6:>13.0f}"
            f"{median([o.worst_status for o in outcomes]):>16}"
        )
    for scenario in scenarios:
        times = {size: outcomes for s, size, outcomes in rows if s == scenario}
        if len(times) > 1:
            smallest = min(times)
            base = statistics.median(o.cpu for o in times[smallest]) / smallest
            per_file = {size: statistics.median(o.cpu for o in times[size]) / size for size in times}
            ratios = ", ".join(f"{size}: {per_file[size] / base:.2f}" for size in sorted(times))
            print(f"{scenario}: cpu per file relative to {smallest} files (1.00 = linear): {ratios}")


if __name__ == "__main__":
    asyncio.run(main())
