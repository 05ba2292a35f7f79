"""Bridges that never lose an answer, and stdio that ends cleanly.

Real processes throughout: an owning `serve --mcp`, an attached one (the bridge), SDK instances.
Each large answer is also fetched directly from the instance, and must be the same.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest

from fsm_hub.mcp.upstream import McpClient
from tests.e2e.lab import FSM_HUB, Lab, eventually
from tests.e2e.test_stdio_protocol import RawHub

pytestmark = pytest.mark.e2e

MB = 1024 * 1024


async def _kill(hub: RawHub) -> None:
    if hub.process.returncode is None:
        os.kill(hub.process.pid, signal.SIGCONT)
        hub.process.kill()
        await hub.process.wait()


def _call(request_id: Any, name: str, arguments: dict[str, Any], **meta: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    if meta:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


async def _owner_and_bridge(lab: Lab, stack: AsyncExitStack, *extra: str) -> tuple[RawHub, RawHub]:
    owner = await RawHub.start(lab, *extra)
    stack.push_async_callback(_kill, owner)
    await owner.initialize()
    await eventually(owner.all_active)
    bridge = await RawHub.start(lab, *extra)
    stack.push_async_callback(_kill, bridge)
    await bridge.initialize()
    return owner, bridge


@pytest.mark.parametrize("progress", [False, True], ids=["plain", "with-progressToken"])
async def test_a_1mb_answer_passes_a_bridge_whole(lab: Lab, progress: bool) -> None:
    instance = lab.start("a11ce5", "api")
    text = "x" * MB
    async with AsyncExitStack() as stack:
        _, bridge = await _owner_and_bridge(lab, stack)
        connect = _call("c", "instances_connect", {"instance_id": "api"})
        bridge.send(connect)
        assert "error" not in await bridge.answer("c")
        meta = {"progressToken": "p1"} if progress else {}
        bridge.send(_call(1, "echo", {"text": text}, **meta))
        through_hub = await bridge.answer(1, timeout=30)
        async with McpClient(instance.url) as direct:
            directly = await direct.call_tool("echo", {"text": text})
        assert through_hub["result"]["content"] == directly["content"]
        assert through_hub["result"]["content"][0]["text"] == text
        assert b"Traceback" not in await _stderr_so_far(bridge)


async def _stderr_so_far(hub: RawHub) -> bytes:
    assert hub.process.stderr is not None
    try:
        return await asyncio.wait_for(hub.process.stderr.read(65536), 0.2)
    except TimeoutError:
        return b""


async def test_a_stopped_owner_fails_attached_calls_within_the_call_timeout(lab: Lab) -> None:
    lab.start("a11ce5", "api")
    async with AsyncExitStack() as stack:
        owner, bridge = await _owner_and_bridge(lab, stack, "--call-timeout", "1")
        assert (await bridge.request(1, "ping"))["result"] == {}
        os.kill(owner.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            bridge.send({"jsonrpc": "2.0", "id": 2, "method": "ping"})
            answer = await bridge.answer(2, timeout=10)
            elapsed = time.monotonic() - started
        finally:
            os.kill(owner.process.pid, signal.SIGCONT)
        assert answer["error"]["code"] == -32603
        assert "did not answer within 1s" in answer["error"]["message"]
        assert 0.9 <= elapsed < 5
        # The owner is back: the bridge still works through it.
        assert (await bridge.request(3, "ping"))["result"] == {}


async def test_a_killed_bridge_leaves_the_view_and_its_session_is_recorded_ended(lab: Lab) -> None:
    lab.start("a11ce5", "api")
    async with AsyncExitStack() as stack:
        owner, bridge = await _owner_and_bridge(lab, stack)
        bridge.send(_call("c", "instances_connect", {"instance_id": "api"}))
        assert "error" not in await bridge.answer("c")

        async def clients() -> int:
            status = await owner.request(
                f"s{time.monotonic()}", "tools/call", {"name": "hub_status", "arguments": {}}
            )
            return int(status["result"]["structuredContent"]["clients"])

        assert await clients() == 2
        bridge.process.kill()
        await bridge.process.wait()
        await eventually(lambda: _is(clients(), 1), timeout=10)
        events = json.loads(lab.cli("history", "api", "--json").stdout)
        ended = [e["data"]["reason"] for e in events if e["type"] == "session_disconnected"]
        assert ended == ["bridge disconnected"]


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


@pytest.mark.parametrize("stdin", ["empty", "closed"])
def test_serve_mcp_with_empty_or_closed_stdin_exits_0_without_a_traceback(lab: Lab, stdin: str) -> None:
    command = [FSM_HUB, "serve", "--mcp", "--db", str(lab.db), "--instances-dir", str(lab.instances_dir)]
    if stdin == "empty":
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    else:
        quoted = " ".join(f"'{part}'" for part in command)
        done = subprocess.run(["sh", "-c", f"exec {quoted} <&-"], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert b"Traceback" not in done.stderr and done.stdout == b""
    # It released the log: the next one starts as owner at once.
    again = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert again.returncode == 0


async def test_the_answer_to_a_request_sent_just_before_stdin_closes_is_written(lab: Lab) -> None:
    async with AsyncExitStack() as stack:
        owner = await RawHub.start(lab)
        stack.push_async_callback(_kill, owner)
        await owner.initialize()
        bridge = await RawHub.start(lab)
        stack.push_async_callback(_kill, bridge)
        init = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "r", "version": "1"},
        }
        bridge.send({"jsonrpc": "2.0", "id": "i", "method": "initialize", "params": init})
        bridge.send({"jsonrpc": "2.0", "id": "p", "method": "ping"})
        assert bridge.process.stdin is not None
        bridge.process.stdin.close()
        assert (await bridge.answer("i"))["result"]["serverInfo"]["name"] == "fsm-hub"
        assert (await bridge.answer("p"))["result"] == {}
        assert await asyncio.wait_for(bridge.process.wait(), 15) == 0
