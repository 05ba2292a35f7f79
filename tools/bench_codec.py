"""The bounded strict codec against plain json, and the hub under a 6 MB batch of `{}`.

    python tools/bench_codec.py

Prints medians of several runs. Compare the ratios within one run: the machine is shared.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fsm_hub.mcp import jsonrpc

RUNS = 7
CALL = json.dumps(
    {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
     "params": {"name": "echo", "arguments": {"text": "hello " * 40, "n": 3.5, "list": [1, 2, 3]}}}
).encode()  # fmt: skip
TEXT = {"content": [{"type": "text", "text": "x" * 1_000_000}]}
BIG = json.dumps({"jsonrpc": "2.0", "id": 1, "result": TEXT}).encode()
ROWS = {"rows": [{"a": [i, {"b": [i]}]} for i in range(300)]}
NESTED = json.dumps({"jsonrpc": "2.0", "id": 1, "result": ROWS}).encode()


def per_call(function: object, data: bytes, loops: int) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        for _ in range(loops):
            function(data)  # type: ignore[operator]
        times.append((time.perf_counter() - start) / loops)
    return statistics.median(times)


def bomb() -> tuple[float, float]:
    """Seconds to the answer and peak RSS (MiB) of `serve --mcp` given a 6 MB batch of {}."""
    with tempfile.TemporaryDirectory() as root:
        instances = Path(root, "instances")
        instances.mkdir(mode=0o700)
        hub = subprocess.Popen(
            [str(Path(sys.executable).with_name("fsm-hub")), "serve", "--mcp", "--db", f"{root}/e.db",
             "--instances-dir", str(instances)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert hub.stdin is not None and hub.stdout is not None
        start = time.perf_counter()
        hub.stdin.write(b"[" + b"{}," * 2_000_000 + b"{}]\n")
        hub.stdin.flush()
        answer = json.loads(hub.stdout.readline())
        elapsed = time.perf_counter() - start
        status = Path(f"/proc/{hub.pid}/status").read_text()
        peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
        hub.stdin.close()
        hub.wait(30)
        assert answer["error"]["code"] == -32600
        return elapsed, peak


def main() -> None:
    print(f"codec, median of {RUNS} runs (machine shared with other jobs: compare ratios)")
    print(f"{'message':<28}{'json.loads µs':>15}{'jsonrpc.decode µs':>19}{'ratio':>8}")
    for name, data, loops in (("tools/call, 330 B", CALL, 20000), ("result, 300 nested rows", NESTED, 500),
                              ("result, 1 MB text", BIG, 50)):  # fmt: skip
        plain = per_call(json.loads, data, loops) * 1e6
        ours = per_call(jsonrpc.decode, data, loops) * 1e6
        print(f"{name:<28}{plain:>15.1f}{ours:>19.1f}{ours / plain:>8.2f}")
    times, peaks = zip(*(bomb() for _ in range(3)), strict=True)
    print(f"\n6 MB batch of {{}} to serve --mcp (median of 3): answered -32600 in "
          f"{statistics.median(times):.2f} s, peak RSS {statistics.median(peaks):.0f} MiB "
          f"(before: 49 s and 3.3 GB, from the issue); cpus={os.cpu_count()}")


if __name__ == "__main__":
    main()
