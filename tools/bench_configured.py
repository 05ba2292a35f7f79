"""Benchmark: configured stdio servers through the real hub (`fsm-hub serve --config`).

Not a test: prints tables. Every figure comes from a real `fsm-hub serve --mcp` process and real
stdio servers:
  * cold starts — N light stdlib servers (tests/servers/stdio_server.py, ~30 ms each) and N SDK
    stdio servers (tests/servers/sdk_stdio_server.py, ~1 s of CPU each to import) in one config;
    the time from spawning the hub to the last server's recorded `connected` (read from the log's
    `at`), and every `connect_failed` counted. The SDK figure is set against its CPU floor: one
    SDK server's start CPU (spawn + initialize + tools/list, measured alone) × N / cores;
  * steady state — the hub's own CPU (% of one core) and RSS with those N servers active and
    pinged every --ping-interval seconds, over a --steady second window; its children too;
  * tools/call — the SDK `Client` over stdio straight to the SDK stdio server vs the same client
    code over stdio to `fsm-hub serve --mcp` bound (instances_connect) to that server as a
    configured instance; same run, runs interleaved.
Each figure is the median over --runs runs.

    python tools/bench_configured.py [--light 50] [--sdk 50] [--runs 3] [--steady 30]
                                     [--calls 500] [--start-limit K] [--only start|steady|call]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

from fsm_hub.mcp.stdio_upstream import StdioClient  # noqa: E402

HUB = str(Path(sys.executable).with_name("fsm-hub"))
LIGHT = {"command": sys.executable, "args": ["-S", str(REPO / "tests" / "servers" / "stdio_server.py")]}
SDK = {"command": sys.executable, "args": ["-m", "tests.servers.sdk_stdio_server"], "cwd": str(REPO)}
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


class Hub:
    """One `fsm-hub serve --mcp --config` process with its own temp log, config and directory."""

    def __init__(self, servers: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="bench-configured-"))
        os.chmod(self.work, 0o700)
        self.config = self.work / "servers.json"
        self.config.write_text(json.dumps({"mcpServers": servers}))
        os.chmod(self.config, 0o600)
        (self.work / "instances").mkdir(mode=0o700)
        self.db = self.work / "events.db"
        self.count = len(servers)
        self.argv = [
            HUB, "serve", "--mcp", "-q",
            "--config", str(self.config),
            "--db", str(self.db),
            "--instances-dir", str(self.work / "instances"),
            "--ping-interval", str(args.ping_interval),
        ]  # fmt: skip
        if args.start_limit:
            self.argv += ["--start-limit", str(args.start_limit)]
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(self.work / "xdg")}

    async def spawn(self) -> float:
        """Start the hub; the wall-clock time of the spawn, comparable with the log's `at`."""
        began = time.time()
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=(self.work / "hub.stderr").open("wb"),
            env=self.env,
        )
        return began

    async def all_active(self, limit: float = 180.0) -> tuple[float, int]:
        """(wall-clock time of the last first `active`, connect failures) once all connected."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if not self.db.exists():
                continue
            try:
                with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1) as db:
                    rows = db.execute(
                        "SELECT stream, MIN(at) FROM events WHERE type = 'transition'"
                        " AND json_extract(data, '$.to') = 'active' GROUP BY stream"
                    ).fetchall()
                    failed = db.execute(
                        "SELECT COUNT(*) FROM events WHERE type = 'transition'"
                        " AND json_extract(data, '$.event') = 'connect_failed'"
                    ).fetchone()[0]
            except sqlite3.OperationalError:
                continue  # not created yet
            if len(rows) == self.count:
                last = max(datetime.fromisoformat(at).timestamp() for _, at in rows)
                return last, failed
        stderr = (self.work / "hub.stderr").read_text()[-2000:]
        raise SystemExit(
            f"not all {self.count} servers connected within {limit:.0f} s; hub stderr:\n{stderr}"
        )

    async def stop(self) -> float:
        """Close the hub's stdin; seconds until it (and so every child) has exited."""
        began = time.perf_counter()
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        stopped = time.perf_counter() - began
        shutil.rmtree(self.work, ignore_errors=True)
        return stopped


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def one_start_cpu(spec: dict[str, Any]) -> float:
    """CPU seconds of one server's spawn + initialize + tools/list + exit, measured alone."""
    before = children_cpu()
    async with StdioClient(
        spec["command"], spec["args"], cwd=spec.get("cwd"), name="one", timeout=60
    ) as client:
        await client.list_tools()
    return children_cpu() - before


async def cold_start(spec: dict[str, Any], n: int, args: argparse.Namespace) -> tuple[float, int, float]:
    """(seconds from hub spawn to all n connected, connect failures, seconds to stop)."""
    hub = Hub({f"s{i:02d}": spec for i in range(n)}, args)
    began = await hub.spawn()
    last, failed = await hub.all_active()
    stopped = await hub.stop()
    return last - began, failed, stopped


async def steady(spec: dict[str, Any], n: int, args: argparse.Namespace) -> dict[str, float]:
    hub = Hub({f"s{i:02d}": spec for i in range(n)}, args)
    await hub.spawn()
    await hub.all_active()
    await asyncio.sleep(2 * args.ping_interval)  # past the start-up's tail
    pid = hub.process.pid
    kids = children(pid)
    hub_cpu, kids_cpu = cpu_seconds(pid), sum(cpu_seconds(k) for k in kids)
    began = time.monotonic()
    await asyncio.sleep(args.steady)
    window = time.monotonic() - began
    figures = {
        "hub_cpu": (cpu_seconds(pid) - hub_cpu) / window * 100,
        "hub_rss": rss_bytes(pid) / 2**20,
        "children": float(len(kids)),
        "kids_cpu": (sum(cpu_seconds(k) for k in kids) - kids_cpu) / window * 100,
        "kids_rss": sum(rss_bytes(k) for k in kids) / 2**20,
    }
    await hub.stop()
    return figures


