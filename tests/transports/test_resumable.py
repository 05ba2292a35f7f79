"""Resumable SSE streams: event ids, `Last-Event-ID` replay, takeover, bounds and expiry.

Over real sockets against a real `HttpEndpoint` on a live hub whose instance is the SDK test
server; its `gated` tool keeps a call in flight until the test opens the gate.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from mcp import Client

from fsm_hub.mcp.protocol import instance_url
from fsm_hub.transports.http import BACKLOG, HttpEndpoint, HttpLimits
from fsm_hub.transports.resumable import RETRY_MS, ResumableStream, parse_event_id
from tests.live_hub import until
from tests.servers.faults import FakeMcp
from tests.servers.launch import SdkServerFactory
from tests.transports.resuming import (
    CuttingProxy,
    call,
    dropped_call,
    message_of,
    next_event,
    open_session,
    tool_call,
)
from tests.transports.test_http import Endpoints

TOOLS_CHANGED = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}


async def gate_endpoint(endpoints: Endpoints, sdk_server: SdkServerFactory, **options: Any) -> tuple[
    HttpEndpoint, str
]:
    endpoints.live.announce("9a7e01", sdk_server(), name="gate")
    await endpoints.live.reach("9a7e01", "active")
    endpoint = await endpoints.start(**options)
    return endpoint, instance_url(endpoint.url, "gate")


def gated(key: str) -> dict[str, Any]:
    return tool_call("gated", {"key": key}, "g", token="t")


def progress(step: int, message: str) -> dict[str, Any]:
    params = {"progressToken": "t", "progress": step, "total": 2, "message": message}
    return {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}


def answer(key: str) -> Any:
    text = f"gate {key} passed"
    content = [{"type": "text", "text": text}]
    return {"content": content, "structuredContent": {"result": text}, "isError": False}


# -- the pure buffer ---------------------------------------------------------------------------


def test_event_ids_name_their_stream_and_foreign_ids_parse_to_nothing() -> None:
    assert parse_event_id("get-12") == ("get", 12)
    assert parse_event_id("p3-0") == ("p3", 0)
    assert parse_event_id(" p3-0 ") == ("p3", 0)
    for foreign in ("", "7", "-1", "p3-", "p3-x", "p3--1", "get-" + "9" * 30):
        assert parse_event_id(foreign) is None, foreign


async def test_a_stream_keeps_its_last_events_and_replays_after_a_cursor() -> None:
    stream = ResumableStream("get", 3)
    for n in range(5):
        stream.append({"n": n})
    assert len(stream) == 3 and stream.holds(0) and stream.holds(4) and not stream.holds(5)
    stream.finish(0.0)
    replayed = [event.message["n"] async for event in stream.follow(after=2)]
    assert replayed == [3, 4] and stream.complete
    # a cursor older than the buffer replays what it still holds; the oldest are gone
    assert [event.seq async for event in stream.follow(after=0)] == [2, 3, 4]
    assert b"id: get-2\n" in (await anext(stream.follow(after=1))).encode("get")


async def test_a_priming_event_has_an_id_a_retry_and_no_data() -> None:
    stream = ResumableStream("p1", 4)
    stream.append(None)
    stream.finish(0.0)
    (priming,) = [event async for event in stream.follow()]
    assert priming.encode("p1") == f"id: p1-0\nretry: {RETRY_MS}\ndata:\n\n".encode()


async def test_a_new_follower_takes_the_stream_over_and_the_old_one_stops() -> None:
    stream = ResumableStream("p1", 8)
    stream.append({"n": 0})
    first = stream.follow()
    assert (await anext(first)).seq == 0
    waiting = asyncio.ensure_future(anext(first))
    await asyncio.sleep(0)  # let it block on the stream
    second = stream.follow(after=-1)
    assert (await anext(second)).seq == 0  # the second replays from its own cursor
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 5)  # the first stops before the next event
    stream.append({"n": 1})
    assert (await anext(second)).seq == 1 and stream.followed
    await second.aclose()
    assert not stream.followed


# -- through the endpoint ----------------------------------------------------------------------


async def test_a_dropped_post_stream_is_resumed_by_get_and_followed_live_to_its_answer(
    endpoints: Endpoints, sdk_server: SdkServerFactory
) -> None:
    endpoint, url = await gate_endpoint(endpoints, sdk_server)
    http = endpoints.http
    headers = await open_session(http, url)
    entry = endpoint.sessions[headers["Mcp-Session-Id"]]
    async with http.post(url, json=gated("a"), headers=headers) as post:
        priming = await next_event(post)
        assert priming == {"id": "p1-0", "retry": str(RETRY_MS), "data": ""}
        first = await next_event(post)
        assert first is not None and first["id"] == "p1-1" and message_of(first) == progress(1, "waiting")
        post.close()
    assert "p1" in entry.posts
    async with http.get(url, headers={**headers, "Last-Event-ID": "p1-0"}) as get:
        replayed = await next_event(get)
        assert replayed is not None and replayed["id"] == "p1-1"
        assert message_of(replayed) == progress(1, "waiting")
        assert "p1" in entry.posts and entry.posts["p1"].followed
        opened = await call(http, url, headers, tool_call("open_gate", {"key": "a"}, "o"))
        assert opened["result"]["content"][0]["text"] == "opened a"
        rest = [await next_event(get), await next_event(get)]
        assert [(e or {}).get("id") for e in rest] == ["p1-2", "p1-3"]
        assert [message_of(e or {}) for e in rest] == [
            progress(2, "opened"),
            {"jsonrpc": "2.0", "id": "g", "result": answer("a")},
        ]
        assert await next_event(get) is None  # the stream ends with its answer
    assert entry.posts == {}  # delivered: nothing is kept
    # its ids now resume nothing: the GET stream opens instead (and carries the GET events)
    entry.get_stream.append(TOOLS_CHANGED)
    async with http.get(url, headers={**headers, "Last-Event-ID": "p1-1"}) as get:
        event = await next_event(get)
        assert event is not None and (event["id"], message_of(event)) == ("get-0", TOOLS_CHANGED)


async def test_the_answer_of_a_call_that_ended_while_dropped_is_kept_for_a_resume(
    endpoints: Endpoints, sdk_server: SdkServerFactory
) -> None:
    """Also: each POST stream of a session is its own, and a resume replays only its own."""
    now = [0.0]
    endpoint, url = await gate_endpoint(
        endpoints, sdk_server, limits=HttpLimits(stream_keep=60.0), clock=lambda: now[0]
    )
    http = endpoints.http
    headers = await open_session(http, url)
    entry = endpoint.sessions[headers["Mcp-Session-Id"]]
    for key in ("b", "c"):
        async with http.post(url, json=gated(key), headers=headers) as post:
            assert (await next_event(post) or {}).get("id") in ("p1-0", "p2-0")
            post.close()
    assert set(entry.posts) == {"p1", "p2"}
    for key in ("b", "c"):
        await call(http, url, headers, tool_call("open_gate", {"key": key}, "o"))
    finished = [entry.posts["p1"], entry.posts["p2"]]
    await until(lambda: all(stream.finished for stream in finished), what="both calls ended")
    async with http.get(url, headers={**headers, "Last-Event-ID": "p2-0"}) as get:
        events = [await next_event(get) for _ in range(3)]
        assert [(e or {}).get("id") for e in events] == ["p2-1", "p2-2", "p2-3"]
        assert message_of(events[2] or {})["result"] == answer("c")
        assert await next_event(get) is None
    assert set(entry.posts) == {"p1"}
    now[0] = 59.0
    await endpoint.expire_idle()
    assert set(entry.posts) == {"p1"}
    now[0] = 60.0
    await endpoint.expire_idle()
    assert entry.posts == {} and headers["Mcp-Session-Id"] in endpoint.sessions


async def test_a_resume_while_the_post_is_still_connected_takes_it_over(
    endpoints: Endpoints, sdk_server: SdkServerFactory
) -> None:
    """Never two connections on one stream: the POST's response ends and the GET carries on."""
    _, url = await gate_endpoint(endpoints, sdk_server)
    http = endpoints.http
    headers = await open_session(http, url)
    async with http.post(url, json=gated("d"), headers=headers) as post:
        await next_event(post)
        await next_event(post)  # p1-1: progress 1
        async with http.get(url, headers={**headers, "Last-Event-ID": "p1-1"}) as get:
            assert await next_event(post) is None  # taken over: the POST's response ends
            await call(http, url, headers, tool_call("open_gate", {"key": "d"}, "o"))
            events = [await next_event(get), await next_event(get)]
            assert [(e or {}).get("id") for e in events] == ["p1-2", "p1-3"]
            assert await next_event(get) is None


