"""The issues' "done when" scenarios, end to end: real `fsm-hub serve --mcp` processes driven by
the official MCP SDK clients, real SDK instances in subprocesses, the real event log, the real CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from contextlib import AsyncExitStack

from mcp import Client, ClientSession
from mcp.client.stdio import stdio_client

from tests.e2e.lab import Lab, Notifications, all_active, eventually, state_is, transitions
from tests.servers.sdk_server import TOOLS as SDK_TOOLS


async def test_hub_routes_a_session_and_records_why_instances_die_and_return(lab: Lab) -> None:
    api = lab.start("7f3a9c01", "api")
    web = lab.start("c01dbeef", "web")
    notes = Notifications()
    # Slow pings: a killed instance can only be noticed through its process being gone.
    slow = ("--ping-interval", "30", "--ping-misses", "5")
    async with Client(lab.hub(*slow), message_handler=notes) as client:
        await eventually(lambda: all_active(client, {"api", "web"}))
        listed = json.loads(lab.cli("instances", "--json").stdout)
        assert {i["name"]: i["state"] for i in listed} == {"api": "active", "web": "active"}
        assert set(listed[0]) == {
            "id", "name", "directory", "port", "url", "pid", "state", "since",
            "retry_count", "last_error", "sessions", "kind", "source",
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
        await eventually(lambda: state_is(client, "api", "dead"))
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
        await eventually(lambda: state_is(client, "api", "active"))
        await asyncio.wait_for(notes.changed.wait(), 5)
        assert "echo" in {t.name for t in (await client.list_tools()).tools}
        echoed = await client.call_tool("echo", {"text": "back"})
        assert echoed.content[0].text == "back"

    assert transitions(lab, "api") == [
        ("connect", "discovered", "connecting", "discovered"),
        ("connected", "connecting", "active", f"handshake ok (MCP 2025-11-25, {len(SDK_TOOLS)} tools)"),
        ("remove", "active", "dead", f"process {api.process.pid} is gone"),
        ("rediscover", "dead", "discovered",
         f"re-announced: port {api.port} → {restarted.port}, pid {api.process.pid} → "
         f"{restarted.process.pid}, url {api.url} → {restarted.url}"),
        ("connect", "discovered", "connecting", "discovered"),
        ("connected", "connecting", "active", f"handshake ok (MCP 2025-11-25, {len(SDK_TOOLS)} tools)"),
    ]  # fmt: skip

    # A new hub on the same log: live instances come back through discovered ("hub restart").
    # Fast pings: one that stops answering while its process lives goes retrying → … → dead.
    async with Client(lab.hub()) as client:
        await eventually(lambda: all_active(client, {"api", "web"}))
        os.kill(web.process.pid, signal.SIGSTOP)
        await eventually(lambda: state_is(client, "web", "dead"))
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
        await eventually(lambda: state_is(session, "only", "active"))
        history = await session.call_tool("instances_history", {"instance_id": "only", "limit": 2})
        events = history.structured_content["events"]
        assert [e["data"]["event"] for e in events] == ["connect", "connected"]
        cli_events = json.loads(lab.cli("history", "only", "--json", "--limit", "2").stdout)
        assert events == cli_events
        status = (await session.call_tool("hub_status", {})).structured_content
        assert status["states"] == {"active": 1} and status["db"] == str(lab.db)
        assert status["events"] >= 3 and status["uptime_seconds"] >= 0
