"""The issues' "done when" scenarios, end to end: real `fsm-hub serve --mcp` processes driven by
the official MCP SDK clients, real SDK instances in subprocesses, the real event log, the real CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mcp_types
import pytest
from mcp import Client, ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.servers.launch import spawn_sdk_server, stop

FSM_HUB = str(Path(sys.executable).with_name("fsm-hub"))
FAST = [
    "--ping-interval", "0.2", "--ping-timeout", "0.3", "--ping-misses", "2",
    "--backoff-base", "0.05", "--backoff-cap", "0.1", "--retry-attempts", "3",
    "--connect-timeout", "1",
]  # fmt: skip


@dataclass
class Instance:
    id: str
    name: str
    process: subprocess.Popen[bytes]
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])


@dataclass
class Lab:
    """An instances directory with real SDK servers announced in it, and a log path."""

    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    @property
    def db(self) -> Path:
        return self.root / "events.db"

    def start(self, instance_id: str, name: str) -> Instance:
        process, url = spawn_sdk_server(self.root / f"{instance_id}-{len(self.processes)}.log")
        self.processes.append(process)
        instance = Instance(instance_id, name, process, url)
        self.announce(instance)
        return instance

    def announce(self, instance: Instance) -> None:
        payload = {
            "id": instance.id,
            "name": instance.name,
            "directory": str(self.root),
            "port": instance.port,
            "started_at": "2026-11-25T03:14:15.926535897Z",
            "last_ping": "2026-11-25T03:14:15.926535897Z",
            "process_info": {"pid": instance.process.pid, "executable": sys.executable},
        }
        temporary = self.instances_dir / f".tmp-{instance.id}"
        temporary.write_text(json.dumps(payload))
        temporary.replace(self.instances_dir / f"{instance.id}.json")

    def hub(self, *extra: str) -> StdioServerParameters:
        args = ["serve", "--mcp", "--db", str(self.db), "--instances-dir", str(self.instances_dir)]
        return StdioServerParameters(command=FSM_HUB, args=[*args, *FAST, *extra])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FSM_HUB, *args, "--db", str(self.db)], capture_output=True, text=True, timeout=30
        )


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    lab.instances_dir.mkdir(mode=0o700)
    yield lab
    for process in lab.processes:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
    stop(lab.processes)


class Notifications:
    def __init__(self) -> None:
        self.methods: list[str] = []
        self.changed = asyncio.Event()

    async def __call__(self, message: Any) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            self.methods.append("notifications/tools/list_changed")
            self.changed.set()


async def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; bounded, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return outcome
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s")
        await asyncio.sleep(0.05)


async def states(client: Any) -> dict[str, str]:
    result = await client.call_tool("instances_list", {})
    return {i["name"]: i["state"] for i in result.structured_content["instances"]}


def transitions(lab: Lab, ref: str) -> list[tuple[str, str, str, str]]:
    done = lab.cli("history", ref, "--json")
    assert done.returncode == 0, done.stderr
    return [
        (e["data"]["event"], e["data"]["from"], e["data"]["to"], e["data"]["reason"])
        for e in json.loads(done.stdout)
        if e["type"] == "transition"
    ]


@pytest.fixture
async def hub_client(lab: Lab) -> AsyncIterator[tuple[Client, Notifications]]:
    """The SDK's high-level client (it opens with `server/discover`, falls back to initialize)."""
    notes = Notifications()
    async with Client(lab.hub(), message_handler=notes) as client:
        yield client, notes


