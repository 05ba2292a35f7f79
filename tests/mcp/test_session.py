"""An MCP session of the hub, in-process: the protocol, the hub tools, routing to instances.

The hub is real (store, discovery, supervisors on short real timers); the instances are
in-process fault servers from tests/servers/, so a test can take one away or wedge it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fsm_hub.mcp.protocol import PROTOCOL_VERSIONS
from fsm_hub.mcp.session import PAGE_SIZE, Session, request_emit
from fsm_hub.mcp.tool_names import VALID_NAME
from tests.live_hub import CALM, LiveHub, until
from tests.servers.faults import PRELUDE, FakeMcp
from tests.servers.flaky import FlakyMcp
from tests.servers.slow import SlowMcp

LiveHubFactory = Callable[..., Awaitable[LiveHub]]
FakeFactory = Callable[..., Awaitable[FakeMcp]]
FlakyFactory = Callable[..., Awaitable[FlakyMcp]]
HUB_TOOLS = {
    "instances_list", "instances_connect", "instances_disconnect",
    "instances_history", "instances_call", "hub_status",
}  # fmt: skip
TOOLS_CHANGED = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}


def request(method: str, params: Any = None, request_id: Any = 1) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


async def call(session: Session, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """tools/call through the session; the result (which may be isError)."""
    answer = await session.handle(request("tools/call", {"name": name, "arguments": arguments or {}}))
    assert isinstance(answer, dict) and "result" in answer, answer
    result: dict[str, Any] = answer["result"]
    return result


async def tool_names(session: Session) -> set[str]:
    answer = await session.handle(request("tools/list"))
    assert isinstance(answer, dict)
    return {t["name"] for t in answer["result"]["tools"]}


def code(answer: Any) -> int:
    assert isinstance(answer, dict) and "error" in answer, answer
    return int(answer["error"]["code"])


# -- the protocol -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected_code", "expected_id"),
    [
        ({"jsonrpc": "2.0", "id": 1}, -32600, 1),
        ({"jsonrpc": "1.0", "id": 2, "method": "ping"}, -32600, 2),
        ({"id": 3, "method": "ping"}, -32600, 3),
        ({"jsonrpc": "2.0", "id": 4, "method": 4}, -32600, 4),
        ({"jsonrpc": "2.0", "id": True, "method": "ping"}, -32600, None),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}, -32600, None),
        ({"jsonrpc": "2.0", "id": {"x": 1}, "method": "ping"}, -32600, None),
        ("ping", -32600, None),
        (7, -32600, None),
        (None, -32600, None),
        ([], -32600, None),
        (request("server/discover", {}), -32601, 1),
        (request("some/unknown"), -32601, 1),
        (request("tools/list", [1]), -32602, 1),
        (request("tools/list", "x"), -32602, 1),
        (request("tools/call", {}), -32602, 1),
        (request("tools/call", {"name": 5}), -32602, 1),
        (request("tools/call", {"name": "echo", "arguments": [1]}), -32602, 1),
        (request("tools/call", {"name": "not_a_tool"}), -32602, 1),
        (request("tools/list", {"cursor": "nope"}), -32602, 1),
        (request("tools/list", {"cursor": 3}), -32602, 1),
        (request("tools/list", {"cursor": "999"}), -32602, 1),
        (request("initialize", {"capabilities": {}}), -32602, 1),
        (request("resources/read", {"uri": "memo://x"}), -32602, 1),
        (request("prompts/get", {"name": "review"}), -32602, 1),
    ],
)
async def test_malformed_messages_get_their_error_code(
    live_hub: LiveHubFactory, message: Any, expected_code: int, expected_id: Any
) -> None:
    session, _ = (await live_hub()).session()
    answer = await session.handle(message)
    assert code(answer) == expected_code
    assert isinstance(answer, dict) and answer["id"] == expected_id and answer["jsonrpc"] == "2.0"


async def test_a_batch_is_answered_as_a_batch_and_notifications_and_responses_get_nothing(
    live_hub: LiveHubFactory,
) -> None:
    session, _ = (await live_hub()).session()
    answer = await session.handle([1, request("ping", request_id="a"), {"jsonrpc": "2.0", "method": "x"}])
    assert isinstance(answer, list)
    assert [(m["id"], m.get("result"), m.get("error", {}).get("code")) for m in answer] == [
        (None, None, -32600),
        ("a", {}, None),
    ]
    assert await session.handle({"jsonrpc": "2.0", "method": "notifications/initialized"}) is None
    assert await session.handle({"jsonrpc": "2.0", "method": "tools/list", "params": [1]}) is None
    assert await session.handle({"jsonrpc": "2.0", "id": 9, "result": {}}) is None
    assert await session.handle({"jsonrpc": "2.0", "id": 9, "error": {"code": 1, "message": "x"}}) is None


@pytest.mark.parametrize(
    ("asked", "agreed"),
    [*((v, v) for v in PROTOCOL_VERSIONS), ("2026-07-28", "2025-11-25"), ("1", "2025-11-25")],
)
async def test_initialize_negotiates_the_version(live_hub: LiveHubFactory, asked: str, agreed: str) -> None:
    session, _ = (await live_hub()).session()
    params = {"protocolVersion": asked, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    answer = await session.handle(request("initialize", params))
    assert isinstance(answer, dict)
    result = answer["result"]
    assert result["protocolVersion"] == agreed
    assert result["serverInfo"]["name"] == "fsm-hub"
    assert result["capabilities"]["tools"] == {"listChanged": True}


async def test_hub_tools_are_valid_and_declare_object_schemas(live_hub: LiveHubFactory) -> None:
    session, _ = (await live_hub()).session()
    answer = await session.handle(request("tools/list", {}))
    assert isinstance(answer, dict)
    tools = answer["result"]["tools"]
    assert {t["name"] for t in tools} == HUB_TOOLS and "nextCursor" not in answer["result"]
    for tool in tools:
        assert VALID_NAME.match(tool["name"]) and tool["inputSchema"]["type"] == "object"
    schema = next(t for t in tools if t["name"] == "instances_call")["inputSchema"]
    assert schema["properties"]["arguments"]["type"] == "object"
    assert schema["required"] == ["instance_id", "tool"]


async def test_tools_list_pages_with_a_cursor(live_hub: LiveHubFactory, fake_mcp: FakeFactory) -> None:
    many = [f"tool_{n:03}" for n in range(PAGE_SIZE + 50)]
    fake = await fake_mcp(tool_pages=(many,))
    live = await live_hub()
    live.announce("many", fake.url)
    await live.reach("many", "active")
    session, _ = live.session()
    await call(session, "instances_connect", {"instance_id": "many"})
    first = await session.handle(request("tools/list"))
    assert isinstance(first, dict)
    page = first["result"]
    assert len(page["tools"]) == PAGE_SIZE and page["nextCursor"] == str(PAGE_SIZE)
    second = await session.handle(request("tools/list", {"cursor": page["nextCursor"]}))
    assert isinstance(second, dict)
    rest = second["result"]
    assert "nextCursor" not in rest
    names = [t["name"] for t in page["tools"] + rest["tools"]]
    assert len(names) == len(HUB_TOOLS) + len(many) and set(names) == HUB_TOOLS | set(many)


# -- routing ----------------------------------------------------------------------------------


async def test_connect_routes_the_session_to_the_instance(
    live_hub: LiveHubFactory, fake_mcp: FakeFactory
) -> None:
    fake = await fake_mcp(tool_pages=(("echo", "instances_list", "odd name!"),))
    live = await live_hub()
    live.announce("a1b2c3", fake.url, name="api")
    await live.reach("a1b2c3", "active")
    session, emitted = live.session("sess-1")
    assert await tool_names(session) == HUB_TOOLS

    connected = await call(session, "instances_connect", {"instance_id": "api"})
    assert not connected["isError"]
    assert connected["structuredContent"]["instance"]["id"] == "a1b2c3"
    assert json.loads(connected["content"][0]["text"]) == connected["structuredContent"]
    assert TOOLS_CHANGED in emitted
    # hub names win a clash; a name clients would refuse is listed under a safe alias
    assert await tool_names(session) == HUB_TOOLS | {"echo", "odd_name_"}

    echoed = await call(session, "echo", {"text": "hi"})
    assert echoed == {"content": [{"type": "text", "text": '{"text": "hi"}'}], "isError": False}
    await call(session, "odd_name_", {})
    assert fake.posted("tools/call")[-1].message["params"]["name"] == "odd name!"
    listed = (await call(session, "instances_list"))["structuredContent"]["instances"]
    assert listed[0]["sessions"] == ["sess-1"]
    assert set(listed[0]) == {
        "id", "name", "directory", "port", "url", "pid", "state", "since",
        "retry_count", "last_error", "sessions", "kind", "source",
    }  # fmt: skip
    # resources and prompts are forwarded; an instance without them has empty lists
    answer = await session.handle(request("resources/list"))
    assert isinstance(answer, dict) and answer["result"] == {"resources": []}
    answer = await session.handle(request("prompts/list"))
    assert isinstance(answer, dict) and answer["result"] == {"prompts": []}
    answer = await session.handle(request("prompts/get", {"name": "x"}))
    assert code(answer) == -32601  # the instance's own error, passed on

    disconnected = await call(session, "instances_disconnect")
    assert disconnected["structuredContent"] == {"disconnected": "a1b2c3"}
    assert await tool_names(session) == HUB_TOOLS
    assert await live.kinds("a1b2c3", "session_") == ["session_connected", "session_disconnected"]
    ends = [e.data for e in await live.events("a1b2c3") if e.type == "session_disconnected"]
    assert ends == [{"session_id": "sess-1", "reason": "disconnected by client"}]


async def test_switching_instances_is_allowed_and_recorded(
    live_hub: LiveHubFactory, fake_mcp: FakeFactory
) -> None:
    first, second = await fake_mcp(), await fake_mcp(tool_pages=(("other",),))
    live = await live_hub()
    live.announce("one111", first.url, name="one")
    live.announce("two222", second.url, name="two")
    await live.reach("one111", "active")
    await live.reach("two222", "active")
    session, emitted = live.session("sess-2")
    await call(session, "instances_connect", {"instance_id": "one"})
    emitted.clear()
    switched = await call(session, "instances_connect", {"instance_id": "two2"})  # a unique prefix
    assert switched["structuredContent"]["previous"] == "one111"
    assert TOOLS_CHANGED in emitted
    assert "other" in await tool_names(session) and "echo" not in await tool_names(session)
    ends = [e.data for e in await live.events("one111") if e.type == "session_disconnected"]
    assert ends == [{"session_id": "sess-2", "reason": "switched to two222"}]
    assert await live.kinds("two222", "session_") == ["session_connected"]
    unknown = await call(session, "instances_connect", {"instance_id": "nobody"})
    assert unknown["isError"] and "nobody" in unknown["content"][0]["text"]
    assert session.bound == "two222"


async def test_an_instance_that_leaves_active_fails_calls_fast_and_comes_back(
    live_hub: LiveHubFactory, flaky_mcp: FlakyFactory
) -> None:
    flaky = await flaky_mcp()
    live = await live_hub()
    live.announce("f1", flaky.url, name="flaky")
    await live.reach("f1", "active")
    session, emitted = live.session("sess-3")
    await call(session, "instances_connect", {"instance_id": "flaky"})
    assert "echo" in await tool_names(session)

    emitted.clear()
    await flaky.down()
    await live.reach("f1", "dead")
    await until(lambda: TOOLS_CHANGED in emitted)  # dead: its tools are withdrawn
    assert await tool_names(session) == HUB_TOOLS
    started = time.perf_counter()
    failed = await call(session, "echo", {"text": "x"})
    assert time.perf_counter() - started < 0.1
    assert failed["isError"]
    text = failed["content"][0]["text"]
    assert "f1 is dead" in text and "last error:" in text and "cannot connect" in text
    via_hub = await call(session, "instances_call", {"instance_id": "f1", "tool": "echo"})
    assert via_hub["isError"] and "is dead" in via_hub["content"][0]["text"]
    answer = await session.handle(request("resources/list"))
    assert isinstance(answer, dict) and answer["result"] == {"resources": []}
    assert session.bound == "f1"  # still bound

    emitted.clear()
    await flaky.up()
    live.announce("f1", flaky.url.replace("127.0.0.1", "localhost"), name="flaky")  # rediscover
    await live.reach("f1", "active")
    await until(lambda: TOOLS_CHANGED in emitted)
    assert "echo" in await tool_names(session)
    assert not (await call(session, "echo", {"text": "back"}))["isError"]


async def test_a_call_in_flight_when_the_instance_is_lost_fails_instead_of_hanging(
    live_hub: LiveHubFactory, flaky_mcp: FlakyFactory
) -> None:
    flaky = await flaky_mcp()
    live = await live_hub()
    live.announce("w1", flaky.url, name="wedged")
    await live.reach("w1", "active")
    session, _ = live.session()
    await call(session, "instances_connect", {"instance_id": "w1"})
    flaky.pause()  # the port stays open, nothing answers: only pings can tell
    routed = asyncio.ensure_future(call(session, "echo", {"text": "x"}))
    other = asyncio.ensure_future(call(session, "instances_call", {"instance_id": "w1", "tool": "echo"}))
    done, _ = await asyncio.wait((routed, other), timeout=3)
    assert done == {routed, other}
    for outcome in (routed.result(), other.result()):
        assert outcome["isError"] and "w1 is " in outcome["content"][0]["text"]
    assert live.hub.state("w1") != "active"


async def test_cancelled_requests_are_not_answered_and_the_instance_is_told(
    live_hub: LiveHubFactory, slow_mcp: SlowMcp
) -> None:
    live = await live_hub()
    live.announce("s1", slow_mcp.url, name="slow")
    await live.reach("s1", "active")
    session, _ = live.session()
    await call(session, "instances_connect", {"instance_id": "slow"})
    pending = asyncio.ensure_future(session.handle(request("tools/call", {"name": "sleep"}, "slow-1")))
    await asyncio.wait_for(slow_mcp.sleeping.wait(), 5)
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "slow-1"}}
    assert await session.handle(cancel) is None
    assert await asyncio.wait_for(pending, 5) is None  # no answer to a cancelled request
    await asyncio.wait_for(slow_mcp.cancelled.wait(), 5)
    assert slow_mcp.cancelled_ids() == slow_mcp.sleep_ids()
    unknown = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "nope"}}
    assert await session.handle(unknown) is None
    answer = await session.handle(request("ping", request_id=2))
    assert answer == {"jsonrpc": "2.0", "id": 2, "result": {}}


async def test_progress_from_the_instance_is_relayed_unchanged(
    live_hub: LiveHubFactory, fake_mcp: FakeFactory
) -> None:
    fake = await fake_mcp(sse=True, prelude=PRELUDE[3:4])
    live = await live_hub()
    live.announce("p1", fake.url)
    await live.reach("p1", "active")
    session, emitted = live.session()
    await call(session, "instances_connect", {"instance_id": "p1"})
    emitted.clear()
    await call(session, "echo", {})
    progress = {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": "t", "progress": 1},
    }
    assert emitted == [progress]
    # a transport that answers on the request's own stream gets it there instead
    own: list[dict[str, Any]] = []
    token = request_emit.set(own.append)
    try:
        await call(session, "echo", {})
    finally:
        request_emit.reset(token)
    assert own == [progress] and emitted == [progress]


async def test_closing_a_session_cancels_its_calls_and_records_the_disconnect(
    live_hub: LiveHubFactory, slow_mcp: SlowMcp
) -> None:
    live = await live_hub()
    live.announce("s2", slow_mcp.url)
    await live.reach("s2", "active")
    session, _ = live.session("sess-9")
    await call(session, "instances_connect", {"instance_id": "s2"})
    pending = asyncio.ensure_future(session.handle(request("tools/call", {"name": "sleep"}, "z")))
    await asyncio.wait_for(slow_mcp.sleeping.wait(), 5)
    assert live.hub.status()["clients"] == 1
    await session.close("client went away")
    await asyncio.wait([pending], timeout=5)
    assert pending.done()
    ends = [e.data for e in await live.events("s2") if e.type == "session_disconnected"]
    assert ends == [{"session_id": "sess-9", "reason": "client went away"}]
    assert live.hub.status()["clients"] == 0


# -- hub tools --------------------------------------------------------------------------------


async def test_history_and_status(live_hub: LiveHubFactory, fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp()
    live = await live_hub(CALM)
    live.announce("h1", fake.url, name="hist")
    await live.reach("h1", "active")
    session, _ = live.session()
    history = (await call(session, "instances_history", {"instance_id": "hist"}))["structuredContent"]
    assert history["events"] == [e.to_json() for e in await live.events("h1")]
    last = (await call(session, "instances_history", {"instance_id": "h1", "limit": 1}))["structuredContent"]
    assert last["events"] == history["events"][-1:]
    hub = (await call(session, "instances_history", {"instance_id": "hub"}))["structuredContent"]
    assert [e["type"] for e in hub["events"]] == ["hub_started"]
    for bad in ({"instance_id": "h1", "limit": 0}, {"instance_id": "h1", "limit": True}, {"limit": 1}, {}):
        assert (await call(session, "instances_history", bad))["isError"]

    status = (await call(session, "hub_status"))["structuredContent"]
    assert status["states"] == {"active": 1} and status["instances"] == 1
    assert status["db"] == str(live.store.path) and status["events"] == live.store.last_seq
    assert status["clients"] == 1 and status["sessions"] == 0 and status["uptime_seconds"] >= 0
    assert (await call(session, "hub_status", {"extra": 1}))["isError"]


async def test_instances_call_calls_without_switching(
    live_hub: LiveHubFactory, fake_mcp: FakeFactory
) -> None:
    fake = await fake_mcp()
    live = await live_hub()
    live.announce("c1", fake.url, name="callee")
    await live.reach("c1", "active")
    session, _ = live.session()
    result = await call(
        session, "instances_call", {"instance_id": "callee", "tool": "echo", "arguments": {"x": 1}}
    )
    assert result == {"content": [{"type": "text", "text": '{"x": 1}'}], "isError": False}
    assert session.bound is None
    for bad in (
        {"instance_id": "callee", "tool": "echo", "arguments": [1]},
        {"instance_id": "callee"},
        {"instance_id": "nobody", "tool": "echo"},
        {"instance_id": "callee", "tool": "echo", "surprise": 1},
    ):
        assert (await call(session, "instances_call", bad))["isError"], bad
    upstream_error = await call(session, "instances_call", {"instance_id": "callee", "tool": "fail"})
    assert upstream_error["isError"] and "JSON-RPC error -32602" in upstream_error["content"][0]["text"]
