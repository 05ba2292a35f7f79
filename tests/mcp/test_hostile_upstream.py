"""An instance that answers with what is not JSON — NaN, 1e999, nesting beyond the limit — or
keeps its streams open: the call fails naming the instance, the instance stays active, nothing
non-standard reaches the client, and no fd is held per call.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from fsm_hub.errors import TransportError
from fsm_hub.mcp import jsonrpc, upstream
from fsm_hub.mcp.upstream import McpClient
from tests.live_hub import LiveHub, until
from tests.servers.faults import FakeMcp

LiveHubFactory = Callable[..., Awaitable[LiveHub]]
FakeFactory = Callable[..., Awaitable[FakeMcp]]
HOSTILE = {
    "nan": '{"content":[{"type":"text","text":"x"}],"value":NaN}',
    "huge": '{"content":[{"type":"text","text":"x"}],"value":1e999}',
    "deep": '{"content":[],"value":' + "[" * 1000 + "]" * 1000 + "}",
    "fine": '{"content":[{"type":"text","text":"fine"}],"isError":false}',
}


def call(name: str, request_id: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": name}}


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
async def test_non_standard_json_from_an_instance_fails_that_call_naming_the_instance(
    live_hub: LiveHubFactory, fake_mcp: FakeFactory, sse: bool
) -> None:
    fake = await fake_mcp(sse=sse, raw_results=HOSTILE, tool_pages=((*HOSTILE,),))
    live = await live_hub()
    live.announce("a1b2c3", fake.url, name="api")
    await live.reach("a1b2c3", "active")
    session, _ = live.session()
    connect = {"name": "instances_connect", "arguments": {"instance_id": "api"}}
    await session.handle(call("instances_connect") | {"params": connect})
    for n, name in enumerate(("nan", "huge", "deep"), start=10):
        answer = await session.handle(call(name, n))
        assert isinstance(answer, dict)
        result = answer["result"]
        assert result["isError"] is True
        assert "instance a1b2c3" in result["content"][0]["text"], result
        json.loads(jsonrpc.encode(answer))  # what the client gets is strict JSON
    assert live.hub.state("a1b2c3") == "active"  # a bad answer is not evidence of a dead instance
    fine = await session.handle(call("fine", 20))
    assert isinstance(fine, dict) and fine["result"]["content"][0]["text"] == "fine"
    await session.close("test")


async def test_the_same_answers_directly_from_the_instance_are_refused_too(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(raw_results=HOSTILE, tool_pages=((*HOSTILE,),))
    async with McpClient(fake.url) as client:
        for name in ("nan", "huge", "deep"):
            with pytest.raises(TransportError, match="not JSON"):
                await client.call_tool(name)
        assert (await client.call_tool("fine"))["content"][0]["text"] == "fine"


async def test_a_stream_kept_open_after_its_answer_is_closed_by_the_client(
    fake_mcp: FakeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream, "_DRAIN_TIMEOUT", 0.05)
    fake = await fake_mcp(sse=True, keep_open=True)
    async with McpClient(fake.url, timeout=30) as client:
        for n in range(5):
            await client.call_tool("echo", {"n": n})
        assert len(fake.transports) >= 5
        # Each answered stream is drained briefly, then closed: no fd per call is held for the
        # 30 s call timeout.
        await until(lambda: all(t.is_closing() for t in fake.transports[1:]), 5.0, "streams closed")
