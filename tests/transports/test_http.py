"""The Streamable HTTP endpoint in-process: sessions by header, DNS-rebinding guards, streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import mcp_types
import pytest
from mcp import Client

from fsm_hub.transports.http import HttpEndpoint, is_loopback, split_host
from tests.live_hub import LiveHub, until
from tests.servers.faults import PRELUDE, FakeMcp
from tests.servers.slow import SlowMcp

LiveHubFactory = Callable[..., Awaitable[LiveHub]]
FakeFactory = Callable[..., Awaitable[FakeMcp]]
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
TOOLS_CHANGED = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}


def tool_call(name: str, arguments: dict[str, Any], request_id: Any = 1, **params: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments, **params},
    }


class Endpoints:
    """HttpEndpoints on a live hub, and one aiohttp client to talk to them."""

    def __init__(self, live: LiveHub, http: aiohttp.ClientSession) -> None:
        self.live = live
        self.http = http
        self.started: list[HttpEndpoint] = []

    async def start(
        self, host: str = "127.0.0.1", token: str | None = None, **options: Any
    ) -> HttpEndpoint:
        """An endpoint on the live hub; ``options`` go to HttpEndpoint (``limits``, ``clock``)."""
        endpoint = HttpEndpoint(self.live.hub, host, 0, token=token, **options)
        await endpoint.start()
        self.started.append(endpoint)
        return endpoint

    async def open_session(self, url: str, headers: dict[str, str] | None = None) -> dict[str, str]:
        """initialize + initialized; the headers that carry the new session."""
        async with self.http.post(url, json=INIT, headers={**ACCEPT, **(headers or {})}) as response:
            assert response.status == 200
            session_headers = {
                **ACCEPT,
                **(headers or {}),
                "Mcp-Session-Id": response.headers["Mcp-Session-Id"],
            }
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with self.http.post(url, json=initialized, headers=session_headers) as response:
            assert response.status == 202
        return session_headers

    async def post(self, url: str, message: Any, headers: dict[str, str]) -> tuple[int, Any]:
        async with self.http.post(url, json=message, headers=headers) as response:
            body = await response.read()
            return response.status, json.loads(body) if body else None


@pytest.fixture
async def endpoints(live_hub: LiveHubFactory) -> AsyncIterator[Endpoints]:
    live = await live_hub()
    async with aiohttp.ClientSession() as http:
        made = Endpoints(live, http)
        yield made
        for endpoint in made.started:
            await endpoint.stop()


async def test_foreign_origin_is_403_and_foreign_host_is_421(endpoints: Endpoints) -> None:
    url = (await endpoints.start()).url
    for headers, status in (
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Host": "evil.example"}, 421),
        ({"Host": "attacker.localhost.example:80"}, 421),
        ({"Origin": "http://localhost:3000"}, 200),
        ({"Origin": "http://127.0.0.1"}, 200),
        ({"Host": "localhost:1"}, 200),
        ({"Host": "[::1]:8080"}, 200),
    ):
        async with endpoints.http.post(url, json=INIT, headers={**ACCEPT, **headers}) as response:
            assert response.status == status, headers
    session = await endpoints.open_session(url)
    for method in (endpoints.http.get, endpoints.http.delete):
        async with method(url, headers={**session, "Origin": "https://evil.example"}) as response:
            assert response.status == 403
    async with endpoints.http.get(url, headers={**session, "Host": "evil.example"}) as response:
        assert response.status == 421


async def test_a_wildcard_bind_accepts_ip_hosts_but_not_names(endpoints: Endpoints) -> None:
    endpoint = await endpoints.start("0.0.0.0")
    url = f"http://127.0.0.1:{endpoint.port}/mcp"
    for host, status in (("192.0.2.7:8765", 200), ("evil.example:8765", 421)):
        async with endpoints.http.post(url, json=INIT, headers={**ACCEPT, "Host": host}) as response:
            assert response.status == status, host


async def test_the_private_endpoint_wants_its_token(endpoints: Endpoints) -> None:
    url = (await endpoints.start(token="s3cret")).url
    for auth, status in ((None, 401), ("Bearer wrong", 401), ("Bearer s3cret", 200)):
        headers = {**ACCEPT, **({"Authorization": auth} if auth else {})}
        async with endpoints.http.post(url, json=INIT, headers=headers) as response:
            assert response.status == status


def test_host_parsing_is_strict() -> None:
    assert [split_host(h) for h in ("a:1", "[::1]:80", "[::1]", "b", "127.0.0.1:8080")] == [
        "a",
        "::1",
        "::1",
        "b",
        "127.0.0.1",
    ]
    # Not a Host at all: an unbracketed IPv6, userinfo, a path, a bad port, nothing.
    for bad in ("::1", "127.0.0.1:80@evil.example", "127.0.0.1/x", "a:99999", "a:", "", "[::1", "[zz]:1"):
        assert split_host(bad) is None, bad
    assert [is_loopback(h) for h in ("localhost", "127.0.0.2", "::1", "[::1]", "10.0.0.1", "")] == [
        True, True, True, True, False, False,
    ]  # fmt: skip


def test_one_loopback_check_for_mapped_addresses() -> None:
    """The transport and discovery used to disagree on IPv4-mapped loopback; now one check."""
    assert is_loopback("::ffff:127.0.0.1") and is_loopback("[::ffff:127.0.0.1]")
    assert not is_loopback("::ffff:10.0.0.1") and not is_loopback("0.0.0.0") and not is_loopback("::")


async def test_session_lifecycle(endpoints: Endpoints, fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp()
    endpoints.live.announce("g1", fake.url, name="gamma")
    await endpoints.live.reach("g1", "active")
    url = (await endpoints.start()).url
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}

    assert await endpoints.post(url, ping, ACCEPT) == (
        400,
        {
            "jsonrpc": "2.0",
            "id": 2,
            "error": {"code": -32600, "message": "Bad Request: missing Mcp-Session-Id header"},
        },
    )
    status, body = await endpoints.post(url, {"jsonrpc": "2.0", "id": 3, "method": "server/discover"}, ACCEPT)
    assert (status, body["id"], body["error"]["code"]) == (200, 3, -32601)
    status, body = await endpoints.post(url, ping, {**ACCEPT, "Mcp-Session-Id": "unknown"})
    assert status == 404 and body["id"] == 2
    async with endpoints.http.post(url, data=b"{nope", headers=ACCEPT) as response:
        assert response.status == 400 and (await response.json())["error"]["code"] == -32700

    session = await endpoints.open_session(url)
    session_id = session["Mcp-Session-Id"]
    assert await endpoints.post(url, ping, session) == (200, {"jsonrpc": "2.0", "id": 2, "result": {}})
    status, body = await endpoints.post(url, [ping, {"jsonrpc": "2.0", "method": "x"}], session)
    assert status == 200 and body == [{"jsonrpc": "2.0", "id": 2, "result": {}}]
    status, body = await endpoints.post(
        url, tool_call("instances_connect", {"instance_id": "gamma"}), session
    )
    assert status == 200 and not body["result"]["isError"]
    async with endpoints.http.get(url, headers={**session, "Accept": "application/json"}) as response:
        assert response.status == 406

    # list_changed was sent before any GET stream was open: the stream opened now carries it
    async with endpoints.http.get(url, headers={**session, "Accept": "text/event-stream"}) as stream:
        assert stream.status == 200
        first = await _next_sse(stream)
        assert first == TOOLS_CHANGED
        async with endpoints.http.delete(url, headers=session) as response:
            assert response.status == 200
        await asyncio.wait_for(stream.content.read(), 5)  # the session's stream ends with it
    status, _ = await endpoints.post(url, ping, session)
    assert status == 404
    ends = [e.data for e in await endpoints.live.events("g1") if e.type == "session_disconnected"]
    assert ends == [{"session_id": session_id, "reason": "client ended the session"}]
    assert endpoints.live.hub.open_sessions == set()


async def test_a_call_with_a_progress_token_is_answered_as_a_stream(
    endpoints: Endpoints, fake_mcp: FakeFactory
) -> None:
    fake = await fake_mcp(sse=True, prelude=PRELUDE[3:4])
    endpoints.live.announce("p1", fake.url, name="prog")
    await endpoints.live.reach("p1", "active")
    url = (await endpoints.start()).url
    session = await endpoints.open_session(url)
    await endpoints.post(url, tool_call("instances_connect", {"instance_id": "prog"}), session)
    message = tool_call("echo", {"x": 1}, request_id=7, _meta={"progressToken": "t"})
    async with endpoints.http.post(url, json=message, headers=session) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [
            json.loads(line[6:]) for line in (await response.text()).splitlines() if line.startswith("data: ")
        ]
    assert [e.get("method") or e["id"] for e in events] == ["notifications/progress", 7]
    assert events[0]["params"] == {"progressToken": "t", "progress": 1}
    assert events[1]["result"]["content"][0]["text"] == '{"x": 1}'


async def test_a_cancelled_call_is_answered_202_and_the_instance_is_told(
    endpoints: Endpoints, slow_mcp: SlowMcp
) -> None:
    endpoints.live.announce("s1", slow_mcp.url, name="slow")
    await endpoints.live.reach("s1", "active")
    url = (await endpoints.start()).url
    session = await endpoints.open_session(url)
    await endpoints.post(url, tool_call("instances_connect", {"instance_id": "slow"}), session)
    pending = asyncio.ensure_future(endpoints.post(url, tool_call("sleep", {}, request_id="long"), session))
    await asyncio.wait_for(slow_mcp.sleeping.wait(), 5)
    cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "long"}}
    assert await endpoints.post(url, cancel, session) == (202, None)
    assert await asyncio.wait_for(pending, 5) == (202, None)
    await asyncio.wait_for(slow_mcp.cancelled.wait(), 5)
    assert slow_mcp.cancelled_ids() == slow_mcp.sleep_ids()


async def test_two_sdk_clients_are_two_sessions_each_bound_to_its_instance(
    endpoints: Endpoints, fake_mcp: FakeFactory
) -> None:
    alpha, beta = await fake_mcp(tool_pages=(("alpha_tool",),)), await fake_mcp(tool_pages=(("beta_tool",),))
    endpoints.live.announce("aaa", alpha.url, name="alpha")
    endpoints.live.announce("bbb", beta.url, name="beta")
    await endpoints.live.reach("aaa", "active")
    await endpoints.live.reach("bbb", "active")
    url = (await endpoints.start()).url
    heard: list[list[str]] = [[], []]

    def listener(n: int) -> Callable[[Any], Awaitable[None]]:
        async def handle(message: Any) -> None:
            if isinstance(message, mcp_types.ToolListChangedNotification):
                heard[n].append("tools")

        return handle

    async with (
        Client(url, message_handler=listener(0)) as first,
        Client(url, message_handler=listener(1)) as second,
    ):
        await first.call_tool("instances_connect", {"instance_id": "alpha"})
        await second.call_tool("instances_connect", {"instance_id": "beta"})
        await until(lambda: heard == [["tools"], ["tools"]], what="list_changed on both GET streams")
        assert "alpha_tool" in {t.name for t in (await first.list_tools()).tools}
        assert "beta_tool" not in {t.name for t in (await first.list_tools()).tools}
        assert "beta_tool" in {t.name for t in (await second.list_tools()).tools}
        result = await second.call_tool("beta_tool", {"n": 1})
        assert result.content == [mcp_types.TextContent(type="text", text='{"n": 1}')]
        listed = (await first.call_tool("instances_list", {})).structured_content
        assert listed is not None
        sessions = {i["name"]: i["sessions"] for i in listed["instances"]}
        assert len(sessions["alpha"]) == len(sessions["beta"]) == 1 and sessions["alpha"] != sessions["beta"]
    # each client DELETEd its session on exit
    await until(lambda: not endpoints.live.hub.open_sessions, what="both sessions ended")
    for stream in ("aaa", "bbb"):
        assert await endpoints.live.kinds(stream, "session_") == ["session_connected", "session_disconnected"]


async def _next_sse(response: aiohttp.ClientResponse) -> Any:
    async def read() -> Any:
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                return json.loads(line[6:])
        return None

    return await asyncio.wait_for(read(), 5)
