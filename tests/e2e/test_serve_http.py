"""`serve --http` as a real process: beside a `serve --mcp` owner (relaying to it, then taking
over when it exits), and its sessions' idle expiry and cap over real sockets."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from fsm_hub.mcp.upstream import McpClient
from tests.e2e.lab import FAST, FSM_HUB, Lab, eventually
from tests.e2e.test_stdio_protocol import RawHub
from tests.transports.test_http import ACCEPT, INIT

pytestmark = pytest.mark.e2e

HEADERS = ACCEPT


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def serve_http(lab: Lab, port: int, *extra: str) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        FSM_HUB, "serve", "--http", f"127.0.0.1:{port}", "--db", str(lab.db),
        "--instances-dir", str(lab.instances_dir), *FAST, *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


class Client:
    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url = http, url
        self.headers = dict(HEADERS)

    async def post(self, message: Any) -> tuple[int, Any]:
        async with self.http.post(self.url, data=json.dumps(message), headers=self.headers) as response:
            body = await response.read()
            if SESSION := response.headers.get("Mcp-Session-Id"):
                self.headers["Mcp-Session-Id"] = SESSION
            return response.status, json.loads(body) if body else None

    async def initialize(self) -> int:
        self.headers.pop("Mcp-Session-Id", None)
        status, _ = await self.post(INIT)
        return status

    async def up(self) -> bool:
        try:
            return await self.initialize() == 200
        except aiohttp.ClientError:
            return False


def call(request_id: Any, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


async def test_serve_http_beside_a_stdio_owner_relays_then_takes_over(lab: Lab) -> None:
    instance = lab.start("a11ce5", "api")
    owner = await RawHub.start(lab)
    try:
        await owner.initialize()
        await eventually(owner.all_active)
        port = free_port()
        async with serve_http(lab, port) as front, aiohttp.ClientSession() as http:
            client = Client(http, f"http://127.0.0.1:{port}/mcp")
            await eventually(client.up)
            status, connected = await client.post(call(1, "instances_connect", {"instance_id": "api"}))
            assert status == 200 and not connected["result"]["isError"]
            status, echoed = await client.post(call(2, "echo", {"text": "through the relay"}))
            async with McpClient(instance.url) as direct:
                directly = await direct.call_tool("echo", {"text": "through the relay"})
            assert echoed["result"]["content"] == directly["content"]
            # the session lives on the owner: its hub counts the relayed client
            status_call = call("s", "hub_status", {})
            assert (await owner.request("s", "tools/call", status_call["params"]))["result"][
                "structuredContent"
            ]["clients"] == 2

            owner.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(owner.process.wait(), 15) == 0

            async def old_session_gone() -> bool:
                status, _ = await client.post({"jsonrpc": "2.0", "id": 3, "method": "ping"})
                return status == 404

            await eventually(old_session_gone, timeout=20)
            assert await client.initialize() == 200  # the relay's own process owns the log now
            status, again = await client.post(call(4, "instances_connect", {"instance_id": "api"}))
            assert status == 200 and not again["result"]["isError"]
            assert front.returncode is None
    finally:
        if owner.process.returncode is None:
            owner.process.kill()
            await owner.process.wait()


async def test_idle_http_sessions_expire_and_the_cap_gives_503(lab: Lab) -> None:
    port = free_port()
    args = ("--session-idle", "0.5", "--max-sessions", "2")
    async with serve_http(lab, port, *args), aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{port}/mcp"
        first, second, third = Client(http, url), Client(http, url), Client(http, url)
        await eventually(first.up)
        assert await second.initialize() == 200
        status, refused = await third.post(INIT)
        assert status == 503 and "--max-sessions" in refused["error"]["message"]

        # Polling the idle sessions would keep them alive: poll with new initializes instead,
        # which the cap refuses until the idle ones are gone.
        await eventually(lambda: _initialized(third), timeout=10)
        # the one idle longest went first
        status, gone = await first.post({"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert status == 404 and gone["error"]["message"] == "Session not found"


async def _initialized(client: Client) -> bool:
    return await client.initialize() == 200


def test_serve_without_mcp_or_http_beside_an_owner_says_so_in_one_line(lab: Lab) -> None:
    owner = subprocess.Popen(
        [FSM_HUB, "serve", "--mcp", "--db", str(lab.db), "--instances-dir", str(lab.instances_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        owner_file = lab.db.with_name(lab.db.name + ".owner.json")
        for _ in range(200):
            if owner_file.exists():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        done = subprocess.run(
            [FSM_HUB, "serve", "--db", str(lab.db), "--instances-dir", str(lab.instances_dir)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode != 0
        assert "use serve --mcp or --http to attach" in done.stderr and "Traceback" not in done.stderr
    finally:
        owner.kill()
        owner.wait()
