"""Benchmark: the log is the truth at any size (issue 7).

    .venv/bin/python tools/bench_log.py [--runs 5] [--events 1000000] [--instances 10000]
                                        [--keep PATH] [--discovery 500,1000,2000]

Builds a log of --events events over --instances instances through the real EventStore (many
producers, group commit, the hash chain, and snapshots every SNAPSHOT_EVERY events as the hub
writes them; every instance ends dead, as in a long-lived log), then measures, as medians of
--runs runs, each against its floor in the same run:

  * `fsm-hub serve --mcp`: spawn → `initialize` answered → `instances_list` answered, on the big
    log and on an empty one, with `python -c pass` as the floor; the hub's RSS at that moment;
  * `fsm-hub instances`: wall time on both logs, and peak RSS;
  * `replay --verify` (hash chain and snapshots included) against a bare sqlite3 read of the same
    rows; its peak RSS as a subprocess;
  * discovery of N instance files (served by tools/bench_mcp_server.py) until all are active;
  * the writer with 100 producers against a bare aiosqlite group-commit writer (one executemany
    and one commit per batch, WAL, synchronous=FULL, same table).

Not a test: it prints tables and exits 0 even when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiosqlite  # noqa: E402

from fsm_hub.core.events import format_time, transition_data, utc_now  # noqa: E402
from fsm_hub.core.view import Fold  # noqa: E402
from fsm_hub.store.snapshots import SNAPSHOT_EVERY  # noqa: E402
from fsm_hub.store.sqlite import EventLog, EventStore, _connect  # noqa: E402
from tools.bench_supervise import announce, start_servers  # noqa: E402

HUB = str(Path(sys.executable).with_name("fsm-hub"))
_LOOP = (
    ("connect", "discovered", "connecting", None),
    ("connect_failed", "connecting", "retrying", "connection refused"),
    ("connect", "retrying", "connecting", None),
    ("connected", "connecting", "active", None),
    ("lost", "active", "retrying", "connection reset"),
    ("connect", "retrying", "connecting", None),
    ("connected", "connecting", "active", None),
    ("rediscover", "active", "discovered", None),
)


# -- building the log through the real store -----------------------------------------------------


async def build(path: Path, events: int, instances: int) -> None:
    """Every instance: discovered, cycling through legal transitions, finally removed (dead)."""
    store = await EventStore.open(path)
    fold = Fold()
    state = {"since": 0}

    def committed(batch: Any) -> None:  # what the live hub does with each committed batch
        fold.apply(batch)
        if fold.last_seq - state["since"] >= SNAPSHOT_EVERY:
            store.save_snapshot(fold)
            state["since"] = fold.last_seq

    store.subscribe(committed)
    per = events // instances

    async def produce(n: int) -> None:
        stream = f"{n:016x}"
        port = 8000 + n % 1000
        await store.append(
            stream,
            "instance_discovered",
            {
                "name": f"app-{n}",
                "directory": f"/src/app-{n}",
                "port": port,
                "pid": 1000 + n,
                "url": f"http://127.0.0.1:{port}/mcp",
            },
        )
        source = "discovered"
        for i in range(per - 2):
            event, source, target, error = _LOOP[i % len(_LOOP)]
            await store.append(
                stream,
                "transition",
                transition_data(event, source, target, reason="bench", attempt=1, error=error),
            )
            source = target
        await store.append(
            stream,
            "transition",
            transition_data("remove", source, "dead", reason="bench: gone", error="gone"),
        )

    await asyncio.gather(*(produce(n) for n in range(instances)))
    store.save_snapshot(fold)  # the clean stop's snapshot
    await store.close()


# -- subprocess measurements ---------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of one subprocess, measured by wait4."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert process.stdout is not None
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return elapsed, usage.ru_maxrss / 1024, out.decode(errors="replace")


def serve_startup(db: Path, instances_dir: Path) -> tuple[float, float, float]:
    """(to initialize, to instances_list, RSS MB then) for `fsm-hub serve --mcp` on `db`."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [HUB, "serve", "--mcp", "--db", str(db), "--instances-dir", str(instances_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    messages = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "0"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "instances_list", "arguments": {}},
        },
    ]
    process.stdin.write(json.dumps(messages[0]).encode() + b"\n")
    process.stdin.flush()
    first = json.loads(process.stdout.readline())
    initialized = time.perf_counter() - started
    assert first.get("id") == 1, first
    for message in messages[1:]:
        process.stdin.write(json.dumps(message).encode() + b"\n")
    process.stdin.flush()
    while True:
        reply = json.loads(process.stdout.readline())
        if reply.get("id") == 2:
            break
    listed = time.perf_counter() - started
    assert "result" in reply, reply
    memory = rss_mb(process.pid)
    process.stdin.close()
    process.wait(timeout=30)
    return initialized, listed, memory


