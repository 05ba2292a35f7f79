"""A configured stdio server's notifications reach the hub's clients, each with its own session
state: subscriptions and log level (fsm_hub/mcp/stdio_sessions.py).

Three SDK clients share one stdio process through `fsm-hub serve --http --config` (its
per-instance endpoint): the SDK's stdio server (tests/servers/sdk_stdio_server.py) and
server-everything in stdio mode. Each client's scenario is also run directly, by an SDK client
with a server process of its own: what it receives through the hub is what it receives alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mcp_types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from tests.e2e.lab import FAST, FSM_HUB, Lab, eventually
from tests.e2e.test_configured_servers import write_config
from tests.servers.everything import everything_stdio
from tests.servers.faults import free_port
from tests.servers.launch import REPO_ROOT, _wait_until_accepting

# subscribe/unsubscribe and setLevel are handshake-era requests: the SDK warns on each use.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning"),
]

SDK = StdioServerParameters(
    command=sys.executable, args=["-m", "tests.servers.sdk_stdio_server"], cwd=str(REPO_ROOT)
)
URI = "memo://greeting"


@dataclass
class Seen:
    """The notifications one client received, as JSON-RPC dicts."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, message: Any) -> None:
        if isinstance(getattr(message, "method", None), str):
            self.messages.append(message.model_dump(by_alias=True, exclude_none=True, mode="json"))
            self.arrived.set()

    async def until(self, found: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not any(found(m) for m in self.messages):
                self.arrived.clear()
                await self.arrived.wait()

    async def until_log(self, text: str) -> None:
        await self.until(lambda m: text in str(_log_data(m)))

    def updated(self) -> list[str]:
        return [m["params"]["uri"] for m in self.messages if m["method"] == "notifications/resources/updated"]

    def levels(self) -> list[str]:
        return [m["params"]["level"] for m in self.messages if m["method"] == "notifications/message"]

    def logs(self, containing: str) -> int:
        return sum(containing in str(_log_data(m)) for m in self.messages)


def _log_data(message: dict[str, Any]) -> Any:
    return message["params"].get("data") if message["method"] == "notifications/message" else None


Connect = Callable[[Seen], Any]


@asynccontextmanager
async def hub_of(lab: Lab, name: str, server: StdioServerParameters) -> AsyncIterator[Connect]:
    """`serve --http --config` with one stdio server; yields `connect(seen)` for its endpoint."""
    config = lab.root / "servers.json"
    entry: dict[str, Any] = {"command": server.command, "args": list(server.args)}
    if server.cwd:
        entry["cwd"] = str(server.cwd)
    write_config(config, {name: entry})
    port = _serve_http(lab, config)

    def active() -> bool:
        listed = json.loads(lab.cli("instances", "--json").stdout or "[]")
        return any(i["name"] == name and i["state"] == "active" for i in listed)

    await eventually(active, timeout=40)

    def connect(seen: Seen) -> Any:
        url = f"http://127.0.0.1:{port}/instances/{name}/mcp"
        return Client(url, mode="legacy", message_handler=seen)

    yield connect


def _serve_http(lab: Lab, config: Path) -> int:
    """Start `serve --http --config` on a free port; the port, once it accepts connections."""
    port = free_port()
    log = lab.root / "hub.log"
    with log.open("wb") as stderr:
        serving = subprocess.Popen(
            [FSM_HUB, "serve", "--http", f"127.0.0.1:{port}", "--db", str(lab.db),
             "--instances-dir", str(lab.instances_dir), "--config", str(config), *FAST,
             "--start-timeout", "20"],
            stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    lab.processes.append(serving)
    _wait_until_accepting(port, serving, log)
    return port


def alone(server: StdioServerParameters) -> Connect:
    """An SDK client with a server process of its own."""

    def connect(seen: Seen) -> Any:
        return Client(server, mode="legacy", message_handler=seen)

    return connect


async def text(result: Awaitable[mcp_types.CallToolResult]) -> str:
    done = await result
    assert not done.is_error, done.content
    return "\n".join(b.text for b in done.content if isinstance(b, mcp_types.TextContent))


async def state(client: Client) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(await text(client.call_tool("state", {})))
    return found


async def test_resources_updated_reaches_the_subscribed_clients_only(lab: Lab) -> None:
    async with hub_of(lab, "sdk", SDK) as connect, AsyncExitStack() as stack:
        seen = {who: Seen() for who in "ABC"}
        a, b, c = [await stack.enter_async_context(connect(seen[who])) for who in "ABC"]
        await a.subscribe_resource(URI)
        await c.subscribe_resource(URI)  # already subscribed upstream: answered by the hub
        assert (await state(b))["received"] == [["resources/subscribe", URI]]
        await text(b.call_tool("touch", {"uris": [URI]}))
        await text(b.call_tool("log", {"level": "emergency", "data": "mark-1"}))
        for who in "ABC":
            await seen[who].until_log("mark-1")
        assert (seen["A"].updated(), seen["B"].updated(), seen["C"].updated()) == ([URI], [], [URI])

        await a.unsubscribe_resource(URI)  # C still holds it: nothing goes upstream
        assert (await state(b))["subscribed"] == [URI]
        await c.unsubscribe_resource(URI)  # the last one: upstream
        upstream = await state(b)
        assert upstream["subscribed"] == []
        assert upstream["received"] == [["resources/subscribe", URI], ["resources/unsubscribe", URI]]
        await text(b.call_tool("touch", {"uris": [URI]}))
        await text(b.call_tool("log", {"level": "emergency", "data": "mark-2"}))
        for who in "ABC":
            await seen[who].until_log("mark-2")
        through = {who: seen[who].updated() for who in "ABC"}
    assert through == {"A": [URI], "B": [], "C": [URI]}

    for who, subscribes in (("A", True), ("B", False), ("C", True)):
        own = Seen()
        async with alone(SDK)(own) as client:
            if subscribes:
                await client.subscribe_resource(URI)
            await text(client.call_tool("touch", {"uris": [URI]}))
            await text(client.call_tool("log", {"level": "emergency", "data": "mark-1"}))
            if subscribes:
                await client.unsubscribe_resource(URI)
            await text(client.call_tool("touch", {"uris": [URI]}))
            await text(client.call_tool("log", {"level": "emergency", "data": "mark-2"}))
            await own.until_log("mark-2")
        assert own.updated() == through[who], who


async def test_log_levels_are_per_client(lab: Lab) -> None:
    async def emit_logs(client: Client, mark: str) -> None:
        for level in ("debug", "info", "error"):
            await text(client.call_tool("log", {"level": level, "data": level}))
        await text(client.call_tool("log", {"level": "emergency", "data": mark}))

    wanted = {"A": "debug", "B": "error", "C": None}
    async with hub_of(lab, "sdk", SDK) as connect, AsyncExitStack() as stack:
        seen = {who: Seen() for who in "ABC"}
        b, c = [await stack.enter_async_context(connect(seen[who])) for who in "BC"]
        async with connect(seen["A"]) as a:
            await b.set_logging_level("error")
            await a.set_logging_level("debug")  # more verbose: the server is set to it
            await b.set_logging_level("warning")  # still less verbose than A's: answered by the hub
            upstream = await state(c)
            assert upstream["level"] == "debug"
            assert upstream["received"] == [["logging/setLevel", "error"], ["logging/setLevel", "debug"]]
            await b.set_logging_level("error")
            await emit_logs(c, "mark-1")
            for who in "ABC":
                await seen[who].until_log("mark-1")
            through = {who: seen[who].levels() for who in "ABC"}
        assert through == {
            "A": ["debug", "info", "error", "emergency"],
            "B": ["error", "emergency"],
            "C": ["debug", "info", "error", "emergency"],  # never set a level: what arrives
        }

        # The most verbose client has left: the server is set to B's level.
        async def at_error() -> bool:
            return (await state(c))["level"] == "error"

        await eventually(at_error, timeout=20)
        with pytest.raises(Exception, match="level"):
            await b.set_logging_level("loud")  # type: ignore[arg-type]

    for who, level in wanted.items():
        own = Seen()
        async with alone(SDK)(own) as client:
            if level is not None:
                await client.set_logging_level(level)  # type: ignore[arg-type]
            await emit_logs(client, "mark-1")
            await own.until_log("mark-1")
        assert own.levels() == through[who], who


async def test_server_everything_subscriptions_and_levels_per_client(lab: Lab) -> None:
    """A subscribes (level debug); B neither subscribes nor sets a level; C subscribes at warning.

    server-everything logs each subscribe and unsubscribe it receives (at info), and sends
    resources/updated at once for what is subscribed when `toggle-subscriber-updates` starts.
    """
    uri = "demo://resource/static/document/architecture.md"
    server = everything_stdio()
    async with hub_of(lab, "everything", server) as connect, AsyncExitStack() as stack:
        seen = {who: Seen() for who in "ABC"}
        a, _, c = [await stack.enter_async_context(connect(seen[who])) for who in "ABC"]
        await a.set_logging_level("debug")
        await c.set_logging_level("warning")
        await a.subscribe_resource(uri)
        await c.subscribe_resource(uri)  # answered by the hub: no second subscribe upstream
        await text(a.call_tool("toggle-subscriber-updates", {}))
        for who in "AC":
            await seen[who].until(lambda m: m["method"] == "notifications/resources/updated")
        await a.unsubscribe_resource(uri)  # C holds it still: not sent upstream
        await c.unsubscribe_resource(uri)  # sent upstream, which logs it
        await seen["B"].until_log("Received Unsubscribe Resource request")
        await seen["A"].until_log("Received Unsubscribe Resource request")
        await text(a.call_tool("toggle-subscriber-updates", {}))  # stop the updates
        assert seen["B"].updated() == []
        assert seen["B"].logs("Received Subscribe Resource request") == 1
        assert seen["B"].logs("Received Unsubscribe Resource request") == 1
        assert [level for level in seen["C"].levels() if level in ("debug", "info", "notice")] == []
        through = {who: sorted(set(seen[who].updated())) for who in "ABC"}
        heard = {who: seen[who].logs("Received Subscribe Resource request") > 0 for who in "ABC"}
    assert through == {"A": [uri], "B": [], "C": [uri]}
    assert heard == {"A": True, "B": True, "C": False}

    # Alone: each client with a server-everything of its own.
    for who, level, subscribes in (("A", "debug", True), ("B", None, False), ("C", "warning", True)):
        own = Seen()
        async with alone(server)(own) as client:
            if level is not None:
                await client.set_logging_level(level)  # type: ignore[arg-type]
            if subscribes:
                await client.subscribe_resource(uri)
            await text(client.call_tool("toggle-subscriber-updates", {}))
            if subscribes:
                await own.until(lambda m: m["method"] == "notifications/resources/updated")
                await client.unsubscribe_resource(uri)
            await text(client.call_tool("toggle-subscriber-updates", {}))
        assert sorted(set(own.updated())) == through[who], who
        if who != "B":  # alone, B hears no one else's subscribe
            assert (own.logs("Received Subscribe Resource request") > 0) == heard[who], who


async def test_a_restarted_process_gets_each_clients_subscriptions_and_level_again(lab: Lab) -> None:
    """The process is lost and respawned: the hub sets each client's level and subscriptions up
    again in the new process by itself, so a subscribed client that asks nothing keeps getting
    updates (the other client only reads the server's state and touches the resource)."""
    async with hub_of(lab, "sdk", SDK) as connect:
        seen, watcher = Seen(), Seen()
        async with connect(seen) as client, connect(watcher) as other:
            await client.set_logging_level("error")
            await client.subscribe_resource(URI)
            first = _spawned(lab)[-1]
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: len(_spawned(lab)) == 2 and _active(lab), timeout=40)

            async def replayed() -> dict[str, Any] | None:
                try:
                    found = await state(other)
                except AssertionError:
                    return None  # the call raced the restart: ask again
                return found if found["subscribed"] == [URI] else None

            found = await eventually(replayed, timeout=20)
            assert found["level"] == "error"
            assert found["received"] == [["logging/setLevel", "error"], ["resources/subscribe", URI]]
            await text(other.call_tool("log", {"level": "info", "data": "below the level"}))
            await text(other.call_tool("log", {"level": "error", "data": "marker"}))
            await text(other.call_tool("touch", {"uris": [URI]}))
            await seen.until(lambda m: m["method"] == "notifications/resources/updated")
            await seen.until_log("marker")
            assert seen.updated() == [URI] and seen.logs("below the level") == 0
            assert watcher.updated() == []  # not subscribed: not told


def _spawned(lab: Lab) -> list[int]:
    done = lab.cli("history", "cfg-sdk", "--json")
    return [e["data"]["pid"] for e in json.loads(done.stdout or "[]") if e["type"] == "process_spawned"]


def _active(lab: Lab) -> bool:
    listed = json.loads(lab.cli("instances", "--json").stdout or "[]")
    return any(i["name"] == "sdk" and i["state"] == "active" for i in listed)
