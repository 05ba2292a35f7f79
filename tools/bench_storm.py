"""Benchmark: a hub next to an instance that announces list changes in a tight loop.

Not a test: prints a table. For a real `fsm-hub serve` subprocess (default timing: 5 s pings,
2 s timeout, 3 misses) supervising two instances served from this process (tests/servers/faults.py):
a healthy one and one whose GET stream sends tools/resources/prompts list_changed as fast as the
socket takes them ("storm"; "quiet" offers the same stream and sends nothing). Measures:

  * the hub's CPU share of one core over --window s (utime + stime from /proc/<pid>/stat);
  * its RSS growth over the window (VmRSS at the start and the end);
  * list changes the instance sent, and the refreshes (tools/list) and pings the hub made;
  * after the window, the storming instance is stopped and its file removed: the seconds until the
    log records `lost` or `remove` for it (capped at --detect-cap), and whether the healthy
    instance was ever recorded anything but connect/connected.

--tree runs the hub from another source tree (e.g. an export of an older commit) for a ratio:

    git archive <rev> fsm_hub migrations | tar -x -C /tmp/before
    python tools/bench_storm.py [--runs 3] [--window 20] [--tree /tmp/before]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.servers.faults import FakeMcp  # noqa: E402

DEVNULL = asyncio.subprocess.DEVNULL
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STORM, HEALTHY = "5702a000", "c01dbeef"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def announce(directory: Path, instance_id: str, url: str) -> None:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    document = {"id": instance_id, "name": instance_id, "directory": "/", "port": port, "url": url}
    temporary = directory / f".tmp-{instance_id}"
    temporary.write_text(json.dumps(document))
    temporary.replace(directory / f"{instance_id}.json")


async def transitions(db: Path, tree: Path, instance_id: str) -> list[str]:
    """The events of `instance_id`'s recorded transitions, through the CLI of `tree`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fsm_hub.cli", "history", instance_id, "--json", "--db", str(db),
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await process.communicate()
    if process.returncode != 0:
        return []
    return [e["data"]["event"] for e in json.loads(out) if e["type"] == "transition"]


async def until(condition: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.1)
    return False


async def recorded(db: Path, tree: Path, instance_id: str, events: set[str]) -> bool:
    return bool(events & set(await transitions(db, tree, instance_id)))


async def started(noisy: FakeMcp, healthy: FakeMcp) -> bool:
    return bool(noisy.of_method("GET") and healthy.posted("tools/list"))


async def one_run(storm: bool, tree: Path, window: float, detect_cap: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-storm-"))
    directory, db = root / "instances", root / "events.db"
    directory.mkdir(mode=0o700)
    noisy, healthy = FakeMcp(get_stream=True, storm=storm), FakeMcp()
    announce(directory, STORM, await noisy.start())
    announce(directory, HEALTHY, await healthy.start())
    hub = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fsm_hub.cli", "serve", "--db", str(db), "--instances-dir", str(directory),
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
        stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL,
    )  # fmt: skip
    try:
        await until(lambda: started(noisy, healthy), 20)
        cpu0, rss0, wall0 = cpu_seconds(hub.pid), rss_mb(hub.pid), time.monotonic()
        sent0, refreshes0 = noisy.stormed, len(noisy.posted("tools/list"))
        pings0 = len(healthy.posted("ping"))
        await asyncio.sleep(window)
        wall = time.monotonic() - wall0
        cpu = (cpu_seconds(hub.pid) - cpu0) / wall
        row: dict[str, Any] = {
            "cpu": cpu,
            "rss_growth": rss_mb(hub.pid) - rss0,
            "sent": noisy.stormed - sent0,
            "refreshes": len(noisy.posted("tools/list")) - refreshes0,
            "healthy_pings": len(healthy.posted("ping")) - pings0,
        }
        await noisy.stop()  # the instance is gone: its port refuses, its file goes
        (directory / f"{STORM}.json").unlink()
        gone = time.monotonic()
        seen = await until(lambda: recorded(db, tree, STORM, {"lost", "remove"}), detect_cap)
        row["detected"] = time.monotonic() - gone if seen else None
        row["healthy_ok"] = await transitions(db, tree, HEALTHY) == ["connect", "connected"]
        return row
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have died: the row says so
            hub.terminate()
        try:
            await asyncio.wait_for(hub.wait(), 10)
        except TimeoutError:
            hub.kill()
            await hub.wait()
        await healthy.stop()
        await noisy.stop()


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if len(values) == len(rows) else None


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--detect-cap", type=float, default=60.0)
    parser.add_argument("--tree", type=Path, action="append", help="hub source tree(s); default: this one")
    args = parser.parse_args()
    trees = args.tree or [REPO]
    if args.tree:
        trees = [REPO, *args.tree]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in range(args.runs):
        for tree in trees:
            for storm in (False, True):
                row = await one_run(storm, tree, args.window, args.detect_cap)
                results.setdefault((str(tree), "storm" if storm else "quiet"), []).append(row)
                case = "storm" if storm else "quiet"
                print(f"run {run + 1} {tree} {case}: {row}", file=sys.stderr, flush=True)

    print(f"\n{args.runs} runs, {args.window:g} s window, medians (machine shared with other work)\n")
    print(f"{'tree':<28} {'case':<6} {'CPU %':>7} {'RSS +MB':>8} {'sent/s':>9} {'refresh/s':>10} "
          f"{'pings':>6} {'lost/remove after':>18} {'healthy ok':>10}")  # fmt: skip
    cpu: dict[tuple[str, str], float] = {}
    for (tree, case), rows in results.items():
        cpu[(tree, case)] = statistics.median(r["cpu"] for r in rows)
        detected = median(rows, "detected")
        missed = sum(r["detected"] is None for r in rows)
        capped = f"> {args.detect_cap:g} s ({missed}/{len(rows)})"
        said = f"{detected:.2f} s" if detected is not None else capped
        print(
            f"{Path(tree).name:<28} {case:<6} {100 * cpu[(tree, case)]:>7.1f} "
            f"{statistics.median(r['rss_growth'] for r in rows):>8.1f} "
            f"{statistics.median(r['sent'] for r in rows) / args.window:>9.0f} "
            f"{statistics.median(r['refreshes'] for r in rows) / args.window:>10.1f} "
            f"{statistics.median(r['healthy_pings'] for r in rows):>6.0f} {said:>18} "
            f"{all(r['healthy_ok'] for r in rows)!s:>10}"
        )
    print()
    for tree in trees:
        quiet, storm = cpu[(str(tree), "quiet")], cpu[(str(tree), "storm")]
        print(f"{Path(tree).name}: storm / quiet CPU = {storm / max(quiet, 1e-3):.1f}x")
    if len(trees) > 1:
        ratio = cpu[(str(REPO), "storm")] / cpu[(str(trees[1]), "storm")]
        print(f"storm CPU, this tree / {trees[1].name} = {ratio:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
