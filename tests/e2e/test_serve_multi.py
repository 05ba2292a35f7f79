"""Several `fsm-hub serve --mcp` on one log: attached processes are full sessions of the owner's
hub (notifications, progress, cancellation, errors all pass the bridge), and when the owner
exits one of them takes over at once — not only when its client next calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from contextlib import AsyncExitStack
from typing import Any

import pytest
from mcp import Client

from tests.e2e.lab import Lab, eventually, states
from tests.e2e.test_serve_stdio import Heard
from tests.e2e.test_stdio_protocol import RawHub
from tests.servers.slow import SlowMcp

pytestmark = pytest.mark.e2e


def owner_pid(lab: Lab) -> int | None:
    try:
        return int(json.loads(lab.db.with_name(lab.db.name + ".owner.json").read_text())["pid"])
    except (OSError, ValueError):
        return None


def code(answer: dict[str, Any]) -> int:
    return int(answer["error"]["code"])


def session_events(lab: Lab, name: str) -> list[tuple[str, str]]:
    events = json.loads(lab.cli("history", name, "--json").stdout)
    return [(e["type"], e["data"]["session_id"]) for e in events if e["type"].startswith("session_")]


async def test_an_attached_session_is_a_full_session_of_the_owners_hub(lab: Lab, slow_mcp: SlowMcp) -> None:
    lab.start("a11ce5", "api")
    document = {"id": "slow1", "name": "slow", "directory": "/", "port": 1, "url": slow_mcp.url}
    (lab.instances_dir / "slow1.json").write_text(json.dumps(document))
    owner = await RawHub.start(lab)
    heard = Heard()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_kill, owner)
        await owner.initialize()
        await eventually(owner.all_active)
        assert owner_pid(lab) == owner.process.pid

        # The SDK client probes server/discover first: the bridge passes the owner's -32601 on.
        client = await stack.enter_async_context(Client(lab.hub(), message_handler=heard))
        assert owner_pid(lab) == owner.process.pid  # it attached
        await client.call_tool("instances_connect", {"instance_id": "api"})
        await heard.next_change()  # list_changed through the bridge's GET stream
        assert "echo" in {t.name for t in (await client.list_tools()).tools}
        steps: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            steps.append(progress)

        done = await client.call_tool("progress", {"steps": 3}, progress_callback=on_progress)
        assert done.content[0].text == "done after 3 steps" and steps == [1, 2, 3]

        raw = await RawHub.start(lab)
        stack.push_async_callback(_kill, raw)
        raw.send_raw(b"{garbage\n")
        assert code(await raw.answer(None)) == -32700
        assert code(await raw.request(1, "server/discover", {})) == -32601
        # a notification before any session gets no answer, not even the owner's 400
        raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 0}})
        initialized = await raw.initialize("2024-11-05")
        assert initialized["result"]["protocolVersion"] == "2024-11-05"
        raw.send({"jsonrpc": "2.0", "id": 2})
        assert code(await raw.answer(2)) == -32600
        assert code(await raw.request(3, "some/unknown")) == -32601
        assert code(await raw.request(4, "tools/call", {"arguments": {}})) == -32602
        connect = {"name": "instances_connect", "arguments": {"instance_id": "slow"}}
        assert not (await raw.request(5, "tools/call", connect))["result"]["isError"]
        raw.send({"jsonrpc": "2.0", "id": "s", "method": "tools/call", "params": {"name": "sleep"}})
        await asyncio.wait_for(slow_mcp.sleeping.wait(), 5)
        raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "s"}})
        await asyncio.wait_for(slow_mcp.cancelled.wait(), 5)
        assert slow_mcp.cancelled_ids() == slow_mcp.sleep_ids()
        assert (await raw.request(6, "ping"))["result"] == {}
        status = (await raw.request(7, "tools/call", {"name": "hub_status", "arguments": {}}))["result"]
        assert status["structuredContent"]["clients"] == 3 and status["structuredContent"]["sessions"] == 2
        exit_code, stderr = await raw.close()
        assert exit_code == 0 and "Traceback" not in stderr, stderr
        answered = [m.get("id") for m in raw.messages if "method" not in m]
        assert answered == [None, 1, "init", 2, 3, 4, 5, 6, 7]  # nothing for "s"
        notified = {m["method"] for m in raw.messages if "method" in m}
        assert "notifications/tools/list_changed" in notified

        # the attached client's end was recorded by the owner, with its own session id
        ended = await eventually(lambda: session_events(lab, "slow")[1:])
        assert ended[0][0] == "session_disconnected"
        assert session_events(lab, "slow")[0][1] == ended[0][1]
        slow_events = json.loads(lab.cli("history", "slow", "--json").stdout)
        reasons = [e["data"]["reason"] for e in slow_events if e["type"] == "session_disconnected"]
        assert reasons == ["client ended the session"]
        assert owner.process.returncode is None and owner_pid(lab) == owner.process.pid

    verified = lab.cli("replay", "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    kinds = [kind for kind, _ in session_events(lab, "api")]
    assert kinds == ["session_connected", "session_disconnected"]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_an_idle_attached_process_takes_over_at_once(lab: Lab, how: signal.Signals) -> None:
    lab.start("b0b0b0", "api")
    owner = await RawHub.start(lab)
    heard = Heard()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_kill, owner)
        await owner.initialize()
        await eventually(owner.all_active)
        bound = await stack.enter_async_context(Client(lab.hub(), message_handler=heard))
        await bound.call_tool("instances_connect", {"instance_id": "api"})
        await heard.next_change()
        idle = await RawHub.start(lab)
        stack.push_async_callback(_kill, idle)
        await idle.initialize()
        assert owner_pid(lab) == owner.process.pid

        os.kill(owner.process.pid, how)
        # Nobody calls: one of the two attached processes notices and takes over by itself...
        await eventually(lambda: owner_pid(lab) not in (None, owner.process.pid), 10)
        # ...and the bound client is bound again (its tools come back with list_changed).
        await heard.next_change()
        assert "echo" in {t.name for t in (await bound.list_tools()).tools}
        assert (await bound.call_tool("add", {"a": 2, "b": 3})).structured_content == {"result": 5}
        assert await states(bound) == {"api": "active"}
        listed = await idle.request("l", "tools/call", {"name": "instances_list", "arguments": {}})
        assert [i["state"] for i in listed["result"]["structuredContent"]["instances"]] == ["active"]
        assert await asyncio.wait_for(owner.process.wait(), 10) == (-how if how == signal.SIGKILL else 0)
        exit_code, stderr = await idle.close()  # if it owns the hub now, the other takes over
        assert exit_code == 0 and "Traceback" not in stderr, stderr

    verified = lab.cli("replay", "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    hub = [e["type"] for e in json.loads(lab.cli("history", "hub", "--json").stdout)]
    first_run = ["hub_started"] if how == signal.SIGKILL else ["hub_started", "hub_stopped"]
    later_runs = hub[len(first_run) :]
    assert hub[: len(first_run)] == first_run
    assert later_runs in (["hub_started", "hub_stopped"], ["hub_started", "hub_stopped"] * 2)
    sessions = session_events(lab, "api")
    connected = [sid for kind, sid in sessions if kind == "session_connected"]
    assert len(connected) in (2, 3) and len(set(connected)) == len(connected)  # bound on each owner


async def test_a_stale_owner_file_does_not_hold_up_the_next_hub(lab: Lab) -> None:
    owner = await RawHub.start(lab)
    await owner.initialize()
    await eventually(lambda: owner_pid(lab) == owner.process.pid)
    owner.process.kill()  # leaves <db>.owner.json behind, naming a dead endpoint
    await owner.process.wait()
    assert owner_pid(lab) == owner.process.pid
    successor = await RawHub.start(lab)
    try:
        answer = await successor.initialize()
        assert answer["result"]["serverInfo"]["name"] == "fsm-hub"
        # The private endpoint is advertised just after the first answers (imported in a thread).
        await eventually(lambda: owner_pid(lab) == successor.process.pid)
        exit_code, stderr = await successor.close()
    finally:
        await _kill(successor)
    assert exit_code == 0 and "Traceback" not in stderr
    assert lab.cli("replay", "--verify").returncode == 0


async def _kill(hub: RawHub) -> None:
    if hub.process.returncode is None:
        hub.process.kill()
        await hub.process.wait()
