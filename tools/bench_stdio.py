"""Benchmark: fsm-hub's stdio client (fsm_hub.mcp.stdio_upstream.StdioClient) on its own.

Not a test: prints tables. It measures the parts of "configured stdio servers" that do not need
the hub's wiring:
  * cold starts — N light stdlib servers (tests/servers/stdio_server.py) spawned at once, time
    until every one has answered initialize + tools/list, unbounded and with at most K starting;
    and M SDK stdio servers (tests/servers/sdk_stdio_server.py) against their CPU floor
    (one start's CPU time × M / cores);
  * tools/call latency — StdioClient vs the official SDK `Client` over stdio, same server
    (the SDK stdio server), same run, sequential calls.
Each figure is the median over --runs runs.

    python tools/bench_stdio.py [--light 50] [--sdk 10] [--bound 8] [--calls 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

from fsm_hub.mcp.stdio_upstream import StdioClient  # noqa: E402

LIGHT = [sys.executable, "-S", str(REPO / "tests" / "servers" / "stdio_server.py")]
SDK = [sys.executable, "-m", "tests.servers.sdk_stdio_server"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def start_all(argv: list[str], n: int, bound: int | None) -> tuple[float, list[StdioClient]]:
    """Seconds until all n are initialized and listed their tools."""
    gate = asyncio.Semaphore(bound or n)
    clients = [StdioClient(argv[0], argv[1:], cwd=str(REPO), name=f"s{i}", timeout=120) for i in range(n)]

    async def one(client: StdioClient) -> None:
        async with gate:
            await client.initialize()
            await client.list_tools()

    began = time.perf_counter()
    await asyncio.gather(*(one(c) for c in clients))
    return time.perf_counter() - began, clients


async def close_all(clients: list[StdioClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def cold_starts(argv: list[str], n: int, bound: int | None) -> tuple[float, float]:
    """(wall seconds, children CPU seconds) for n servers; the CPU is counted once they exited."""
    cpu = children_cpu()
    wall, clients = await start_all(argv, n, bound)
    await close_all(clients)
    return wall, children_cpu() - cpu


async def latencies(client: StdioClient | Client, calls: int) -> list[float]:
    """Sequential echo calls after a warm-up; the same code for both clients."""
    for _ in range(20):
        await client.call_tool("echo", {"text": "warm"})
    out = []
    for _ in range(calls):
        began = time.perf_counter()
        await client.call_tool("echo", {"text": "hello"})
        out.append(time.perf_counter() - began)
    return out


async def latency_ours(calls: int) -> list[float]:
    async with StdioClient(SDK[0], SDK[1:], cwd=str(REPO), name="sdk") as client:
        return await latencies(client, calls)


async def latency_sdk(calls: int) -> list[float]:
    async with Client(StdioServerParameters(command=SDK[0], args=SDK[1:], cwd=str(REPO))) as client:
        return await latencies(client, calls)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--light", type=int, default=50)
    parser.add_argument("--sdk", type=int, default=10)
    parser.add_argument("--bound", type=int, default=8, help="servers starting at once, for the bounded runs")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{cores} cores, load average {os.getloadavg()[0]:.1f} at start\n")

    one_light = statistics.median([(await cold_starts(LIGHT, 1, None))[0] for _ in range(args.runs)])
    rows = [("1 light server", f"{one_light * 1000:.0f} ms", "")]
    for bound in (None, args.bound):
        walls = [(await cold_starts(LIGHT, args.light, bound))[0] for _ in range(args.runs)]
        label = f"{args.light} light, {'unbounded' if bound is None else f'at most {bound} at once'}"
        rows.append(
            (
                label,
                f"{statistics.median(walls) * 1000:.0f} ms",
                f"{statistics.median(walls) / one_light:.1f}× one",
            )
        )

    one_sdk = [await cold_starts(SDK, 1, None) for _ in range(args.runs)]
    sdk_wall = statistics.median(w for w, _ in one_sdk)
    sdk_cpu = statistics.median(c for _, c in one_sdk)
    floor = sdk_cpu * args.sdk / cores
    rows.append(("1 SDK server", f"{sdk_wall * 1000:.0f} ms", f"{sdk_cpu * 1000:.0f} ms CPU"))
    for bound in (None, cores * 2):
        walls = [(await cold_starts(SDK, args.sdk, bound))[0] for _ in range(args.runs)]
        label = f"{args.sdk} SDK, {'unbounded' if bound is None else f'at most {bound} at once'}"
        rows.append(
            (
                label,
                f"{statistics.median(walls) * 1000:.0f} ms",
                f"{statistics.median(walls) / floor:.2f}× CPU floor ({floor:.1f} s)",
            )
        )
    print(f"{'cold starts (initialize + tools/list)':44} {'median':>9}  ratio")
    for label, value, ratio in rows:
        print(f"{label:44} {value:>9}  {ratio}")

    ours, sdk = [], []
    for _ in range(args.runs):
        ours.append(await latency_ours(args.calls))
        sdk.append(await latency_sdk(args.calls))
    p50_ours = statistics.median(percentile(r, 0.5) for r in ours)
    p50_sdk = statistics.median(percentile(r, 0.5) for r in sdk)
    p99_ours = statistics.median(percentile(r, 0.99) for r in ours)
    p99_sdk = statistics.median(percentile(r, 0.99) for r in sdk)
    print(f"\n{'tools/call echo to the SDK stdio server':44} {'p50':>9} {'p99':>9}")
    print(f"{'StdioClient':44} {p50_ours * 1e6:>7.0f}µs {p99_ours * 1e6:>7.0f}µs")
    print(f"{'SDK Client':44} {p50_sdk * 1e6:>7.0f}µs {p99_sdk * 1e6:>7.0f}µs")
    print(f"{'ratio StdioClient / SDK':44} {p50_ours / p50_sdk:>9.2f} {p99_ours / p99_sdk:>9.2f}")


if __name__ == "__main__":
    asyncio.run(main())
