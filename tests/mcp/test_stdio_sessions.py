"""Per-client sessions over one stdio process (StdioSessions), against a real StdioClient and the
light stdio server (tests/servers/stdio_server.py), which keeps subscriptions and a log level as
a real server does. Each scenario is also run with a client of its own talking to a server of its
own: what a hub client receives must be what that client receives directly."""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fsm_hub.errors import McpError
from fsm_hub.mcp.stdio_sessions import SharedStdioSession, StdioSessions
from fsm_hub.mcp.stdio_upstream import StdioClient

pytestmark = pytest.mark.e2e

SERVER = str(Path(__file__).resolve().parents[2] / "tests" / "servers" / "stdio_server.py")
URI = "memo://counter"
LIST_CHANGED = "notifications/resources/list_changed"
Make = Callable[[], Awaitable[StdioClient]]


class Inbox:
    """What one receiver got, with a way to wait for a `mark` (a barrier: delivery is in order)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()

    def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def until_mark(self, mark: str) -> list[dict[str, Any]]:
        """The messages before `mark` that are not marks themselves."""
        async with asyncio.timeout(10):
            while not any(_mark_of(m) == mark for m in self.messages):
                self._arrived.clear()
                await self._arrived.wait()
        return [m for m in self.messages if _mark_of(m) is None]

    def methods(self) -> list[str]:
        return [m["method"] for m in self.messages if _mark_of(m) is None]


def _mark_of(message: dict[str, Any]) -> str | None:
    if message.get("method") != "notifications/prompts/list_changed":
        return None
    return ((message.get("params") or {}).get("_meta") or {}).get("mark")


@pytest.fixture
async def stdio() -> AsyncIterator[Make]:
    clients: list[StdioClient] = []

    async def make() -> StdioClient:
        client = StdioClient(sys.executable, ["-S", SERVER], name="light", timeout=10.0)
        clients.append(client)
        await client.initialize()
        return client

    yield make
    for client in clients:
        await client.close()


async def call(client: StdioClient | SharedStdioSession, tool: str, **arguments: Any) -> str:
    result = await client.request("tools/call", {"name": tool, "arguments": arguments})
    return str(result["content"][0]["text"])


async def server_state(client: StdioClient) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(await call(client, "state"))
    return state


async def opened(sessions: StdioSessions, *, listening: bool = True) -> tuple[SharedStdioSession, Inbox]:
    session = sessions.open({})
    inbox = Inbox()
    if listening:
        session.listen(inbox)
    return session, inbox


async def direct(stdio: Make) -> tuple[StdioClient, Inbox]:
    """A client with a server of its own, listening, as a client without the hub would be."""
    client = await stdio()
    inbox = Inbox()
    client.listen(inbox)
    return client, inbox


async def test_unclaimed_notifications_reach_the_supervisor_and_each_listening_session(stdio: Make) -> None:
    client = await stdio()
    supervisor = Inbox()
    client.listen(supervisor)
    sessions = StdioSessions.of(client)
    a, inbox_a = await opened(sessions)
    b, inbox_b = await opened(sessions)
    _, inbox_c = await opened(sessions, listening=False)
    await call(a, "flood", n=2)
    await call(a, "mark", mark="1")
    for inbox in (supervisor, inbox_a, inbox_b):
        assert [m["method"] for m in await inbox.until_mark("1")] == [LIST_CHANGED] * 2
    assert inbox_c.messages == []  # never listened
    assert client.taps == 1  # one tap for all the sessions of the process

    # A call's own progress goes to that call only, not to the sessions.
    progress = Inbox()
    await client.request(
        "tools/call",
        {"name": "progress", "arguments": {"steps": 2}, "_meta": {"progressToken": "p"}},
        on_message=progress,
    )
    assert [m["method"] for m in progress.messages] == ["notifications/progress"] * 2
    # Progress no call claims belongs to no client (another may use the same token): hub only.
    await client.request(
        "tools/call", {"name": "progress", "arguments": {"steps": 1}, "_meta": {"progressToken": "q"}}
    )

    await b.close()
    await call(a, "mark", mark="2")
    await inbox_a.until_mark("2")
    assert "notifications/progress" in [m["method"] for m in await supervisor.until_mark("2")]
    assert [_mark_of(m) for m in inbox_b.messages if _mark_of(m)] == ["1"]  # closed: nothing more
    assert "notifications/progress" not in inbox_a.methods() + inbox_b.methods()
    await a.close()
    await asyncio.sleep(0)  # the listen task's done callback
    assert client.taps == 0 and repr(sessions).startswith("<StdioSessions of light listening=0")


async def test_a_stuck_receiver_blocks_neither_the_reader_nor_the_other_sessions(stdio: Make) -> None:
    client = await stdio()
    sessions = StdioSessions(client, max_queued=3)
    stuck, released = sessions.open({}), asyncio.Event()
    got_stuck = Inbox()

    async def slow(message: dict[str, Any]) -> None:
        got_stuck(message)
        await released.wait()

    def broken(message: dict[str, Any]) -> None:
        raise RuntimeError("a receiver with a bug")

    stuck.listen(slow)
    failing = sessions.open({})
    failing.listen(broken)
    _, inbox = await opened(sessions)
    await call(client, "flood", n=10)
    await call(client, "mark", mark="1")
    assert len(await inbox.until_mark("1")) == 10
    await client.ping()  # the reader still answers
    assert len(got_stuck.messages) == 1 and stuck.dropped == 11 - 1 - 3  # one in the receiver, three queued
    assert "dropped=7" in repr(stuck)
    assert failing.dropped == 0  # it raised on each one, and took each one
    released.set()
    await call(client, "mark", mark="2")
    await inbox.until_mark("2")
    # It catches up with what was queued, then receives again; what it missed stays missed.
    assert await got_stuck.until_mark("2") == [{"jsonrpc": "2.0", "method": LIST_CHANGED}] * 4


async def test_subscriptions_are_counted_per_uri_across_the_sessions(stdio: Make) -> None:
    client = await stdio()
    sessions = StdioSessions.of(client)
    a, inbox_a = await opened(sessions)
    b, inbox_b = await opened(sessions)
    c, inbox_c = await opened(sessions)
    assert await a.request("resources/subscribe", {"uri": URI}) == {}
    assert await b.request("resources/subscribe", {"uri": URI}) == {}  # answered by the hub
    assert (await server_state(client))["received"] == [["resources/subscribe", URI]]
    assert sessions.subscribed == {URI: 2}
    await call(c, "touch", uris=[URI, "memo://other"])
    await call(c, "mark", mark="1")
    assert await inbox_a.until_mark("1") == [_updated(URI)]
    assert await inbox_b.until_mark("1") == [_updated(URI)]
    assert await inbox_c.until_mark("1") == []  # not subscribed

    assert await a.request("resources/unsubscribe", {"uri": URI}) == {}
    state = await server_state(client)
    assert state["subscribed"] == [URI] and len(state["received"]) == 1  # B still holds it
    await call(c, "touch", uris=[URI])
    await call(c, "mark", mark="2")
    assert await inbox_a.until_mark("2") == [_updated(URI)]  # no second one
    assert await inbox_b.until_mark("2") == [_updated(URI)] * 2

    assert await b.request("resources/unsubscribe", {"uri": URI}) == {}
    state = await server_state(client)
    assert state["subscribed"] == [] and state["received"][-1] == ["resources/unsubscribe", URI]
    assert sessions.subscribed == {}

    # A's outcome, with a client and a server of its own.
    alone, inbox = await direct(stdio)
    assert await alone.request("resources/subscribe", {"uri": URI}) == {}
    await call(alone, "touch", uris=[URI, "memo://other"])
    await call(alone, "mark", mark="1")
    await alone.request("resources/unsubscribe", {"uri": URI})
    await call(alone, "touch", uris=[URI])
    await call(alone, "mark", mark="2")
    assert await inbox.until_mark("2") == await inbox_a.until_mark("2")


async def test_the_first_subscribers_error_is_its_answer(stdio: Make) -> None:
    client = await stdio()
    sessions = StdioSessions.of(client)
    a, _ = await opened(sessions)
    b, _ = await opened(sessions)
    with pytest.raises(McpError) as through:
        await a.request("resources/subscribe", {"uri": "bad:x"})
    with pytest.raises(McpError):
        await b.request("resources/subscribe", {"uri": "bad:x"})  # not subscribed: B asks again
    assert (await server_state(client))["received"] == [["resources/subscribe", "bad:x"]] * 2
    assert sessions.subscribed == {}
    alone, _ = await direct(stdio)
    with pytest.raises(McpError) as directly:
        await alone.request("resources/subscribe", {"uri": "bad:x"})
    assert (through.value.code, through.value.message) == (directly.value.code, directly.value.message)


async def test_the_last_subscribed_session_closing_unsubscribes_upstream(stdio: Make) -> None:
    client = await stdio()
    sessions = StdioSessions.of(client)
    a, _ = await opened(sessions)
    b, _ = await opened(sessions)
    for session in (a, b):
        await session.request("resources/subscribe", {"uri": URI})
    await a.close()
    await sessions.settled()
    assert (await server_state(client))["subscribed"] == [URI]
    await b.close()
    await sessions.settled()
    state = await server_state(client)
    assert state["subscribed"] == [] and state["received"][-1] == ["resources/unsubscribe", URI]


async def test_unsubscribing_what_no_session_holds_is_the_servers_to_answer(stdio: Make) -> None:
    client = await stdio()
    a, _ = await opened(StdioSessions.of(client))
    b, _ = await opened(StdioSessions.of(client))
    await b.request("resources/subscribe", {"uri": URI})
    assert await a.request("resources/unsubscribe", {"uri": "memo://never"}) == {}
    assert await a.request("resources/unsubscribe", {"uri": URI}) == {}  # B's stays
    assert (await server_state(client))["received"] == [
        ["resources/subscribe", URI], ["resources/unsubscribe", "memo://never"],
    ]  # fmt: skip
    with pytest.raises(McpError):
        await a.request("resources/unsubscribe", {"uri": "bad:y"})


async def test_log_levels_are_per_session_and_the_server_gets_the_most_verbose(stdio: Make) -> None:
    client = await stdio()
    sessions = StdioSessions.of(client)
    a, inbox_a = await opened(sessions)
    b, inbox_b = await opened(sessions)
    c, inbox_c = await opened(sessions)  # never sets a level
    assert await a.request("logging/setLevel", {"level": "debug"}) == {}
    assert await b.request("logging/setLevel", {"level": "error"}) == {}
    state = await server_state(client)
    assert state["level"] == "debug" and state["received"] == [["logging/setLevel", "debug"]]
    for level in ("debug", "info", "error"):
        await call(c, "log", level=level, data=level)
    await call(c, "mark", mark="1")
    assert _levels(await inbox_a.until_mark("1")) == ["debug", "info", "error"]
    assert _levels(await inbox_b.until_mark("1")) == ["error"]
    assert _levels(await inbox_c.until_mark("1")) == ["debug", "info", "error"]

    await a.close()  # the most verbose one: the server is set to the next
    await sessions.settled()
    state = await server_state(client)
    assert state["level"] == "error" and state["received"][-1] == ["logging/setLevel", "error"]
    assert sessions.upstream_level == "error"
    await b.request("logging/setLevel", {"level": "warning"})
    assert (await server_state(client))["level"] == "warning"
    with pytest.raises(McpError) as through:
        await b.request("logging/setLevel", {"level": "loud"})
    assert sessions.wanted_level() == "warning"

    # A's and B's outcomes, each with a client and a server of its own.
    for level, inbox in (("debug", inbox_a), ("error", inbox_b)):
        alone, own = await direct(stdio)
        await alone.request("logging/setLevel", {"level": level})
        for sent in ("debug", "info", "error"):
            await call(alone, "log", level=sent, data=sent)
        await call(alone, "mark", mark="1")
        assert _levels(await own.until_mark("1")) == _levels(await inbox.until_mark("1"))
    with pytest.raises(McpError) as directly:
        await alone.request("logging/setLevel", {"level": "loud"})
    assert through.value.code == directly.value.code


async def test_a_new_process_gets_a_fresh_state_and_the_old_one_is_let_go(stdio: Make) -> None:
    first, second = await stdio(), await stdio()
    assert StdioSessions.of(first) is StdioSessions.of(first)
    assert StdioSessions.of(first) is not StdioSessions.of(second)
    await StdioSessions.of(first).open({}).request("resources/subscribe", {"uri": URI})
    assert StdioSessions.of(second).subscribed == {}
    spare = StdioClient(sys.executable, ["-S", SERVER], name="spare", timeout=10.0)
    await spare.initialize()
    session = StdioSessions.of(spare).open({})
    session.listen(Inbox())
    state = weakref.ref(StdioSessions.of(spare))
    await session.close()
    await spare.close()
    del spare, session
    await asyncio.sleep(0)
    gc.collect()
    assert state() is None


def _updated(uri: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": uri}}


def _levels(messages: list[dict[str, Any]]) -> list[str]:
    return [m["params"]["level"] for m in messages if m["method"] == "notifications/message"]
