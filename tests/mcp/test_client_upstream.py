"""Each client session has its own upstream session; what the instance asks reaches that client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from fsm_hub.mcp.session import Session
from tests.live_hub import FAST, LiveHub, until
from tests.servers.asking import AskingMcp
from tests.servers.flaky import FlakyMcp

LiveHubFactory = Callable[..., Awaitable[LiveHub]]


@pytest.fixture
async def asking() -> AsyncIterator[AskingMcp]:
    server = AskingMcp()
    await server.start()
    yield server
    await server.stop()


async def _client(
    live: LiveHub, name: str, capabilities: dict[str, Any]
) -> tuple[Session, list[dict[str, Any]]]:
    session, emitted = live.session(name, initialized=False)
    hello = {"protocolVersion": "2025-11-25", "capabilities": capabilities, "clientInfo": {"name": name}}
    answer = await session.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello})
    assert answer is not None and "result" in answer
    return session, emitted


async def _call(session: Session, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    params = {"name": name, "arguments": arguments or {}}
    answer = await session.handle({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params})
    assert isinstance(answer, dict) and "result" in answer, answer
    result: dict[str, Any] = answer["result"]
    return result


async def _ready(live_hub: LiveHubFactory, asking: AskingMcp) -> LiveHub:
    live = await live_hub()
    live.announce("q1", asking.url, name="asking")
    await live.reach("q1", "active")
    return live


async def test_each_client_session_has_its_own_upstream_session(
    live_hub: LiveHubFactory, asking: AskingMcp
) -> None:
    live = await _ready(live_hub, asking)
    assert len(asking.sessions) == 1  # the supervisor's own
    first, _ = await _client(live, "alpha", {"sampling": {}})
    second, _ = await _client(live, "beta", {})
    connected = await _call(first, "instances_connect", {"instance_id": "asking"})
    assert connected["structuredContent"]["instructions"] == "ask me"
    await _call(second, "instances_connect", {"instance_id": "asking"})
    assert len(asking.sessions) == 1  # a bind that has not called costs no handshake

    mine = (await _call(first, "whoami"))["content"][0]["text"]
    theirs = (await _call(second, "whoami"))["content"][0]["text"]
    assert (await _call(first, "whoami"))["content"][0]["text"] == mine  # one handshake, kept
    assert len({mine, theirs, "s1"}) == 3 and len(asking.sessions) == 3
    assert asking.sessions[mine].capabilities == {"sampling": {}}
    assert asking.sessions[mine].client_info["name"] == "fsm-hub/alpha"
    assert asking.sessions[theirs].capabilities == {}

    await _call(first, "instances_disconnect")
    assert asking.sessions[mine].deleted and not asking.sessions[theirs].deleted
    await second.close("client went away")
    assert asking.sessions[theirs].deleted and not asking.sessions["s1"].deleted


async def test_a_sampling_request_reaches_the_client_and_its_answer_goes_back(
    live_hub: LiveHubFactory, asking: AskingMcp
) -> None:
    live = await _ready(live_hub, asking)
    session, emitted = await _client(live, "alpha", {"sampling": {}})
    await _call(session, "instances_connect", {"instance_id": "asking"})
    emitted.clear()
    pending = asyncio.ensure_future(_call(session, "ask"))
    await until(lambda: any(m.get("method") == "sampling/createMessage" for m in emitted))
    question = next(m for m in emitted if m.get("method") == "sampling/createMessage")
    assert question["id"] == "fsm-1" and question["params"]["maxTokens"] == 5  # renumbered, else unchanged
    sampled = {"role": "assistant", "content": {"type": "text", "text": "4"}, "model": "m"}
    assert await session.handle({"jsonrpc": "2.0", "id": "fsm-1", "result": sampled}) is None
    told = json.loads((await asyncio.wait_for(pending, 10))["content"][0]["text"])
    assert told["result"] == sampled and isinstance(told["id"], int) and told["id"] > 900  # its own id


async def test_a_client_without_sampling_gets_the_instance_an_error_at_once(
    live_hub: LiveHubFactory, asking: AskingMcp
) -> None:
    live = await _ready(live_hub, asking)
    session, emitted = await _client(live, "plain", {})
    await _call(session, "instances_connect", {"instance_id": "asking"})
    emitted.clear()
    told = json.loads((await asyncio.wait_for(_call(session, "ask"), 5))["content"][0]["text"])
    assert told["error"]["code"] == -32601 and "sampling" in told["error"]["message"]
    assert not any(m.get("method") == "sampling/createMessage" for m in emitted)


async def test_a_retrying_instance_keeps_its_tools_listed_and_fails_calls_at_once(
    live_hub: LiveHubFactory, flaky_mcp: Callable[..., Awaitable[FlakyMcp]]
) -> None:
    flaky = await flaky_mcp()
    live = await live_hub(replace(FAST, backoff_base=3600.0, backoff_cap=3600.0))  # it stays retrying
    live.announce("f1", flaky.url, name="flaky")
    await live.reach("f1", "active")
    session, emitted = await _client(live, "alpha", {})
    await _call(session, "instances_connect", {"instance_id": "flaky"})
    emitted.clear()
    await flaky.down()
    await live.reach("f1", "retrying")
    listed = await session.handle({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    assert isinstance(listed, dict) and "echo" in {t["name"] for t in listed["result"]["tools"]}
    assert not any(m["method"] == "notifications/tools/list_changed" for m in emitted)  # no churn
    started = time.perf_counter()
    failed = await _call(session, "echo", {"text": "x"})
    assert time.perf_counter() - started < 0.5
    text = failed["content"][0]["text"]
    assert failed["isError"] and "f1 is retrying (0 connect attempts failed); last error: " in text


async def test_get_stream_notifications_reach_only_their_client_and_the_stream_is_reopened(
    live_hub: LiveHubFactory, asking: AskingMcp
) -> None:
    live = await _ready(live_hub, asking)
    mine, heard = await _client(live, "alpha", {})
    other, overheard = await _client(live, "beta", {})
    for session in (mine, other):
        await _call(session, "instances_connect", {"instance_id": "asking"})
        await _call(session, "whoami")  # opens its own upstream session (and its GET stream)
    heard.clear()
    overheard.clear()
    changed = ["notifications/prompts/list_changed", "notifications/resources/list_changed"]
    await _call(mine, "announce")
    await until(lambda: [m["method"] for m in heard] == changed)
    await _call(mine, "announce")  # each event ended its stream: only a reopened one brings these
    await until(lambda: [m["method"] for m in heard] == changed * 2)
    assert overheard == []
    upstream = next(s for s in asking.live() if s.client_info["name"] == "fsm-hub/alpha")
    assert upstream.last_event_ids[0] is None and upstream.last_event_ids[1] is not None


async def test_a_per_instance_session_follows_its_instance_across_a_restart_on_another_port(
    live_hub: LiveHubFactory, flaky_mcp: Callable[..., Awaitable[FlakyMcp]]
) -> None:
    first = await flaky_mcp()
    live = await live_hub()
    live.announce("f1", first.url, name="api")
    await live.reach("f1", "active")
    emitted: list[dict[str, Any]] = []
    session = Session(live.hub, "per-instance", emitted.append, instance="api")
    try:
        hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "one-shot"}}
        answer = await session.handle({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": hello})
        assert isinstance(answer, dict) and answer["result"]["protocolVersion"] == "2025-06-18"
        assert answer["result"]["capabilities"]["tools"]["listChanged"] is True
        listed = await session.handle({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert isinstance(listed, dict) and [t["name"] for t in listed["result"]["tools"]] == ["echo"]
        assert not (await _call(session, "echo", {"text": "1"})).get("isError")

        await first.down()
        await live.reach("f1", "dead")
        started = time.perf_counter()
        down = await _call(session, "echo", {"text": "2"})
        assert down["isError"] and "f1 is dead" in down["content"][0]["text"]
        assert time.perf_counter() - started < 0.5  # fails fast, never hangs

        second = await flaky_mcp()  # the instance comes back on another port
        live.announce("f1", second.url, name="api")
        await live.reach("f1", "active")
        back = await _call(session, "echo", {"text": "3"})
        assert not back.get("isError") and json.loads(back["content"][0]["text"]) == {"text": "3"}
        assert second.live_sessions  # a new upstream session of this client, on the new port
    finally:
        await session.close("test over")


async def test_a_clients_subscriptions_and_level_are_set_up_again_when_its_instance_comes_back(
    live_hub: LiveHubFactory, flaky_mcp: Callable[..., Awaitable[FlakyMcp]]
) -> None:
    """The instance restarts (on another port): the hub opens the client's new upstream session
    by itself and replays its level and its subscriptions — those still held — into it."""
    first = await flaky_mcp()
    live = await live_hub()
    live.announce("k1", first.url, name="kept")
    await live.reach("k1", "active")
    session, _ = await _client(live, "subscriber", {})
    try:
        await _call(session, "instances_connect", {"instance_id": "kept"})
        asked = [
            ("logging/setLevel", {"level": "warning"}),
            ("resources/subscribe", {"uri": "memo://a"}),
            ("resources/subscribe", {"uri": "memo://b"}),
            ("resources/unsubscribe", {"uri": "memo://b"}),
        ]
        for n, (method, params) in enumerate(asked, start=1):
            answer = await session.handle({"jsonrpc": "2.0", "id": n, "method": method, "params": params})
            assert answer == {"jsonrpc": "2.0", "id": n, "result": {}}
        assert [r.message["params"] for r in first.posted("resources/subscribe")] == [
            {"uri": "memo://a"}, {"uri": "memo://b"},
        ]  # fmt: skip

        await first.down()
        await live.reach("k1", "dead")
        second = await flaky_mcp()
        live.announce("k1", second.url, name="kept")
        await live.reach("k1", "active")
        # No request from the client since: the replay is the hub's own.
        await until(lambda: second.posted("resources/subscribe"), what="the subscription replayed")
        replayed = [
            (r.rpc_method, r.message["params"])
            for r in second.posted("logging/setLevel") + second.posted("resources/subscribe")
        ]
        assert replayed == [("logging/setLevel", {"level": "warning"}), ("resources/subscribe", {"uri": "memo://a"})]
        assert len(second.posted("initialize")) == 2  # the supervisor's and this client's, once
    finally:
        await session.close("test over")


async def test_unbinding_ends_what_the_client_set_up(
    live_hub: LiveHubFactory, flaky_mcp: Callable[..., Awaitable[FlakyMcp]]
) -> None:
    """A client that leaves an instance takes its subscriptions with it: nothing is replayed."""
    first = await flaky_mcp()
    live = await live_hub()
    live.announce("k2", first.url, name="left")
    await live.reach("k2", "active")
    session, _ = await _client(live, "leaver", {})
    try:
        await _call(session, "instances_connect", {"instance_id": "left"})
        subscribe = {"jsonrpc": "2.0", "id": 1, "method": "resources/subscribe", "params": {"uri": "memo://a"}}
        assert "result" in (await session.handle(subscribe) or {})
        await _call(session, "instances_disconnect")
        await first.down()
        await live.reach("k2", "dead")
        second = await flaky_mcp()
        live.announce("k2", second.url, name="left")
        await live.reach("k2", "active")
        await _call(session, "instances_connect", {"instance_id": "left"})
        await _call(session, "echo", {"text": "after"})
        assert second.posted("tools/call") and not second.posted("resources/subscribe")
    finally:
        await session.close("test over")
