"""Every MCP message gets through, for every client (issue 8).

Each scenario runs with the SDK `Client` (sampling, elicitation and roots callbacks set) against
the reference server `server-everything` (streamable HTTP) directly, and through the hub: its
own `/mcp` bound with `instances_connect`, its per-instance endpoint `/instances/<name>/mcp`
(on the owning `serve --http` and relayed by an attached one), and `serve --mcp --instance <name>`
over stdio (a bridge to the owning `serve --http`). The
outcome must be the same on every path.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import mcp_types
import pytest
from mcp import Client

from tests.e2e.lab import FAST, FSM_HUB, Instance, Lab, eventually
from tests.servers.everything import spawn_everything_http
from tests.servers.launch import _wait_until_accepting

pytestmark = pytest.mark.e2e
NAME = "everything"
ROOTS = [mcp_types.Root(uri="file:///work/project", name="project")]


@dataclass
class Seen:
    """What the server sent a client outside its answers."""

    methods: list[str] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, message: Any) -> None:
        method = getattr(message, "method", None)
        if isinstance(method, str):
            self.methods.append(method)
            self.messages.append(message)
            self.changed.set()

    async def until(self, method: str, timeout: float = 10.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                for message in self.messages:
                    if message.method == method:
                        return message
                self.changed.clear()
                await self.changed.wait()


async def _sampling(
    context: Any, params: mcp_types.CreateMessageRequestParams
) -> mcp_types.CreateMessageResult:
    asked = params.messages[0].content
    text = asked.text if isinstance(asked, mcp_types.TextContent) else "?"
    return mcp_types.CreateMessageResult(
        role="assistant",
        content=mcp_types.TextContent(type="text", text=f"sampled: {text}"),
        model="test-model",
        stop_reason="endTurn",
    )


async def _elicitation(context: Any, params: Any) -> mcp_types.ElicitResult:
    return mcp_types.ElicitResult(action="accept", content={"name": "Ada", "color": "blue"})


class Roots:
    """The client's roots; `changed()` swaps in a second one (the client then says so)."""

    def __init__(self) -> None:
        self.roots = list(ROOTS)

    def changed(self) -> None:
        self.roots = [*ROOTS, mcp_types.Root(uri="file:///work/second", name="second")]

    async def __call__(self, context: Any) -> mcp_types.ListRootsResult:
        return mcp_types.ListRootsResult(roots=self.roots)