async def test_the_get_stream_carries_ids_and_resumes_after_the_last_seen(
    endpoints: Endpoints, fake_mcp: Any
) -> None:
    fake: FakeMcp = await fake_mcp()
    endpoints.live.announce("g1", fake.url, name="gamma")
    await endpoints.live.reach("g1", "active")
    endpoint = await endpoints.start()
    url, http = endpoint.url, endpoints.http
    headers = await open_session(http, url)
    entry = endpoint.sessions[headers["Mcp-Session-Id"]]
    connect = tool_call("instances_connect", {"instance_id": "gamma"}, 1)
    await call(http, url, headers, connect)  # tools, resources, prompts list_changed
    changed = len(entry.get_stream)
    assert changed >= 1

    def log(n: int) -> None:
        entry.session.emit({"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": n}})

    async with http.get(url, headers=headers) as get:  # opened after they were sent
        events = [await next_event(get) for _ in range(changed)]
        assert [(e or {}).get("id") for e in events] == [f"get-{n}" for n in range(changed)]
        assert message_of(events[0] or {}) == TOOLS_CHANGED
        log(1)
        assert (await next_event(get) or {}).get("id") == f"get-{changed}"
        get.close()
    await until_unfollowed(entry.get_stream)
    log(2)
    log(3)
    # with Last-Event-ID: everything after the event it names, even what was carried (n=1)
    last = f"get-{changed - 1}"
    async with http.get(url, headers={**headers, "Last-Event-ID": last}) as get:
        events = [await next_event(get) for _ in range(3)]
        assert [(e or {}).get("id") for e in events] == [f"get-{changed + n}" for n in range(3)]
        assert [message_of(e or {})["params"]["n"] for e in events] == [1, 2, 3]
        log(4)
        assert (await next_event(get) or {}).get("id") == f"get-{changed + 3}"  # then live
        get.close()
    await until_unfollowed(entry.get_stream)
    log(5)
    # without it: what no connection has carried yet
    async with http.get(url, headers=headers) as get:
        event = await next_event(get)
        assert event is not None and message_of(event)["params"]["n"] == 5


