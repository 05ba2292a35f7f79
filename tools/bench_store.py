"""Benchmark of the event log: writer throughput, its ceiling, fold rate, history latency.

    .venv/bin/python tools/bench_store.py [--runs 5] [--events 100000] [--log-events 1000000]

Every figure is the median of `--runs` runs (history: of at least 20 lookups; one-row commits:
of 200 commits). Writes are durable (WAL, synchronous=FULL), in a
temporary directory on the same file system as `--dir` (default: the system temp dir).
This is a measurement, not a test: it prints a table and exits 0 even when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fsm_hub.core.events import StoredEvent, format_time, transition_data, utc_now
from fsm_hub.core.view import fold
from fsm_hub.store.sqlite import EventLog, EventStore, _connect

_INSERT = "INSERT INTO events (seq, stream, version, type, at, data) VALUES (?, ?, ?, ?, ?, ?)"
_FIRST = ("connect", "discovered", "connecting", None)
_LOOP = (  # from connecting back to connecting: every transition legal and continuous
    ("connected", "connecting", "active", None),
    ("lost", "active", "retrying", "connection reset"),
    ("connect", "retrying", "connecting", None),
    ("connect_failed", "connecting", "retrying", "connection refused"),
    ("connect", "retrying", "connecting", None),
)


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


def payload(i: int) -> dict[str, object]:
    return transition_data("connect", "retrying", "connecting", reason="bench", attempt=i % 8)


# -- writer ------------------------------------------------------------------------------------


async def _writer_run(path: Path, producers: int, per_producer: int) -> float:
    store = await EventStore.open(path)

    async def produce(p: int) -> None:
        stream = f"bench-{p:04d}"
        for i in range(per_producer):
            await store.append(stream, "transition", payload(i))

    start = time.perf_counter()
    await asyncio.gather(*(produce(p) for p in range(producers)))
    elapsed = time.perf_counter() - start
    await store.close()
    return producers * per_producer / elapsed


def writer_rate(workdir: Path, producers: int, events: int) -> Callable[[], float]:
    counter = iter(range(1_000_000))

    def once() -> float:
        path = workdir / f"writer-{producers}-{next(counter)}.db"
        return asyncio.run(_writer_run(path, producers, events // producers))

    return once


def ceiling_rate(workdir: Path, events: int) -> Callable[[], float]:
    """The same rows, prebuilt, in one executemany and one durable transaction."""
    counter = iter(range(1_000_000))
    at = format_time(utc_now())
    rows = [
        (i + 1, f"bench-{i % 100:04d}", i // 100 + 1, "transition", at, json.dumps(payload(i)))
        for i in range(events)
    ]

    def once() -> float:
        path = workdir / f"ceiling-{next(counter)}.db"
        db = _connect(path)
        db.execute("PRAGMA synchronous=FULL")
        start = time.perf_counter()
        db.execute("BEGIN")
        db.executemany(_INSERT, rows)
        db.execute("COMMIT")
        elapsed = time.perf_counter() - start
        db.close()
        return events / elapsed

    return once


def commit_latency(workdir: Path, commits: int = 200) -> tuple[float, float]:
    """Median seconds of one durable one-row commit: bare sqlite3, and through the store."""
    db = _connect(workdir / "commit-bare.db")
    db.execute("PRAGMA synchronous=FULL")
    at = format_time(utc_now())
    times: list[float] = []
    for i in range(commits):
        start = time.perf_counter()
        db.execute("BEGIN")
        db.execute(_INSERT, (i + 1, "s", i + 1, "transition", at, "{}"))
        db.execute("COMMIT")
        times.append(time.perf_counter() - start)
    db.close()

    async def through_store() -> list[float]:
        store = await EventStore.open(workdir / "commit-store.db")
        measured: list[float] = []
        for _ in range(commits):
            start = time.perf_counter()
            await store.append("s", "transition", {})
            measured.append(time.perf_counter() - start)
        await store.close()
        return measured

    return statistics.median(times), statistics.median(asyncio.run(through_store()))


def batch_commit_cost(workdir: Path, run: int, batches: int = 1000, streams: int = 100) -> float:
    """Mean seconds to commit one batch of 100 events over 100 streams, as the writer sees it.

    The mean, not the median: WAL checkpoints land on every few commits, and throughput pays
    for them. Each event touches its own stream's (stream, version) index page, so one such
    commit writes ~100 more WAL frames than a batch on one stream would.
    """
    db = _connect(workdir / f"commit-batch-{run}.db")
    db.execute("PRAGMA synchronous=FULL")
    at = format_time(utc_now())
    data = json.dumps(payload(1))
    elapsed = 0.0
    for batch in range(batches):
        rows = [
            (batch * 100 + i + 1, f"bench-{i % streams:04d}", batch + 1, "transition", at, data)
            for i in range(100)
        ]
        start = time.perf_counter()
        db.execute("BEGIN")
        db.executemany(_INSERT, rows)
        db.execute("COMMIT")
        elapsed += time.perf_counter() - start
    db.close()
    return elapsed / batches


# -- a big log ---------------------------------------------------------------------------------


def log_rows(events: int, instances: int) -> Iterator[tuple[int, str, int, str, str, str]]:
    """A plausible log: each instance discovered, then cycling through connection transitions."""
    per_instance = events // instances
    base = 1_773_458_055.0  # 2026-03-14, one microsecond per event
    seq = 0
    ids = [f"{random.Random(i).getrandbits(64):016x}" for i in range(instances)]
    for version in range(1, per_instance + 1):
        for n, stream in enumerate(ids):
            seq += 1
            at = format_time(_utc(base + seq / 1e6))
            if version == 1:
                data = {"name": f"app-{n}", "directory": f"/src/app-{n}", "port": 8000 + n % 1000,
                        "pid": 1000 + n, "url": f"http://127.0.0.1:{8000 + n % 1000}/mcp"}
                yield seq, stream, 1, "instance_discovered", at, json.dumps(data)
                continue
            event, source, target, error = _FIRST if version == 2 else _LOOP[(version - 3) % len(_LOOP)]
            data = transition_data(event, source, target, reason="bench", attempt=1, error=error)
            yield seq, stream, version, "transition", at, json.dumps(data)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def build_log(path: Path, events: int, instances: int) -> None:
    db = _connect(path)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    db.executemany(_INSERT, log_rows(events, instances))
    db.execute("COMMIT")
    db.close()


def fold_rate(events: list[StoredEvent]) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        fold(events)
        return len(events) / (time.perf_counter() - start)

    return once


def read_fold_rate(path: Path, count: int) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        with EventLog.open(path) as log:
            fold(log.events())
        return count / (time.perf_counter() - start)

    return once


def history_latency(path: Path, instances: int, by: str) -> Callable[[], float]:
    """Seconds to resolve one instance (by id or by name) and read its whole history."""
    picks = random.Random(7)
    with EventLog.open(path) as log:  # the log ends with one event of every instance
        streams = [row.stream for row in log.events(last=instances)]

    def once() -> float:
        n = picks.randrange(len(streams))
        ref = streams[n] if by == "id" else None
        start = time.perf_counter()
        with EventLog.open(path) as log:
            if ref is None:
                stream = log.resolve(log_name(log, streams[n]))
            else:
                stream = log.resolve(ref)
            history = list(log.events(stream=stream))
        elapsed = time.perf_counter() - start
        assert history and history[0].type == "instance_discovered"
        return elapsed

    return once


def log_name(log: EventLog, stream: str) -> str:
    first = next(iter(log.events(stream=stream)))
    return str(first.data["name"])


# -- report ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is shown")
    parser.add_argument("--events", type=int, default=100_000,
                        help="events written with 100 producers (10 write a tenth, 1 a fiftieth)")
    parser.add_argument("--log-events", type=int, default=1_000_000, help="size of the folded log")
    parser.add_argument("--instances", type=int, default=10_000, help="instances in that log")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the temporary logs")
    args = parser.parse_args(argv)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fsm-hub-bench-", dir=args.dir) as tmp:
        workdir = Path(tmp)
        bare, through = commit_latency(workdir)
        rows.append(Row("durable commit, bare sqlite3 (1 row)", bare * 1e3, "ms"))
        rows.append(Row("durable append, through the writer (1 event)", through * 1e3, "ms"))
        batch = statistics.median(batch_commit_cost(workdir, run) for run in range(args.runs))
        rows.append(Row("durable commit, bare sqlite3 (100 events, 100 streams; mean)", batch * 1e3, "ms"))
        rows.append(Row("  → bound for 100 producers (100 events / that commit)", 100 / batch, "events/s"))
        writer: dict[int, float] = {}
        for producers, events in ((1, args.events // 50), (10, args.events // 10), (100, args.events)):
            writer[producers] = median_of(args.runs, writer_rate(workdir, producers, events))
            target = 100_000.0 if producers == 100 else None
            rows.append(Row(
                f"writer, {producers} producer{'s' if producers > 1 else ''} ({events:,} events)",
                writer[producers], "events/s",
                "≥ 100,000" if target else "",
                writer[producers] >= target if target else None,
            ))
        ceiling = median_of(args.runs, ceiling_rate(workdir, args.events))
        rows.append(Row(f"ceiling: bare executemany, 1 transaction ({args.events:,})", ceiling, "events/s"))
        rows.append(Row("writer (100 producers) / ceiling", writer[100] / ceiling * 100, "%"))

        log_path = workdir / "big.db"
        started = time.perf_counter()
        build_log(log_path, args.log_events, args.instances)
        built = time.perf_counter() - started
        with EventLog.open(log_path) as log:
            events = list(log.events())
        rate = median_of(args.runs, fold_rate(events))
        rows.append(Row(f"fold, in memory ({len(events):,} events)", rate, "events/s",
                        "≥ 1,000,000", rate >= 1_000_000))
        del events
        rate = median_of(args.runs, read_fold_rate(log_path, args.log_events))
        rows.append(Row("read from disk + fold (instances, replay)", rate, "events/s"))
        for by in ("id", "name"):
            latency = median_of(max(args.runs, 20), history_latency(log_path, args.instances, by))
            rows.append(Row(
                f"history of one instance by {by} ({args.log_events // args.instances} of "
                f"{args.log_events:,} events, {args.instances:,} instances)",
                latency * 1e3, "ms", "≤ 50" if by == "id" else "", latency <= 0.050 if by == "id" else None,
            ))

    print(f"fsm-hub store benchmark: median of {args.runs} runs, python {sys.version.split()[0]},"
          f" sqlite {sqlite3.sqlite_version}, {os.cpu_count()} cpus; log built in {built:.1f} s")
    print(render(rows))
    return 0


def render(rows: list[Row]) -> str:
    def number(row: Row) -> str:
        return f"{row.value:,.0f}" if row.value >= 100 else f"{row.value:,.2f}"

    table = [("measure", "value", "unit", "target", "result")]
    for row in rows:
        verdict = "" if row.passed is None else ("pass" if row.passed else "MISS")
        table.append((row.name, number(row), row.unit, row.target, verdict))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    lines = []
    for n, cells in enumerate(table):
        lines.append("  ".join(
            c.rjust(w) if i == 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