async def test_hub_routes_a_session_and_records_why_instances_die_and_return(lab: Lab) -> None:
    api = lab.start("7f3a9c01", "api")
    web = lab.start("c01dbeef", "web")
    notes = Notifications()
    # Slow pings: a killed instance can only be noticed through its process being gone.
    slow = ("--ping-interval", "30", "--ping-misses", "5")
    async with Client(lab.hub(*slow), message_handler=notes) as client:
        await eventually(lambda: _all_active(client, {"api", "web"}))
        listed = json.loads(lab.cli("instances", "--json").stdout)
        assert {i["name"]: i["state"] for i in listed} == {"api": "active", "web": "active"}
        assert set(listed[0]) == {
            "id", "name", "directory", "port", "url", "pid", "state", "since",
            "retry_count", "last_error", "sessions",
        }  # fmt: skip

        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == {
            "instances_list", "instances_connect", "instances_disconnect",
            "instances_history", "instances_call", "hub_status",
        }  # fmt: skip
        connected = await client.call_tool("instances_connect", {"instance_id": "api"})
        assert connected.structured_content["instance"]["id"] == api.id
        await asyncio.wait_for(notes.changed.wait(), 5)
        assert {"echo", "add"} <= {t.name for t in (await client.list_tools()).tools}
        echoed = await client.call_tool("echo", {"text": "through the hub"})
        assert not echoed.is_error and echoed.content[0].text == "through the hub"
        other = await client.call_tool(
            "instances_call", {"instance_id": "web", "tool": "add", "arguments": {"a": 2, "b": 40}}
        )
        assert other.structured_content == {"result": 42}

        # The process is gone: a routed call fails fast, the instance ends dead through remove.
        api.process.kill()
        api.process.wait()
        started = time.perf_counter()
        failed = await client.call_tool("echo", {"text": "anyone?"})
        assert failed.is_error
        assert time.perf_counter() - started < 0.1
        await eventually(lambda: _state_is(client, "api", "dead"))
        started = time.perf_counter()
        failed = await client.call_tool("echo", {"text": "anyone?"})
        assert time.perf_counter() - started < 0.1
        assert failed.is_error and "dead" in failed.content[0].text
        assert f"process {api.process.pid} is gone" in failed.content[0].text
        assert {t.name for t in (await client.list_tools()).tools} == tools

        # It restarts on a new port: rediscover brings it back to the bound session, tools and all.
        notes.changed.clear()
        restarted = lab.start(api.id, "api")
        assert restarted.port != api.port
        await eventually(lambda: _state_is(client, "api", "active"))
        await asyncio.wait_for(notes.changed.wait(), 5)
        assert "echo" in {t.name for t in (await client.list_tools()).tools}
        echoed = await client.call_tool("echo", {"text": "back"})
        assert echoed.content[0].text == "back"

    assert transitions(lab, "api") == [
        ("connect", "discovered", "connecting", "discovered"),
        ("connected", "connecting", "active", "handshake ok (MCP 2025-11-25, 6 tools)"),
        ("remove", "active", "dead", f"process {api.process.pid} is gone"),
        ("rediscover", "dead", "discovered",
         f"re-announced: port {api.port} → {restarted.port}, pid {api.process.pid} → "
         f"{restarted.process.pid}, url {api.url} → {restarted.url}"),
        ("connect", "discovered", "connecting", "discovered"),
        ("connected", "connecting", "active", "handshake ok (MCP 2025-11-25, 6 tools)"),
    ]  # fmt: skip

    # A new hub on the same log: live instances come back through discovered ("hub restart").
    # Fast pings: one that stops answering while its process lives goes retrying → … → dead.
    async with Client(lab.hub()) as client:
        await eventually(lambda: _all_active(client, {"api", "web"}))
        os.kill(web.process.pid, signal.SIGSTOP)
        await eventually(lambda: _state_is(client, "web", "dead"))
        os.kill(web.process.pid, signal.SIGCONT)

    assert [t[:3] for t in transitions(lab, "web")] == [
        ("connect", "discovered", "connecting"),
        ("connected", "connecting", "active"),
        ("rediscover", "active", "discovered"),
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
    web_history = transitions(lab, "web")
    assert web_history[2][3] == "hub restart"
    assert web_history[5][3] == "2 pings missed"
    assert web_history[-1][3] == "handshake failed"

    hub_events = json.loads(lab.cli("history", "hub", "--json").stdout)
    assert [e["type"] for e in hub_events] == ["hub_started", "hub_stopped"] * 2
    verified = lab.cli("replay", "--verify")
    assert verified.returncode == 0, verified.stderr
    api_events = json.loads(lab.cli("history", "api", "--json").stdout)
    sessions = [e["type"] for e in api_events if e["type"].startswith("session_")]
    assert sessions == ["session_connected", "session_disconnected"]


async def test_legacy_client_session_negotiates_and_reads_history(lab: Lab) -> None:
    lab.start("aa11", "only")
    async with AsyncExitStack() as stack:
        read, write = await stack.enter_async_context(stdio_client(lab.hub()))
        session = await stack.enter_async_context(ClientSession(read, write))
        initialized = await session.initialize()
        assert initialized.protocol_version == "2025-11-25"
        assert initialized.server_info.name == "fsm-hub"
        await eventually(lambda: _state_is(session, "only", "active"))
        history = await session.call_tool("instances_history", {"instance_id": "only", "limit": 2})
        events = history.structured_content["events"]
        assert [e["data"]["event"] for e in events] == ["connect", "connected"]
        cli_events = json.loads(lab.cli("history", "only", "--json", "--limit", "2").stdout)
        assert events == cli_events
        status = (await session.call_tool("hub_status", {})).structured_content
        assert status["states"] == {"active": 1} and status["db"] == str(lab.db)
        assert status["events"] >= 3 and status["uptime_seconds"] >= 0


async def _all_active(client: Any, names: set[str]) -> bool:
    current = await states(client)
    return set(current) == names and set(current.values()) == {"active"}


async def _state_is(client: Any, name: str, state: str) -> bool:
    return (await states(client)).get(name) == state