async def call_latencies(client: Client, calls: int) -> list[float]:
    """Sequential echo calls after a warm-up; the same code for both paths."""
    for _ in range(20):
        await client.call_tool("echo", {"text": "warm"})
    out = []
    for _ in range(calls):
        began = time.perf_counter()
        result = await client.call_tool("echo", {"text": "hello"})
        out.append(time.perf_counter() - began)
        assert not result.is_error, result
    return out


async def calls_via_hub_and_direct(args: argparse.Namespace) -> dict[str, list[float]]:
    hub = Hub({"sdk": SDK}, args)
    direct_params = StdioServerParameters(command=SDK["command"], args=SDK["args"], cwd=SDK["cwd"])
    hub_params = StdioServerParameters(command=hub.argv[0], args=hub.argv[1:], env=hub.env)
    out: dict[str, list[float]] = {"direct": [], "hub": [], "direct99": [], "hub99": []}
    async with Client(direct_params) as direct, Client(hub_params) as via_hub:
        for _ in range(200):  # the hub answers at once; its configured server takes ~1 s
            listed = await via_hub.call_tool("instances_list", {})
            if '"active"' in json.dumps(listed.structured_content):
                break
            await asyncio.sleep(0.05)
        bound = await via_hub.call_tool("instances_connect", {"instance_id": "cfg-sdk"})
        assert not bound.is_error, bound
        for _ in range(args.runs):
            for name, client in (("direct", direct), ("hub", via_hub)):
                latencies = await call_latencies(client, args.calls)
                out[name].append(percentile(latencies, 0.5) * 1000)
                out[name + "99"].append(percentile(latencies, 0.99) * 1000)
    return out


async def run(args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    print(f"{cores} cores, load average {os.getloadavg()[0]:.1f} at start; start limit "
          f"{args.start_limit or 'default'}; pings every {args.ping_interval:g} s\n")  # fmt: skip
    if args.only in (None, "start"):
        rows = []
        light = [await cold_start(LIGHT, args.light, args) for _ in range(args.runs)]
        seconds = statistics.median(s for s, _, _ in light)
        rows.append((f"{args.light} light servers, hub spawn → all active", f"{seconds:.2f} s",
                     f"target 2 s: {'met' if seconds <= 2 else 'MISSED'}", sum(f for _, f, _ in light),
                     statistics.median(s for _, _, s in light)))  # fmt: skip
        one = statistics.median([await one_start_cpu(SDK) for _ in range(args.runs)])
        floor = one * args.sdk / cores
        sdk = [await cold_start(SDK, args.sdk, args) for _ in range(args.runs)]
        seconds = statistics.median(s for s, _, _ in sdk)
        ratio = seconds / floor
        rows.append((f"{args.sdk} SDK servers, hub spawn → all active", f"{seconds:.2f} s",
                     f"{ratio:.2f}× CPU floor {floor:.1f} s (one start {one * 1000:.0f} ms CPU); "
                     f"target 1.3×: {'met' if ratio <= 1.3 else 'MISSED'}",
                     sum(f for _, f, _ in sdk), statistics.median(s for _, _, s in sdk)))  # fmt: skip
        heading = f"cold start (median of {args.runs})"
        print(f"{heading:46} {'time':>8}  {'failed':>6}  {'stop':>6}  ratio")
        for label, value, ratio_text, failed, stop in rows:
            print(f"{label:46} {value:>8}  {failed:>6}  {stop:>5.2f}s  {ratio_text}")
        print()
    if args.only in (None, "steady"):
        print(f"steady state, {args.steady:g} s window (median of {args.runs})")
        columns = ("hub CPU", "hub RSS", "children", "their CPU", "their RSS")
        print(f"{'servers':24} " + " ".join(f"{c:>10}" for c in columns))
        for label, spec, n in (
            (f"{args.light} light", LIGHT, args.light),
            (f"{args.sdk} SDK", SDK, args.sdk),
        ):
            runs = [await steady(spec, n, args) for _ in range(args.runs)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            print(f"{label:24} {med['hub_cpu']:>8.2f}% {med['hub_rss']:>7.0f}MB {med['children']:>9.0f} "
                  f"{med['kids_cpu']:>9.2f}% {med['kids_rss']:>8.0f}MB")  # fmt: skip
        print()
    if args.only in (None, "call"):
        out = await calls_via_hub_and_direct(args)
        med = {k: statistics.median(v) for k, v in out.items()}
        ratio = med["hub"] / med["direct"]
        print(f"tools/call echo, SDK Client over stdio, {args.calls} sequential calls × {args.runs} runs")
        print(f"{'path':36} {'p50':>9} {'p99':>9}")
        print(f"{'direct to the SDK stdio server':36} {med['direct']:>7.2f}ms {med['direct99']:>7.2f}ms")
        print(f"{'through fsm-hub serve --mcp':36} {med['hub']:>7.2f}ms {med['hub99']:>7.2f}ms")
        print(f"{'ratio hub / direct':36} {ratio:>9.2f} {med['hub99'] / med['direct99']:>9.2f}"
              f"   target p50 ≤ 1.3×: {'met' if ratio <= 1.3 else 'MISSED'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--light", type=int, default=50)
    parser.add_argument("--sdk", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of the steady-state window")
    parser.add_argument("--ping-interval", type=float, default=5.0)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument(
        "--start-limit", type=int, default=0, help="servers starting at once (0: the hub's default)"
    )
    parser.add_argument("--only", choices=("start", "steady", "call"))
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
