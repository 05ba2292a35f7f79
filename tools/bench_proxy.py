"""Benchmark: tools/call latency directly to an SDK instance vs through `fsm-hub serve --mcp`.

Not a test: prints a table. Both paths are driven by the same client code in the same run:
  * lean — a minimal client (raw JSON-RPC: one aiohttp POST per call directly; one stdio line per
    call through the hub), so the hub's own cost is not hidden behind a heavy client;
  * sdk  — the official MCP Python SDK `Client`, over Streamable HTTP directly and over stdio
    through the hub: what an SDK-based AI client sees.
  * http — the lean client over Streamable HTTP to the same hub (`serve --mcp --http`): its own
    `/mcp` bound with `instances_connect`, and the per-instance endpoint `/instances/bench/mcp`.
Each figure is the median over --runs runs; p50/p99 are per-call latencies within a run. Last,
the upstream handshakes a bind costs: a counting proxy in front of a second instance counts the
`initialize` requests the hub sends it for --binds fresh sessions that bind and call once.

    python tools/bench_proxy.py [--calls 1000] [--runs 5] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.servers.launch import spawn_sdk_server, stop  # noqa: E402

Call = Callable[[], Awaitable[Any]]
HUB = [str(Path(sys.executable).with_name("fsm-hub"))]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(call: Call, calls: int, concurrency: int) -> list[float]:
    latencies: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    share = [calls // concurrency + (1 if i < calls % concurrency else 0) for i in range(concurrency)]
    await asyncio.gather(*(worker(n) for n in share))
    return latencies


class LeanDirect:
    """Raw Streamable HTTP client: initialize once, then one POST per call."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession()
        self.headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        self.next_id = 0

    async def post(self, method: str, params: dict[str, Any] | None, notify: bool = False) -> Any:
        self.next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        if not notify:
            message["id"] = self.next_id
        async with self.http.post(self.url, data=json.dumps(message), headers=self.headers) as response:
            if "Mcp-Session-Id" in response.headers:
                self.headers["Mcp-Session-Id"] = response.headers["Mcp-Session-Id"]
            body = await response.read()
        if notify:
            return None
        if body.startswith(b"{"):
            return json.loads(body)
        for line in body.splitlines():
            if line.startswith(b"data:") and line[5:].strip():
                return json.loads(line[5:])
        raise RuntimeError(f"no answer: {body[:200]!r}")

    async def start(self) -> None:
        init = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"},
        }
        await self.post("initialize", init)
        self.headers["MCP-Protocol-Version"] = "2025-11-25"
        await self.post("notifications/initialized", None, notify=True)

    async def call(self) -> Any:
        answer = await self.post("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}})
        assert answer["result"]["structuredContent"]["result"] == 5, answer
        return answer

    async def bind(self, instance: str) -> None:
        """On the hub's own /mcp: wait until the instance is active, then connect to it."""
        for _ in range(200):
            listed = await self.post("tools/call", {"name": "instances_list", "arguments": {}})
            states = {i["id"]: i["state"] for i in listed["result"]["structuredContent"]["instances"]}
            if states.get(instance) == "active":
                break
            await asyncio.sleep(0.05)
        connect = {"name": "instances_connect", "arguments": {"instance_id": instance}}
        answer = await self.post("tools/call", connect)
        assert not answer["result"]["isError"], answer

    async def close(self) -> None:
        await self.http.close()


class CountingProxy:
    """Forwards HTTP to an MCP server, counting the `initialize` requests that pass."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.initializes = 0

    async def start(self) -> int:
        from aiohttp import web

        self.http = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/mcp", self.forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(self.runner.addresses[0][1])

    async def forward(self, request: Any) -> Any:
        from aiohttp import web

        if request.method == "GET":  # no standalone streams: the count needs none
            return web.Response(status=405)
        body = await request.read()
        if b'"method":"initialize"' in body.replace(b" ", b""):
            self.initializes += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self.http.request(request.method, self.target, data=body, headers=headers) as upstream:
            payload = await upstream.read()
            kept = ("content-type", "mcp-session-id")
            passed = {k: v for k, v in upstream.headers.items() if k.lower() in kept}
            return web.Response(status=upstream.status, body=payload, headers=passed)

    async def close(self) -> None:
        await self.runner.cleanup()
        await self.http.close()


class LeanHub:
    """Raw stdio client of `fsm-hub serve --mcp`: one line out, one line back per call."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.argv, self.env = argv, env
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0

    async def start(self, instance: str) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=self.env,
            limit=64 * 1024 * 1024,
        )
        self.reader = asyncio.create_task(self._read())
        await self.request(
            "initialize",
            {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        )
        self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        for _ in range(200):
            listed = await self.request("tools/call", {"name": "instances_list", "arguments": {}})
            states = [i["state"] for i in listed["result"]["structuredContent"]["instances"]]
            if states == ["active"]:
                break
            await asyncio.sleep(0.05)
        await self.request(
            "tools/call", {"name": "instances_connect", "arguments": {"instance_id": instance}}
        )

    def _send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")

    async def request(self, method: str, params: dict[str, Any]) -> Any:
        self.next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        self._send({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        return await future

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            message = json.loads(line)
            future = self.pending.pop(message.get("id"), None)
            if future is not None:
                future.set_result(message)

    async def call(self) -> Any:
        answer = await self.request("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}})
        assert answer["result"]["structuredContent"]["result"] == 5, answer
        return answer

    async def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await self.process.wait()
        self.reader.cancel()


async def run(args: argparse.Namespace) -> None:
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    instances = work / "instances"
    instances.mkdir(mode=0o700)
    process, url = spawn_sdk_server(work / "server.log", json=args.json)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    (instances / "bench1.json").write_text(
        json.dumps(
            {
                "id": "bench1",
                "name": "bench",
                "directory": str(work),
                "port": port,
                "process_info": {"pid": process.pid, "executable": sys.executable},
            }
        )
    )
    counting = CountingProxy(url)
    counted_port = await counting.start()
    (instances / "bench2.json").write_text(
        json.dumps(
            {
                "id": "bench2",
                "name": "counted",
                "directory": str(work),
                "port": counted_port,
                "process_info": {"pid": os.getpid(), "executable": sys.executable},
            }
        )
    )
    env = {**os.environ, "FSM_HUB_DB": str(work / "events.db"), "FSM_HUB_INSTANCES_DIR": str(instances)}
    http_port = free_port()
    hub_argv = [*HUB, "serve", "--mcp", "--http", f"127.0.0.1:{http_port}"]
    rows: dict[str, dict[str, list[float]]] = {}

    def record(name: str, latencies: list[float]) -> None:
        entry = rows.setdefault(name, {"p50": [], "p99": []})
        entry["p50"].append(percentile(latencies, 0.5) * 1000)
        entry["p99"].append(percentile(latencies, 0.99) * 1000)

    try:
        direct = LeanDirect(url)
        await direct.start()
        hub = LeanHub(hub_argv, env)
        await hub.start("bench1")
        sdk_direct = Client(url)
        bridge_argv = [*HUB, "serve", "--mcp"]  # attaches to the hub above (its --http is taken)
        sdk_hub = Client(StdioServerParameters(command=bridge_argv[0], args=bridge_argv[1:], env=env))
        await sdk_direct.__aenter__()
        await sdk_hub.__aenter__()
        await sdk_hub.call_tool("instances_connect", {"instance_id": "bench1"})
        bound_http = LeanDirect(f"http://127.0.0.1:{http_port}/mcp")
        await bound_http.start()
        await bound_http.bind("bench1")
        per_instance = LeanDirect(f"http://127.0.0.1:{http_port}/instances/bench/mcp")
        await per_instance.start()

        async def sdk_call(client: Any) -> None:
            result = await client.call_tool("add", {"a": 2, "b": 3})
            assert not result.is_error

        paths: list[tuple[str, Call]] = [
            ("lean direct", direct.call),
            ("lean via hub", hub.call),
            ("sdk direct", lambda: sdk_call(sdk_direct)),
            ("sdk via hub", lambda: sdk_call(sdk_hub)),
            ("http bound /mcp", bound_http.call),
            ("http per-instance", per_instance.call),
        ]
        for _, call in paths:  # warm up every path
            await measure(call, 50, 1)
        for run_index in range(args.runs):
            for concurrency in (1, args.concurrency):
                for name, call in paths:
                    latencies = await measure(call, args.calls, concurrency)
                    record(f"{name} ×{concurrency}", latencies)
            print(f"run {run_index + 1}/{args.runs} done", file=sys.stderr)
        handshakes = await count_handshakes(counting, http_port, args.binds)
        await bound_http.close()
        await per_instance.close()
        await sdk_hub.__aexit__(None, None, None)
        await sdk_direct.__aexit__(None, None, None)
        await hub.close()
        await direct.close()
    finally:
        stop([process])
        await counting.close()

    med = {name: {k: statistics.median(v) for k, v in entry.items()} for name, entry in rows.items()}
    print(
        f"\ntools/call latency, ms (median of {args.runs} runs × {args.calls} calls; SDK server "
        f"{'JSON' if args.json else 'SSE'} mode)\n"
    )
    print(f"{'path':<22}{'p50':>9}{'p99':>9}{'hub adds p50':>15}{'ratio p50':>11}{'ratio p99':>11}  target")
    for client in ("lean", "sdk"):
        for concurrency in (1, args.concurrency):
            direct_row = med[f"{client} direct ×{concurrency}"]
            hub_row = med[f"{client} via hub ×{concurrency}"]
            added = hub_row["p50"] - direct_row["p50"]
            ratio50 = hub_row["p50"] / direct_row["p50"]
            ratio99 = hub_row["p99"] / direct_row["p99"]
            verdict = "pass" if added <= 0.5 and ratio50 <= 1.3 else "MISS"
            print(
                f"{client + ' direct ×' + str(concurrency):<22}"
                f"{direct_row['p50']:>9.3f}{direct_row['p99']:>9.3f}"
            )
            print(
                f"{client + ' via hub ×' + str(concurrency):<22}{hub_row['p50']:>9.3f}{hub_row['p99']:>9.3f}"
                f"{added:>+15.3f}{ratio50:>11.2f}{ratio99:>11.2f}  ≤+0.5 ms, ≤1.3×: {verdict}"
            )
    for concurrency in (1, args.concurrency):
        bound_row = med[f"http bound /mcp ×{concurrency}"]
        own_row = med[f"http per-instance ×{concurrency}"]
        ratio = own_row["p50"] / bound_row["p50"]
        verdict = "pass" if ratio <= 1.05 else "MISS"
        print(f"{'http bound /mcp ×' + str(concurrency):<22}{bound_row['p50']:>9.3f}{bound_row['p99']:>9.3f}")
        print(
            f"{'http per-instance ×' + str(concurrency):<22}{own_row['p50']:>9.3f}{own_row['p99']:>9.3f}"
            f"{own_row['p50'] - bound_row['p50']:>+15.3f}{ratio:>11.2f}"
            f"{own_row['p99'] / bound_row['p99']:>11.2f}  ≤1.05× the bound path: {verdict}"
        )
    verdict = "pass" if handshakes <= 1.0 else "MISS"
    print(f"\nupstream handshakes per bind (bind + one call, {args.binds} sessions): {handshakes:.2f}")
    print(f"target ≤ 1: {verdict}")


async def count_handshakes(counting: CountingProxy, http_port: int, binds: int) -> float:
    """Upstream `initialize` requests per fresh session that binds and calls once."""
    first = LeanDirect(f"http://127.0.0.1:{http_port}/mcp")
    await first.start()
    await first.bind("bench2")  # waits until the supervisor's own handshake is done
    await first.close()
    before = counting.initializes
    for _ in range(binds):
        session = LeanDirect(f"http://127.0.0.1:{http_port}/mcp")
        await session.start()
        await session.bind("bench2")
        await session.call()
        await session.close()
    return (counting.initializes - before) / binds


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--binds", type=int, default=20, help="sessions for the handshake count")
    parser.add_argument("--json", action="store_true", help="run the SDK server in JSON-response mode")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
