"""Benchmark: a hub supervising many instances with 5 s pings.

Not a test: prints a table. Measures, for a real `fsm-hub serve` subprocess:
  * its CPU share of one core at steady state (utime + stime from /proc/<pid>/stat over --window s);
  * its RSS (VmRSS from /proc/<pid>/status at the end of the window; peak VmHWM alongside);
  * the time from an instance going silent to its recorded `lost` (the `at` in the event log).

Instances are served by a few tools/bench_mcp_server.py processes listening on --per-process
ports each. Every instance file carries the pid of the process serving its port, so "killing an
instance" here means what the hub can only learn from pings: --silent instances stop answering
(their ports are paused, the process lives on, its port still accepts connections).

Detection is bounded by ping-misses × (interval + timeout): the first ping after the silence comes
within one interval and times out after one timeout, and so does every further miss. The target
"interval + timeout + 1 s" is that bound for one miss, so the hub runs with --ping-misses 1 unless
told otherwise (the target then scales with the misses).

    python tools/bench_supervise.py [--instances 1000] [--per-process 250] [--window 30]
                                    [--silent 5] [--ping-misses 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fsm_hub.core.events import parse_time  # noqa: E402
from fsm_hub.core.view import fold  # noqa: E402
from fsm_hub.store.sqlite import EventLog  # noqa: E402

HUB = str(Path(sys.executable).with_name("fsm-hub"))
SERVER = str(REPO / "tools" / "bench_mcp_server.py")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
INTERVAL, TIMEOUT = 5.0, 2.0


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    pid: int
    ports: list[int]

    async def command(self, line: str) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{line}\n".encode())
        await self.process.stdin.drain()
        await self.process.stdout.readline()  # acknowledged: the ports are paused from now on


async def start_servers(instances: int, per_process: int) -> list[ServerProcess]:
    counts = [min(per_process, instances - n) for n in range(0, instances, per_process)]
    servers = []
    for count in counts:
        process = await asyncio.create_subprocess_exec(
            sys.executable, SERVER, "--ports", str(count),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        hello = json.loads(await process.stdout.readline())
        servers.append(ServerProcess(process, hello["pid"], hello["ports"]))
    return servers


def announce(directory: Path, servers: list[ServerProcess]) -> dict[str, tuple[ServerProcess, int]]:
    """One instance file per port; returns id → (server, port)."""
    instances: dict[str, tuple[ServerProcess, int]] = {}
    for server in servers:
        for port in server.ports:
            instance_id = f"bench-{len(instances):04d}"
            document = {
                "id": instance_id,
                "name": instance_id,
                "directory": str(directory),
                "port": port,
                "process_info": {"pid": server.pid, "executable": sys.executable},
            }
            (directory / f"{instance_id}.json").write_text(json.dumps(document))
            instances[instance_id] = (server, port)
    return instances


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def memory_mb(pid: int) -> dict[str, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def states(db: Path) -> dict[str, str]:
    with EventLog.open(db) as log:
        return {i.id: i.state for i in fold(log.events()).instances.values()}


def lost_at(db: Path, instance_ids: list[str]) -> dict[str, datetime]:
    found = {}
    with EventLog.open(db) as log:
        for instance_id in instance_ids:
            for event in log.events(stream=instance_id):
                if event.type == "transition" and event.data["event"] == "lost":
                    found[instance_id] = parse_time(event.at)
                    break
    return found


async def wait_for(check: Any, limit: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > limit:
            raise SystemExit(f"bench: gave up after {limit:g}s waiting for {what}")
        await asyncio.sleep(0.5)
    return time.monotonic() - started


async def run(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the hub holds one socket per instance
    root = Path(tempfile.mkdtemp(prefix="fsm-hub-bench-"))
    directory, db = root / "instances", root / "events.db"
    directory.mkdir(mode=0o700)
    servers = await start_servers(args.instances, args.per_process)
    instances = announce(directory, servers)
    stderr = (root / "hub.log").open("wb")
    hub = await asyncio.create_subprocess_exec(
        HUB, "serve", "--db", str(db), "--instances-dir", str(directory),
        "--ping-interval", str(INTERVAL), "--ping-timeout", str(TIMEOUT),
        "--ping-misses", str(args.ping_misses),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
    )  # fmt: skip
    rows: list[tuple[str, str, str, str]] = []
    try:
        everyone = list(instances)
        up = await wait_for(
            lambda: sum(s == "active" for s in states(db).values()) == len(everyone), 180, "all active"
        )
        rows.append(("instances active", f"{len(everyone)}/{len(everyone)}", "all", "pass"))
        rows.append(("time until all active", f"{up:.1f} s", "-", "-"))

        await asyncio.sleep(args.settle)  # the connect burst is over; pings are spread out
        cpu_before, wall_before = cpu_seconds(hub.pid), time.monotonic()
        await asyncio.sleep(args.window)
        cpu = (cpu_seconds(hub.pid) - cpu_before) / (time.monotonic() - wall_before) * 100
        memory = memory_mb(hub.pid)
        rows.append((f"hub CPU, steady state ({args.window:g} s)", f"{cpu:.2f} % of one core", "< 5 %",
                     "pass" if cpu < 5 else "MISS"))  # fmt: skip
        rows.append(("hub RSS (peak)", f"{memory['VmRSS']:.0f} MB ({memory['VmHWM']:.0f} MB)", "< 200 MB",
                     "pass" if memory["VmRSS"] < 200 else "MISS"))  # fmt: skip

        step = max(1, len(everyone) // args.silent)
        silent = everyone[::step][: args.silent]
        for server in servers:
            ports = [port for i, (s, port) in instances.items() if s is server and i in silent]
            if ports:
                await server.command("pause " + " ".join(map(str, ports)))
        paused = datetime.now(UTC)
        bound = args.ping_misses * (INTERVAL + TIMEOUT)
        await wait_for(lambda: len(lost_at(db, silent)) == len(silent), bound + 30, "lost recorded")
        delays = [(moment - paused).total_seconds() for moment in lost_at(db, silent).values()]
        target = bound + 1
        rows.append((f"silence → lost, max of {len(silent)}", f"{max(delays):.2f} s", f"≤ {target:g} s",
                     "pass" if max(delays) <= target else "MISS"))  # fmt: skip
        rows.append((f"silence → lost, median of {len(silent)}", f"{statistics.median(delays):.2f} s",
                     "-", "-"))  # fmt: skip
        others = {i: s for i, s in states(db).items() if i not in silent}
        wrong = sum(s != "active" for s in others.values())
        rows.append(("other instances not active", str(wrong), "0", "pass" if wrong == 0 else "MISS"))
    finally:
        if hub.returncode is None:
            hub.send_signal(signal.SIGTERM)
            await hub.wait()
        for server in servers:
            assert server.process.stdin is not None
            server.process.stdin.close()
            server.process.kill()
            await server.process.wait()
        stderr.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return rows


def table(rows: list[tuple[str, str, str, str]]) -> str:
    headers = ("metric", "value", "target", "result")
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--per-process", type=int, default=250, help="ports each server process serves")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of steady state measured")
    parser.add_argument("--settle", type=float, default=2 * INTERVAL, help="seconds after all active")
    parser.add_argument("--silent", type=int, default=5, help="instances that stop answering")
    parser.add_argument("--ping-misses", type=int, default=1)
    args = parser.parse_args()
    processes = math.ceil(args.instances / args.per_process)
    print(
        f"{args.instances} instances on {processes} server processes, pings every {INTERVAL:g} s"
        f" (timeout {TIMEOUT:g} s, {args.ping_misses} miss(es) make lost), {os.cpu_count()} CPUs",
        flush=True,
    )
    print(table(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