async def test_unknown_foreign_and_not_yet_issued_ids_open_the_get_stream(
    endpoints: Endpoints, sdk_server: SdkServerFactory
) -> None:
    endpoint, gate_url = await gate_endpoint(endpoints, sdk_server)
    http = endpoints.http
    headers = await open_session(http, endpoint.url)
    other = await open_session(http, gate_url)
    async with http.post(gate_url, json=gated("e"), headers=other) as post:  # the other session's p1
        await next_event(post)
        post.close()
    entry = endpoint.sessions[headers["Mcp-Session-Id"]]
    for n, last in enumerate(("nope", "p1-0", "get-5", "p1-", "9")):
        entry.session.emit({"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": n}})
        async with http.get(endpoint.url, headers={**headers, "Last-Event-ID": last}) as get:
            event = await next_event(get)
            assert event is not None and event["id"] == f"get-{n}", last
            assert message_of(event)["params"]["n"] == n
            get.close()
        await until_unfollowed(entry.get_stream)
    await call(http, gate_url, other, tool_call("open_gate", {"key": "e"}, "o"))


async def test_the_get_stream_keeps_its_last_backlog_events(endpoints: Endpoints) -> None:
    endpoint = await endpoints.start()
    url, http = endpoint.url, endpoints.http
    headers = await open_session(http, url)
    entry = endpoint.sessions[headers["Mcp-Session-Id"]]
    for n in range(BACKLOG + 2):
        entry.session.emit({"jsonrpc": "2.0", "method": "notifications/message", "params": {"n": n}})
    assert len(entry.get_stream) == BACKLOG
    async with http.get(url, headers=headers) as get:
        event = await next_event(get)
        assert event is not None and event["id"] == "get-2"  # the two oldest were dropped


async def test_through_the_hub_and_directly_the_sdk_server_resumes_the_same(
    endpoints: Endpoints, sdk_server: SdkServerFactory
) -> None:
    """The same client code against the SDK server (with its event store) and through the hub."""
    _, url = await gate_endpoint(endpoints, sdk_server)
    through_hub, hub_ids = await dropped_call(endpoints.http, url, "same")
    direct, _ = await dropped_call(endpoints.http, sdk_server(event_store=True), "same")
    assert through_hub == direct
    assert [m.get("method") for m in direct] == ["notifications/progress", "notifications/progress", None]
    assert hub_ids == ["p1-1", "p1-2", "p1-3"]


async def until_unfollowed(stream: ResumableStream) -> None:
    """Wait until the server noticed a dropped connection and let the stream go."""
    await until(lambda: not stream.followed, what=f"{stream.key} let go")


async def sdk_client_call_over_a_cut(url: str, gate_url: str, key: str) -> tuple[Any, list[Any]]:
    """The official SDK `Client` calls `gated` through a proxy that drops its stream after the
    priming event; the gate opens once it has; the client resumes on its own."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proxy = CuttingProxy(port, "gated")
    await proxy.start()
    seen: list[Any] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    try:
        proxied = url.replace(f":{port}/", f":{proxy.port}/", 1)
        # legacy: the initialize handshake at 2025-11-25, the last revision with resumable streams
        async with aiohttp.ClientSession() as http, Client(proxied, mode="legacy") as client:
            gated_call = client.call_tool("gated", {"key": key}, progress_callback=on_progress)
            call_ = asyncio.ensure_future(gated_call)
            await asyncio.wait_for(proxy.cut.wait(), 10)
            headers = await open_session(http, gate_url)
            await call(http, gate_url, headers, tool_call("open_gate", {"key": key}, "o"))
            result = await asyncio.wait_for(call_, 20)
    finally:
        await proxy.stop()
    return result.model_dump(mode="json", by_alias=True, exclude_none=True), seen


async def test_the_sdk_client_resumes_a_cut_stream_through_the_hub_as_from_the_sdk_server(
    endpoints: Endpoints, sdk_server: SdkServerFactory
) -> None:
    _, url = await gate_endpoint(endpoints, sdk_server)
    through_hub = await sdk_client_call_over_a_cut(url, url, "client")
    direct_url = sdk_server(event_store=True)
    direct = await sdk_client_call_over_a_cut(direct_url, direct_url, "client")
    assert through_hub == direct
    assert direct[0]["content"] == [{"type": "text", "text": "gate client passed"}]
    assert direct[1] == [(1.0, 2.0, "waiting"), (2.0, 2.0, "opened")]
