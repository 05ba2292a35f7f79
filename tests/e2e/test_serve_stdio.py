"""`fsm-hub serve --mcp` over stdio, driven by both official SDK clients and by raw bytes.

The whole life of a routed session: list, connect (list_changed), proxied calls with progress,
resources and prompts, the instance killed (a fast isError, retrying then dead in
`instances_list`), the history on the CLI; then the clean stop and what stdout carried.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import mcp_types
import pytest
from mcp import Client, ClientSession
from mcp.client.stdio import stdio_client

from tests.e2e.lab import Instance, Lab, eventually, transitions
from tests.e2e.test_stdio_protocol import RawHub
from tests.servers.sdk_server import TOOLS
from tests.servers.slow import SlowMcp

pytestmark = pytest.mark.e2e
HUB_TOOLS = {
    "instances_list", "instances_connect", "instances_disconnect",
    "instances_history", "instances_call", "hub_status",
}  # fmt: skip
# Backoff long enough that `retrying` is seen between connect attempts, short enough to end fast;
# pings that a loaded machine cannot miss (a killed instance refuses them at once).
SLOW_BACKOFF = ("--backoff-base", "0.5", "--backoff-cap", "0.5", "--ping-timeout", "2")


def announce_without_pid(lab: Lab, instance: Instance) -> None:
    """With no pid to watch, only failed pings tell the hub the instance is gone (→ retrying)."""
    document = {"id": instance.id, "name": instance.name, "directory": str(lab.root), "port": instance.port}
    (lab.instances_dir / f"{instance.id}.json").write_text(json.dumps(document))


class Heard:
    """The notifications the SDK client passed to its message handler."""

    def __init__(self) -> None:
        self.tools_changed = 0
        self.changed = asyncio.Event()

    async def __call__(self, message: Any) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            self.tools_changed += 1
            self.changed.set()

    async def next_change(self) -> None:
        await asyncio.wait_for(self.changed.wait(), 5)
        self.changed.clear()


@asynccontextmanager
async def sdk_client(
    kind: Literal["client", "session"], lab: Lab, heard: Heard, errlog: Path
) -> AsyncIterator[Any]:
    """The high-level Client (it probes server/discover first) or the classic ClientSession."""
    params = lab.hub(*SLOW_BACKOFF)
    if kind == "client":
        async with Client(params, message_handler=heard) as client:
            yield client
        return
    with errlog.open("w") as stderr:
        async with (
            stdio_client(params, errlog=stderr) as (read, write),
            ClientSession(read, write, message_handler=heard) as session,
        ):
            initialized = await session.initialize()
            assert initialized.protocol_version == "2025-11-25"
            assert initialized.server_info.name == "fsm-hub"
            yield session


async def state_of(client: Any, name: str) -> str:
    result = await client.call_tool("instances_list", {})
    return str({i["name"]: i["state"] for i in result.structured_content["instances"]}[name])


@pytest.mark.parametrize("kind", ["client", "session"])
async def test_a_session_routed_to_an_instance_that_dies(
    lab: Lab, kind: Literal["client", "session"]
) -> None:
    api = lab.start("5eed01", "api")
    announce_without_pid(lab, api)
    heard = Heard()
    errlog = lab.root / "hub-stderr.log"
    seen: list[str] = []
    async with sdk_client(kind, lab, heard, errlog) as client:
        assert {t.name for t in (await client.list_tools()).tools} == HUB_TOOLS
        await eventually(lambda: _is(client, "api", "active"))
        listed = (await client.call_tool("instances_list", {})).structured_content["instances"]
        assert [(i["id"], i["port"], i["sessions"]) for i in listed] == [(api.id, api.port, [])]

        connected = await client.call_tool("instances_connect", {"instance_id": "api"})
        assert not connected.is_error
        await heard.next_change()
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == HUB_TOOLS | TOOLS
        assert (await client.call_tool("add", {"a": 40, "b": 2})).structured_content == {"result": 42}
        steps: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            steps.append(progress)

        done = await client.call_tool("progress", {"steps": 3}, progress_callback=on_progress)
        assert done.content[0].text == "done after 3 steps" and steps == [1, 2, 3]
        failed = await client.call_tool("fail", {"message": "boom"})
        assert failed.is_error and failed.content[0].text == "Error executing tool fail"  # its own isError
        resource = await client.read_resource("memo://greeting")
        assert resource.contents[0].text == "hello from the sdk server"
        prompt = await client.get_prompt("review", {"code": "x = 1"})
        assert "Please review: x = 1" in prompt.messages[0].content.text
        assert [r.uri for r in (await client.list_resources()).resources] == ["memo://greeting"]
        assert [p.name for p in (await client.list_prompts()).prompts] == ["review"]
        # the instance changes its tool list: the hub refetches it and tells the client
        assert not (await client.call_tool("add_tool", {"name": "late_tool"})).is_error
        await heard.next_change()
        await eventually(lambda: _lists(client, "late_tool"))

        changes = heard.tools_changed
        api.process.kill()
        api.process.wait()
        # while it retries its tools stay listed (grace); once dead they are withdrawn
        await eventually(lambda: _seen(client, seen, "retrying"), 10)
        started = time.perf_counter()
        unavailable = await client.call_tool("echo", {"text": "anyone?"})
        elapsed = time.perf_counter() - started
        assert unavailable.is_error, unavailable
        assert elapsed < 0.1, f"a call to a non-active instance took {elapsed * 1000:.1f} ms"
        text = unavailable.content[0].text
        assert text.startswith(f"instance {api.id} is ") and "last error:" in text
        await eventually(lambda: _seen(client, seen, "dead"), 10)
        await eventually(lambda: heard.tools_changed > changes)
        await eventually(lambda: _lists(client, *HUB_TOOLS, only=True))
        dead = await client.call_tool("echo", {"text": "anyone?"})
        expected = f"instance {api.id} is dead (3 connect attempts failed); last error: "
        assert dead.is_error and expected in dead.content[0].text
        listed = (await client.call_tool("instances_list", {})).structured_content["instances"]
        assert listed[0]["state"] == "dead" and listed[0]["last_error"] and listed[0]["retry_count"] == 3
        assert len(listed[0]["sessions"]) == 1  # still bound

    assert "retrying" in seen and seen[-1] == "dead"
    assert [t[:3] for t in transitions(lab, "api")] == [
        ("connect", "discovered", "connecting"),
        ("connected", "connecting", "active"),
        ("lost", "active", "retrying"),
        ("connect", "retrying", "connecting"),
        ("connect_failed", "connecting", "retrying"),
        ("connect", "retrying", "connecting"),
        ("connect_failed", "connecting", "retrying"),
        ("connect", "retrying", "connecting"),
        ("connect_failed", "connecting", "dead"),
    ]
    history = lab.cli("history", "api")
    assert history.returncode == 0 and "active → retrying" in history.stdout
    assert "2 pings missed" in history.stdout and "connecting → dead" in history.stdout
    events = json.loads(lab.cli("history", "api", "--json").stdout)
    sessions = [(e["type"], e["data"]["session_id"]) for e in events if e["type"].startswith("session_")]
    assert [kind for kind, _ in sessions] == ["session_connected", "session_disconnected"]
    assert sessions[0][1] == sessions[1][1] == listed[0]["sessions"][0]
    hub = [e["type"] for e in json.loads(lab.cli("history", "hub", "--json").stdout)]
    assert hub == ["hub_started", "hub_stopped"]
    verified = lab.cli("replay", "--verify")
    assert verified.returncode == 0, verified.stderr
    if kind == "session":
        assert "Traceback" not in errlog.read_text()


async def test_cancelled_call_reaches_the_instance_and_stdout_is_protocol_only(
    lab: Lab, slow_mcp: SlowMcp
) -> None:
    (lab.instances_dir / "slow1.json").write_text(
        json.dumps({"id": "slow1", "name": "slow", "directory": "/", "port": 1, "url": slow_mcp.url})
    )
    raw = await RawHub.start(lab)
    try:
        await raw.initialize()
        await eventually(raw.all_active)
        connect = {"name": "instances_connect", "arguments": {"instance_id": "slow"}}
        assert not (await raw.request("c", "tools/call", connect))["result"]["isError"]
        raw.send({"jsonrpc": "2.0", "id": "s", "method": "tools/call", "params": {"name": "sleep"}})
        await asyncio.wait_for(slow_mcp.sleeping.wait(), 5)
        raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "s"}})
        await asyncio.wait_for(slow_mcp.cancelled.wait(), 5)
        assert slow_mcp.cancelled_ids() == slow_mcp.sleep_ids()  # the instance's own request id
        assert (await raw.request("after", "ping"))["result"] == {}
        assert not [m for m in raw.messages if m.get("id") == "s"]  # never answered
        sessions_before = set(slow_mcp.live_sessions)
        assert sessions_before

        code, stderr = await raw.close()  # stdin EOF
    finally:
        if raw.process.returncode is None:
            raw.process.kill()
    assert code == 0 and "Traceback" not in stderr
    assert all(line.endswith(b"\n") and json.loads(line) for line in raw.stdout_lines)
    assert not slow_mcp.live_sessions  # its instance session was DELETEd
    hub = [e["type"] for e in json.loads(lab.cli("history", "hub", "--json").stdout)]
    assert hub[-1] == "hub_stopped"
    slow_events = json.loads(lab.cli("history", "slow", "--json").stdout)
    ends = [e["data"]["reason"] for e in slow_events if e["type"] == "session_disconnected"]
    assert ends == ["client closed stdin"]
    assert lab.cli("replay", "--verify").returncode == 0


@pytest.mark.parametrize("how", ["eof", signal.SIGTERM, signal.SIGINT])
async def test_every_way_of_stopping_is_clean(lab: Lab, how: Any, fake_mcp: Any) -> None:
    fake = await fake_mcp()
    document = {"id": "fake1", "name": "fake", "directory": "/", "port": 1, "url": fake.url}
    (lab.instances_dir / "fake1.json").write_text(json.dumps(document))
    raw = await RawHub.start(lab)
    try:
        await raw.initialize()
        await eventually(raw.all_active)
        connect = {"name": "instances_connect", "arguments": {"instance_id": "fake"}}
        await raw.request("c", "tools/call", connect)
        pending = {"jsonrpc": "2.0", "id": "p", "method": "ping"}
        raw.send(pending)  # possibly still in flight when the stop comes: fine either way
        assert fake.live_sessions
        if how == "eof":
            code, stderr = await raw.close()
        else:
            raw.process.send_signal(how)
            code = await asyncio.wait_for(raw.process.wait(), 15)
            assert raw.process.stderr is not None
            stderr = (await raw.process.stderr.read()).decode()
    finally:
        if raw.process.returncode is None:
            raw.process.kill()
    assert code == 0 and "Traceback" not in stderr, stderr
    assert all(json.loads(line) for line in raw.stdout_lines)
    assert not fake.live_sessions  # the hub DELETEd its session with the instance
    hub = [e["type"] for e in json.loads(lab.cli("history", "hub", "--json").stdout)]
    assert hub == ["hub_started", "hub_stopped"]
    events = json.loads(lab.cli("history", "fake", "--json").stdout)
    assert events[-1]["type"] == "session_disconnected"
    reason = "client closed stdin" if how == "eof" else "signal"
    assert events[-1]["data"]["reason"] == reason
    assert lab.cli("replay", "--verify").returncode == 0


async def _lists(client: Any, *names: str, only: bool = False) -> bool:
    listed = {t.name for t in (await client.list_tools()).tools}
    return listed == set(names) if only else set(names) <= listed


async def _is(client: Any, name: str, state: str) -> bool:
    return await state_of(client, name) == state


async def _seen(client: Any, seen: list[str], state: str) -> bool:
    now = await state_of(client, "api")
    if not seen or seen[-1] != now:
        seen.append(now)
    return now == state