@dataclass
class Hub:
    lab: Lab
    port: int
    direct: str
    relayed_port: int
    """An attached `serve --http`, relaying to the owner."""

    @property
    def mcp(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def per_instance(self) -> str:
        return f"http://127.0.0.1:{self.port}/instances/{NAME}/mcp"

    @property
    def relayed(self) -> str:
        return f"http://127.0.0.1:{self.relayed_port}/instances/{NAME}/mcp"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serve_http(lab: Lab, port: int, log_name: str = "hub.log") -> subprocess.Popen[bytes]:
    with (lab.root / log_name).open("wb") as log:
        serving = subprocess.Popen(
            [FSM_HUB, "serve", "--http", f"127.0.0.1:{port}", "--db", str(lab.db),
             "--instances-dir", str(lab.instances_dir), *FAST],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    lab.processes.append(serving)
    _wait_until_accepting(port, serving, lab.root / log_name)
    return serving


@pytest.fixture
async def hub(lab: Lab) -> AsyncIterator[Hub]:
    process, url = spawn_everything_http(lab.root / "everything.log")
    lab.processes.append(process)
    port = _free_port()
    _serve_http(lab, port)
    lab.announce(Instance("evr001", NAME, process, url))
    relayed = _free_port()
    _serve_http(lab, relayed, "relay.log")  # attaches to the first: relays every request to it

    def active() -> bool:
        listed = json.loads(lab.cli("instances", "--json").stdout or "[]")
        return any(i["name"] == NAME and i["state"] == "active" for i in listed)

    await eventually(active)
    yield Hub(lab, port, url, relayed)


def paths(hub: Hub) -> dict[str, Callable[..., Any]]:
    """Each way of reaching server-everything: name → `connect(**callbacks)` (an async context)."""

    @asynccontextmanager
    async def direct(**options: Any) -> AsyncIterator[Client]:
        async with Client(hub.direct, **options) as client:
            yield client

    @asynccontextmanager
    async def per_instance(**options: Any) -> AsyncIterator[Client]:
        async with Client(hub.per_instance, **options) as client:
            yield client

    @asynccontextmanager
    async def relayed(**options: Any) -> AsyncIterator[Client]:
        async with Client(hub.relayed, **options) as client:
            yield client

    @asynccontextmanager
    async def bound(**options: Any) -> AsyncIterator[Client]:
        async with Client(hub.mcp, **options) as client:
            connected = await client.call_tool("instances_connect", {"instance_id": NAME})
            assert not connected.is_error, connected.content
            yield client

    @asynccontextmanager
    async def stdio(**options: Any) -> AsyncIterator[Client]:
        async with Client(hub.lab.hub("--instance", NAME), **options) as client:
            yield client

    return {
        "direct": direct,
        "per-instance": per_instance,
        "relayed per-instance": relayed,
        "bound": bound,
        "stdio": stdio,
    }


def _text(result: mcp_types.CallToolResult) -> str:
    assert not result.is_error, result.content
    return "\n".join(block.text for block in result.content if isinstance(block, mcp_types.TextContent))


async def _same_everywhere(hub: Hub, scenario: Callable[[Callable[..., Any]], Awaitable[Any]]) -> Any:
    outcomes = {}
    for name, connect in paths(hub).items():
        async with asyncio.timeout(30):
            outcomes[name] = await scenario(connect)
    assert len({json.dumps(o, sort_keys=True) for o in outcomes.values()}) == 1, outcomes
    return outcomes["direct"]


async def test_sampling_elicitation_and_roots_reach_the_client_on_every_path(hub: Hub) -> None:
    async def scenario(connect: Callable[..., Any]) -> Any:
        roots_of_client = Roots()
        async with connect(
            sampling_callback=_sampling,
            elicitation_callback=_elicitation,
            list_roots_callback=roots_of_client,
        ) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            assert {"trigger-sampling-request", "trigger-elicitation-request", "get-roots-list"} <= names
            sampled = _text(await client.call_tool("trigger-sampling-request", {"prompt": "hello"}))
            elicited = _text(await client.call_tool("trigger-elicitation-request", {}))
            roots = _text(await client.call_tool("get-roots-list", {}))
            roots_of_client.changed()
            await client.send_roots_list_changed()  # the server asks again for this client's roots

            async def second_root() -> bool:
                return "file:///work/second" in _text(await client.call_tool("get-roots-list", {}))

            await eventually(second_root, 10)
            return {"sampled": sampled, "elicited": elicited, "roots": roots}

    outcome = await _same_everywhere(hub, scenario)
    assert "sampled: " in outcome["sampled"] and "hello" in outcome["sampled"]
    assert "test-model" in outcome["sampled"] and "endTurn" in outcome["sampled"]  # passed through whole
    assert "Ada" in outcome["elicited"] and "blue" in outcome["elicited"]
    assert "file:///work/project" in outcome["roots"]


async def test_a_client_without_sampling_gets_an_error_not_a_hang(hub: Hub) -> None:
    async def scenario(connect: Callable[..., Any]) -> Any:
        async with connect() as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            offered = "trigger-sampling-request" in names
            result = await client.call_tool("trigger-sampling-request", {"prompt": "hello"})
            return {"offered": offered, "error": result.is_error}

    assert await _same_everywhere(hub, scenario) == {"offered": False, "error": True}


async def test_logs_after_set_level_and_updates_after_subscribe(hub: Hub) -> None:
    async def scenario(connect: Callable[..., Any]) -> Any:
        seen = Seen()
        async with connect(message_handler=seen) as client:
            await client.set_logging_level("debug")
            _text(await client.call_tool("toggle-simulated-logging", {}))
            logged = await seen.until("notifications/message")
            uri = "demo://resource/dynamic/text/1"
            await client.subscribe_resource(uri)
            _text(await client.call_tool("toggle-subscriber-updates", {}))
            updated = await seen.until("notifications/resources/updated")
            return {"logged": bool(logged.params.level), "updated": updated.params.uri}

    assert await _same_everywhere(hub, scenario) == {
        "logged": True,
        "updated": "demo://resource/dynamic/text/1",
    }


async def test_session_resources_stay_with_their_client_and_announce_list_changed(hub: Hub) -> None:
    data = "data:text/plain;base64,aGVsbG8gd29ybGQ="

    async def scenario(connect: Callable[..., Any]) -> Any:
        seen = Seen()
        async with connect(message_handler=seen) as first, connect() as second:
            _text(await first.call_tool("gzip-file-as-resource", {"name": "mine.gz", "data": data}))
            await seen.until("notifications/resources/list_changed")
            mine = {str(r.uri) for r in (await first.list_resources()).resources}
            theirs = {str(r.uri) for r in (await second.list_resources()).resources}
            uri = "demo://resource/session/mine.gz"
            return {"first sees it": uri in mine, "second sees it": uri in theirs}

    assert await _same_everywhere(hub, scenario) == {"first sees it": True, "second sees it": False}


HELLO = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}


class RawSession:
    """Plain JSON-RPC over streamable HTTP, for what the SDK client has no call for (tasks)."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http, self.url, self.next_id = http, url, 0
        self.headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}

    async def send(self, method: str, params: dict[str, Any] | None = None, notify: bool = False) -> Any:
        self.next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
        if not notify:
            message["id"] = self.next_id
        async with self.http.post(self.url, data=json.dumps(message), headers=self.headers) as response:
            if "Mcp-Session-Id" in response.headers:
                self.headers["Mcp-Session-Id"] = response.headers["Mcp-Session-Id"]
            body = await response.text()
        if notify:
            return None
        for text in [body, *(line[5:] for line in body.splitlines() if line.startswith("data:"))]:
            try:
                parsed = json.loads(text)
            except ValueError:
                continue
            if isinstance(parsed, dict) and parsed.get("id") == self.next_id:
                assert "error" not in parsed, parsed
                return parsed["result"]
        raise AssertionError(f"no answer to {method}: {body[:300]}")


async def test_a_task_is_created_and_fetched_on_every_http_path(hub: Hub) -> None:
    outcomes = {}
    async with aiohttp.ClientSession() as http:
        for name, url in (("direct", hub.direct), ("per-instance", hub.per_instance), ("bound", hub.mcp)):
            raw = RawSession(http, url)
            await raw.send("initialize", HELLO)
            await raw.send("notifications/initialized", notify=True)
            if name == "bound":
                connect = {"name": "instances_connect", "arguments": {"instance_id": NAME}}
                await raw.send("tools/call", connect)
            created = await raw.send(
                "tools/call",
                {"name": "simulate-research-query", "arguments": {"topic": "relays"}, "task": {"ttl": 60000}},
            )
            task = created["task"]  # a CreateTaskResult, not rewrapped as text
            fetched = await raw.send("tasks/get", {"taskId": task["taskId"]})
            outcomes[name] = {
                "created": "content" not in created,
                "fetched": fetched["taskId"] == task["taskId"],
                "status": fetched["status"] in ("working", "completed"),
            }
    assert all(o == {"created": True, "fetched": True, "status": True} for o in outcomes.values()), outcomes
