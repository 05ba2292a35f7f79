"""`fsm-hub serve --http`: many clients, one hub, each its own session; DNS-rebinding guards."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator

import aiohttp
import pytest
from mcp import Client

from tests.e2e.lab import FSM_HUB, Lab, eventually, states
from tests.servers.faults import free_port

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture
def http_hub(lab: Lab) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [FSM_HUB, "serve", "--http", f"127.0.0.1:{port}", "--db", str(lab.db),
         "--instances-dir", str(lab.instances_dir), "--ping-interval", "0.2"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        _wait_for_port(port, process)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert process.stderr is not None
        assert "Traceback" not in process.stderr.read().decode()


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    import socket
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert process.poll() is None, "fsm-hub serve exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("fsm-hub serve --http did not listen")


async def test_two_clients_two_sessions_each_bound_to_its_own_instance(lab: Lab, http_hub: str) -> None:
    lab.start("aaa111", "alpha")
    lab.start("bbb222", "beta")
    async with Client(http_hub) as first, Client(http_hub) as second:
        await eventually(lambda: _both_active(first))
        await first.call_tool("instances_connect", {"instance_id": "alpha"})
        await second.call_tool("instances_connect", {"instance_id": "beta"})
        one = await first.call_tool("echo", {"text": "from alpha"})
        two = await second.call_tool("add", {"a": 20, "b": 22})
        assert one.content[0].text == "from alpha" and two.structured_content == {"result": 42}
        listed = (await first.call_tool("instances_list", {})).structured_content["instances"]
        sessions = {i["name"]: i["sessions"] for i in listed}
        assert len(sessions["alpha"]) == 1 and len(sessions["beta"]) == 1
        assert sessions["alpha"] != sessions["beta"]
        status = (await second.call_tool("hub_status", {})).structured_content
        assert status["clients"] >= 2 and status["sessions"] == 2
    # each client DELETEd its session on exit; the hub recorded both ends
    await eventually(lambda: _ended(lab, "alpha") and _ended(lab, "beta"))


async def test_foreign_origin_and_host_are_refused(http_hub: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(http_hub, json=INIT, headers={**ACCEPT, "Origin": "https://evil.example"}) as r:
            assert r.status == 403
        async with http.post(http_hub, json=INIT, headers={**ACCEPT, "Host": "evil.example:80"}) as r:
            assert r.status == 421
        async with http.post(http_hub, json=INIT, headers={**ACCEPT, "Origin": "http://localhost:3000"}) as r:
            assert r.status == 200  # a loopback origin is fine


async def test_session_lifecycle_over_raw_http(lab: Lab, http_hub: str) -> None:
    lab.start("ccc333", "gamma")
    async with aiohttp.ClientSession() as http:
        ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
        async with http.post(http_hub, json=ping, headers=ACCEPT) as r:
            assert r.status == 400
            assert (await r.json())["id"] == 2
        probe = {"jsonrpc": "2.0", "id": 3, "method": "server/discover", "params": {}}
        async with http.post(http_hub, json=probe, headers=ACCEPT) as r:
            assert (await r.json())["error"]["code"] == -32601
        async with http.post(http_hub, data=b"{nope", headers=ACCEPT) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == -32700
        async with http.post(http_hub, json=ping, headers={**ACCEPT, "Mcp-Session-Id": "unknown"}) as r:
            assert r.status == 404
        async with http.post(http_hub, json=INIT, headers=ACCEPT) as r:
            assert r.status == 200
            session = r.headers["Mcp-Session-Id"]
            assert (await r.json())["result"]["protocolVersion"] == "2025-06-18"
        headers = {**ACCEPT, "Mcp-Session-Id": session}
        async with http.post(http_hub, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                             headers=headers) as r:  # fmt: skip
            assert r.status == 202

        async def gamma_active() -> bool:
            call = {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                    "params": {"name": "instances_list", "arguments": {}}}  # fmt: skip
            async with http.post(http_hub, json=call, headers=headers) as r:
                found = (await r.json())["result"]["structuredContent"]["instances"]
            return [i["state"] for i in found] == ["active"]

        await eventually(gamma_active)
        arguments = {"instance_id": "gamma"}
        connect = {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                   "params": {"name": "instances_connect", "arguments": arguments}}  # fmt: skip
        async with http.post(http_hub, json=connect, headers=headers) as r:
            assert not (await r.json())["result"]["isError"]
        async with http.delete(http_hub, headers=headers) as r:
            assert r.status == 200
        async with http.post(http_hub, json=ping, headers=headers) as r:
            assert r.status == 404  # the session is gone
    events = json.loads(lab.cli("history", "gamma", "--json").stdout)
    ends = [e["data"] for e in events if e["type"] == "session_disconnected"]
    assert ends == [{"session_id": session, "reason": "client ended the session"}]


async def _both_active(client: Client) -> bool:
    return await states(client) == {"alpha": "active", "beta": "active"}


def _ended(lab: Lab, name: str) -> bool:
    events = json.loads(lab.cli("history", name, "--json").stdout)
    kinds = [e["type"] for e in events if e["type"].startswith("session_")]
    return kinds == ["session_connected", "session_disconnected"]
