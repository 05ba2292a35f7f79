"""Hostile stdio input against the real console script — as owner and through a bridge: each
line gets its JSON-RPC error, the other requests are answered, no traceback, clean exit. And a
client that stops reading its stdout while big answers stream holds the hub's memory bounded.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from tests.e2e.lab import Lab, eventually
from tests.e2e.test_stdio_protocol import RawHub

pytestmark = pytest.mark.e2e


async def _stop(hub: RawHub) -> None:
    if hub.process.returncode is None:
        hub.process.kill()
        await hub.process.wait()


async def _stderr(hub: RawHub) -> bytes:
    assert hub.process.stderr is not None
    return await asyncio.wait_for(hub.process.stderr.read(), 10)


@pytest.mark.parametrize("role", ["owner", "bridge"])
async def test_hostile_lines_get_errors_and_the_hub_keeps_answering(lab: Lab, role: str) -> None:
    async with AsyncExitStack() as stack:
        hub = await RawHub.start(lab)
        stack.push_async_callback(_stop, hub)
        if role == "bridge":
            await hub.initialize()
            owner, hub = hub, await RawHub.start(lab)
            stack.push_async_callback(_stop, hub)
        assert "error" in await hub.request("early", "tools/list", {})  # before initialize
        await hub.initialize()
        hub.send_raw(b"[" * 1000 + b"]" * 1000 + b"\n")
        assert (await hub.answer(None))["error"]["code"] == -32600
        hub.messages.clear()
        hub.send_raw(b"[" + b"{}," * 2_000_000 + b"{}]\n")  # the 6 MB batch
        assert (await hub.answer(None, timeout=20))["error"]["code"] == -32600
        hub.messages.clear()
        hub.send_raw(b'{"jsonrpc":"2.0","id":"n","method":"ping","params":{"x":NaN}}\n')
        assert (await hub.answer(None))["error"]["code"] == -32700
        batch = [
            {"jsonrpc": "2.0", "id": "b", "method": "ping"},
            {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": {}}},
        ]
        hub.send_raw(json.dumps(batch).encode() + b"\n")
        answered = await eventually(lambda: [m for m in hub.messages if isinstance(m, list)], timeout=10)
        assert answered == [[{"jsonrpc": "2.0", "id": "b", "result": {}}]]
        history = {"name": "instances_history", "arguments": {"instance_id": "x", "limit": 2**63}}
        answer = await hub.request("h", "tools/call", history)
        assert answer["result"]["isError"] and "at most" in answer["result"]["content"][0]["text"]
        assert (await hub.request("p", "ping"))["result"] == {}
        assert hub.process.stdin is not None
        hub.process.stdin.close()
        assert await asyncio.wait_for(hub.process.wait(), 15) == 0
        assert b"Traceback" not in await _stderr(hub)
        if role == "bridge":
            assert (await owner.request("still", "ping"))["result"] == {}


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_a_client_that_stops_reading_keeps_the_hub_memory_bounded(lab: Lab) -> None:
    lab.start("a11ce5", "api")
    text = "y" * 512 * 1024
    calls = 200  # 100 MB of answers the client does not read
    async with AsyncExitStack() as stack:
        hub = await RawHub.start(lab)
        stack.push_async_callback(_stop, hub)
        await hub.initialize()
        await eventually(hub.all_active)
        connect = {"name": "instances_connect", "arguments": {"instance_id": "api"}}
        assert "error" not in await hub.request("c", "tools/call", connect)
        hub._reader.cancel()  # stop reading stdout: the client is stuck
        baseline = _peak_rss_kib(hub.process.pid)
        assert hub.process.stdin is not None
        requests = b"".join(
            json.dumps(
                {"jsonrpc": "2.0", "id": n, "method": "tools/call",
                 "params": {"name": "echo", "arguments": {"text": text}}}
            ).encode() + b"\n"
            for n in range(calls)
        )  # fmt: skip
        hub.process.stdin.write(requests)
        # The hub stops reading our requests once it has answers nobody reads: our write stalls.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(hub.process.stdin.drain(), 5)
        grown_mib = (_peak_rss_kib(hub.process.pid) - baseline) / 1024
        assert grown_mib < 100, f"the hub grew {grown_mib:.0f} MiB for a stuck client"
        # Once the client reads again, every answer arrives, whole.
        assert hub.process.stdout is not None
        answered = 0
        async with asyncio.timeout(60):
            while answered < calls:
                line = await hub.process.stdout.readline()
                message = json.loads(line)
                if message.get("id") in range(calls):
                    assert message["result"]["content"][0]["text"] == text
                    answered += 1
        print(f"peak growth while stuck: {grown_mib:.1f} MiB for {calls * len(text) // 2**20} MiB of answers")