def bare_read(db: Path) -> float:
    started = time.perf_counter()
    connection = sqlite3.connect(db)
    count = 0
    for _ in connection.execute("SELECT seq, stream, version, type, at, data, hash FROM events ORDER BY seq"):
        count += 1
    connection.close()
    return time.perf_counter() - started


def verify_in_process(db: Path) -> float:
    started = time.perf_counter()
    with EventLog.open(db) as log:
        result = log.verify()
    assert result.violation_count == 0, result.violations[:3]
    return time.perf_counter() - started


async def discovery(count: int, workdir: Path) -> float:
    """Seconds from `fsm-hub serve` spawn until all `count` announced instances are active."""
    directory = workdir / f"instances-{count}"
    directory.mkdir(mode=0o700)
    db = workdir / f"discovery-{count}.db"
    servers = await start_servers(count, 250)
    try:
        announce(directory, servers)
        started = time.perf_counter()
        hub = await asyncio.create_subprocess_exec(
            HUB, "serve", "--db", str(db), "--instances-dir", str(directory),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            # Follow the log incrementally (a cheap poll: the hub, not the poller, is measured).
            states: dict[str, str] = {}
            after = 0
            while True:
                await asyncio.sleep(0.2)
                if not db.exists():
                    continue
                try:
                    with sqlite3.connect(db) as connection:
                        rows = connection.execute(
                            "SELECT seq, stream, json_extract(data, '$.to') FROM events"
                            " WHERE seq > ? AND type = 'transition' ORDER BY seq",
                            (after,),
                        ).fetchall()
                    connection.close()
                except sqlite3.Error:  # not migrated yet: look again
                    continue
                for seq, stream, target in rows:
                    states[stream], after = target, seq
                if len(states) == count and all(s == "active" for s in states.values()):
                    return time.perf_counter() - started
                if time.perf_counter() - started > 300:
                    raise TimeoutError(f"{count} instances not active after 300 s")
        finally:
            hub.terminate()
            await hub.wait()
    finally:
        for server in servers:
            assert server.process.stdin is not None
            server.process.stdin.close()
            await server.process.wait()


# -- writers ---------------------------------------------------------------------------------------


async def store_writer(path: Path, producers: int, per: int) -> float:
    store = await EventStore.open(path)

    async def produce(p: int) -> None:
        for i in range(per):
            await store.append(
                f"w{p:04d}",
                "transition",
                transition_data("connect", "retrying", "connecting", reason="bench", attempt=i),
            )

    started = time.perf_counter()
    await asyncio.gather(*(produce(p) for p in range(producers)))
    elapsed = time.perf_counter() - started
    await store.close()
    return producers * per / elapsed


async def bare_writer(path: Path, producers: int, per: int) -> float:
    """The reference: one task, everything queued in one executemany and one commit, then acks."""
    _connect(path).close()  # the same schema, by the same migrations
    db = await aiosqlite.connect(path)
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=FULL")
    queue: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
    wake = asyncio.Event()
    done = False
    seq = 0
    versions: dict[str, int] = {}
    hash_ = bytes(32)

    async def writer() -> None:
        nonlocal seq
        while True:
            if not queue:
                if done:
                    return
                wake.clear()
                await wake.wait()
                continue
            batch, queue[:] = list(queue), []
            rows = []
            for (stream, data), _ in batch:
                seq += 1
                versions[stream] = versions.get(stream, 0) + 1
                rows.append(
                    (seq, stream, versions[stream], "transition", format_time(utc_now()), data, hash_)
                )
            await db.executemany(
                "INSERT INTO events (seq, stream, version, type, at, data, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            await db.commit()
            for _, future in batch:
                future.set_result(None)

    task = asyncio.create_task(writer())

    async def produce(p: int) -> None:
        loop = asyncio.get_running_loop()
        for i in range(per):
            future: asyncio.Future[None] = loop.create_future()
            data = json.dumps(
                transition_data("connect", "retrying", "connecting", reason="bench", attempt=i),
                separators=(",", ":"),
            )
            queue.append(((f"w{p:04d}", data), future))
            wake.set()
            await future

    started = time.perf_counter()
    await asyncio.gather(*(produce(p) for p in range(producers)))
    elapsed = time.perf_counter() - started
    done = True
    wake.set()
    await task
    await db.close()
    return producers * per / elapsed


# -- report ----------------------------------------------------------------------------------------


def median(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


def table(rows: list[tuple[str, ...]]) -> str:
    header = ("measure", "value", "floor / compared to", "target", "result")
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "pass" if ok else "MISS"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, default=None, help="build the big log here once, reuse it")
    parser.add_argument("--discovery", default="500,1000,2000")
    parser.add_argument("--writer-events", type=int, default=20_000)
    parser.add_argument("--skip", default="", help="comma list of: startup,instances,verify,discovery,writer")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="fsm-hub-bench-log-") as tmp:
        workdir = Path(tmp)
        big = args.keep or workdir / "big.db"
        if not big.exists():
            started = time.perf_counter()
            asyncio.run(build(big, args.events, args.instances))
            print(
                f"built {args.events:,} events / {args.instances:,} instances through the store"
                f" in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
        empty = workdir / "empty.db"
        _connect(empty).close()
        nowhere = workdir / "no-instances"
        nowhere.mkdir(mode=0o700)
        with EventLog.open(big) as log:
            events = log.count()

        if "startup" not in skip:
            # Start-up as installed: `pip install .` writes fsm-hub's bytecode, an editable
            # install under PYTHONDONTWRITEBYTECODE=1 (this machine's setting) never does, so
            # every start would compile ~50 modules from source. Compile them once, as pip would.
            compiled = subprocess.run(
                [sys.executable, "-m", "compileall", "-q", str(REPO / "fsm_hub")], check=False
            ).returncode == 0
            print(f"fsm-hub bytecode compiled (as an install would): {compiled}", flush=True)
            floor = median(args.runs, lambda: run_child([sys.executable, "-c", "pass"])[0])
            measured = {
                name: [serve_startup(db, nowhere) for _ in range(args.runs)]
                for name, db in (("empty", empty), ("big", big))
            }
            init = {k: statistics.median(m[0] for m in v) for k, v in measured.items()}
            listed = {k: statistics.median(m[1] for m in v) for k, v in measured.items()}
            rss = {k: statistics.median(m[2] for m in v) for k, v in measured.items()}
            rows += [
                ("python -c pass", f"{floor:.3f} s", "the floor", "", ""),
                (
                    "serve --mcp → initialize, empty log",
                    f"{init['empty']:.3f} s",
                    f"{init['empty'] - floor:+.3f} s over the floor",
                    "",
                    "",
                ),
                (
                    "serve --mcp → instances_list, empty log",
                    f"{listed['empty']:.3f} s",
                    "",
                    "≤ 0.25 s",
                    verdict(listed["empty"] <= 0.25),
                ),
                (
                    f"serve --mcp → instances_list, {events:,} events",
                    f"{listed['big']:.3f} s",
                    f"{listed['big'] - listed['empty']:+.3f} s vs empty",
                    "≤ +0.5 s",
                    verdict(listed["big"] - listed["empty"] <= 0.5),
                ),
                ("hub RSS after start-up, empty log", f"{rss['empty']:.1f} MB", "", "", ""),
                (
                    f"hub RSS after start-up, {events:,} events",
                    f"{rss['big']:.1f} MB",
                    f"{rss['big'] - rss['empty']:+.1f} MB vs empty",
                    "≤ +50 MB",
                    verdict(rss["big"] - rss["empty"] <= 50),
                ),
            ]
        if "instances" not in skip:
            for label, extra in (("", []), (" --json", ["--json"])):
                runs = {
                    name: [run_child([HUB, "instances", *extra, "--db", str(db)]) for _ in range(args.runs)]
                    for name, db in (("empty", empty), ("big", big))
                }
                wall = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
                peak = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
                rows += [
                    (f"fsm-hub instances{label}, empty log", f"{wall['empty']:.3f} s",
                     f"peak RSS {peak['empty']:.0f} MB", "", ""),
                    (f"fsm-hub instances{label}, {events:,} events", f"{wall['big']:.3f} s",
                     f"{wall['big'] - wall['empty']:+.3f} s vs empty; peak RSS {peak['big']:.0f} MB",
                     "" if label else "≤ +0.3 s",
                     "" if label else verdict(wall["big"] - wall["empty"] <= 0.3)),
                ]  # fmt: skip
            folds = []
            for _ in range(args.runs):
                started = time.perf_counter()
                with EventLog.open(big) as log:
                    listed = len(log.fold().instances)
                folds.append(time.perf_counter() - started)
            rows.append((f"  of which: snapshot + tail fold ({listed:,} instances)",
                         f"{statistics.median(folds):.3f} s", "in-process, no output", "", ""))  # fmt: skip
        if "verify" not in skip:
            # Interleaved pairs, so a burst of load from other work hits both sides of a ratio.
            pairs = [(bare_read(big), verify_in_process(big)) for _ in range(args.runs)]
            read = statistics.median(p[0] for p in pairs)
            verify = statistics.median(p[1] for p in pairs)
            speed = statistics.median(p[0] / p[1] for p in pairs)
            child = [
                run_child([HUB, "replay", "--verify", "--json", "--db", str(big)])
                for _ in range(max(1, args.runs // 2))
            ]
            peak = statistics.median(c[1] for c in child)
            report = json.loads(child[0][2])
            rows += [
                (f"bare sqlite3 read of {events:,} rows", f"{read:.2f} s", "", "", ""),
                (
                    "replay --verify (chain, legality, snapshots)",
                    f"{verify:.2f} s",
                    f"speed {speed:.2f} × the bare read (median of pairs)",
                    "≥ 0.5 ×",
                    verdict(speed >= 0.5),
                ),
                (
                    "replay --verify peak RSS (subprocess)",
                    f"{peak:.0f} MB",
                    f"ok={report['ok']}",
                    "≤ 100 MB",
                    verdict(peak <= 100),
                ),
            ]
        if "writer" not in skip:
            per = args.writer_events // 100
            ours, bare = [], []
            for run in range(args.runs):
                ours.append(asyncio.run(store_writer(workdir / f"w-store-{run}.db", 100, per)))
                bare.append(asyncio.run(bare_writer(workdir / f"w-bare-{run}.db", 100, per)))
            o, b = statistics.median(ours), statistics.median(bare)
            rows += [
                (
                    "bare aiosqlite group-commit writer, 100 producers",
                    f"{b:,.0f} ev/s",
                    "the reference",
                    "",
                    "",
                ),
                (
                    "EventStore writer, 100 producers (chain incl.)",
                    f"{o:,.0f} ev/s",
                    f"{o / b:.2f} × the bare writer",
                    "≥ 0.9 ×",
                    verdict(o / b >= 0.9),
                ),
            ]
        if "discovery" not in skip:
            sizes = [int(n) for n in args.discovery.split(",")]
            times: dict[int, float] = {}
            for n in sizes:
                measured = []
                for r in range(max(1, args.runs // 2)):
                    where = workdir / f"d{n}-{r}"
                    where.mkdir()
                    measured.append(asyncio.run(discovery(n, where)))
                times[n] = statistics.median(measured)
            for n in sizes:
                per_k = times[n] / n * 1000
                rows.append(
                    (
                        f"discovery of {n:,} instances to all active",
                        f"{times[n]:.2f} s",
                        f"{per_k:.2f} s per 1,000",
                        "linear",
                        "",
                    )
                )
    print(
        f"fsm-hub log benchmark: medians of {args.runs} runs; python {sys.version.split()[0]},"
        f" sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus (shared with other work: loaded)"
    )
    print(table(rows))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
