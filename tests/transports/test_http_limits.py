"""An HTTP endpoint nobody can hold open: connection cap, head/body deadlines, media types,
strict Host, the token before the body, and sessions that expire (on an injected clock) or are capped.

Real sockets against a real endpoint on a live hub; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json

from fsm_hub.transports.http import HttpLimits
from tests.transports.test_http import ACCEPT, INIT, Endpoints

PING = {"jsonrpc": "2.0", "id": 9, "method": "ping"}


async def raw_exchange(port: int, request: bytes, *, wait: float = 5.0) -> bytes:
    """Send raw bytes, return the response head the server sends (bounded)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        async with asyncio.timeout(wait):
            return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


async def test_half_sent_heads_are_closed_after_the_head_timeout(endpoints: Endpoints) -> None:
    endpoint = await endpoints.start(limits=HttpLimits(head_timeout=0.2))
    opened = [await asyncio.open_connection("127.0.0.1", endpoint.port) for _ in range(5)]
    for _, writer in opened:
        writer.write(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
    async with asyncio.timeout(5):
        for reader, _ in opened:
            assert await reader.read() == b""  # closed by the endpoint, not by us
    for _, writer in opened:
        writer.close()
    assert len(endpoint.connections.open) == 0


async def test_connections_beyond_the_cap_get_503_and_a_request_after_them_works(
    endpoints: Endpoints,
) -> None:
    endpoint = await endpoints.start(limits=HttpLimits(max_connections=3, head_timeout=30))
    held = [await asyncio.open_connection("127.0.0.1", endpoint.port) for _ in range(3)]
    await asyncio.sleep(0.05)
    refused = await raw_exchange(endpoint.port, b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After" in refused
    assert endpoint.connections.refused == 1
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    status, answer = await endpoints.post(endpoint.url, INIT, ACCEPT)
    assert status == 200 and answer["result"]["serverInfo"]["name"] == "fsm-hub"


async def test_the_private_endpoint_refuses_a_wrong_token_before_reading_the_body(
    endpoints: Endpoints,
) -> None:
    endpoint = await endpoints.start(token="s3cret", limits=HttpLimits(body_timeout=30))
    head = (
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer nope\r\n"
        b"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    # The body never comes; the answer does, at once.
    answer = await raw_exchange(endpoint.port, head, wait=3)
    assert answer.startswith(b"HTTP/1.1 401") and b"Connection: close" in answer


async def test_a_body_that_dribbles_is_cut_off(endpoints: Endpoints) -> None:
    endpoint = await endpoints.start(limits=HttpLimits(body_timeout=0.2))
    head = (
        b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Accept: application/json, text/event-stream\r\nContent-Length: 100\r\n\r\n{"
    )
    answer = await raw_exchange(endpoint.port, head, wait=3)
    assert answer.startswith(b"HTTP/1.1 408")


async def test_post_needs_json_and_an_accept_listing_both_types(endpoints: Endpoints) -> None:
    url = (await endpoints.start()).url
    body = json.dumps(INIT)
    for headers, status in (
        ({**ACCEPT, "Content-Type": "text/plain"}, 415),
        ({"Accept": ACCEPT["Accept"]}, 415),  # no Content-Type at all
        ({"Content-Type": "application/json"}, 406),  # no Accept
        ({"Content-Type": "application/json", "Accept": "application/json"}, 406),
        ({"Content-Type": "application/json; charset=utf-8", "Accept": "*/*"}, 200),
        (ACCEPT, 200),
    ):
        async with endpoints.http.post(
            url, data=body, headers=headers, skip_auto_headers=["Accept"]
        ) as response:
            assert response.status == status, (headers, status, await response.text())


async def test_host_with_userinfo_or_garbage_is_421(endpoints: Endpoints) -> None:
    endpoint = await endpoints.start()
    for host in (b"127.0.0.1:1@evil.example", b"::1", b"127.0.0.1 x", b""):
        request = (
            b"POST /mcp HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\nContent-Length: 2\r\n\r\n{}"
        )
        answer = await raw_exchange(endpoint.port, request)
        assert answer.split(b"\r\n", 1)[0] in (
            b"HTTP/1.1 421 Misdirected Request",
            b"HTTP/1.1 400 Bad Request",
        ), host


async def test_deep_nesting_and_big_batches_are_json_rpc_errors_and_the_session_lives(
    endpoints: Endpoints,
) -> None:
    url = (await endpoints.start()).url
    headers = await endpoints.open_session(url)
    for body in (b"[" * 1000 + b"]" * 1000, b"[" + b"{}," * 500_000 + b"{}]", b"[NaN]"):
        async with endpoints.http.post(url, data=body, headers=headers) as response:
            answer = await response.json()
            assert response.status == 400 and answer["error"]["code"] in (-32600, -32700)
    status, answer = await endpoints.post(url, PING, headers)
    assert status == 200 and answer == {"jsonrpc": "2.0", "id": 9, "result": {}}


async def test_idle_sessions_expire_on_the_injected_clock_and_then_get_404(endpoints: Endpoints) -> None:
    now = [1000.0]
    endpoint = await endpoints.start(limits=HttpLimits(session_idle=60), clock=lambda: now[0])
    kept = await endpoints.open_session(endpoint.url)
    idle = await endpoints.open_session(endpoint.url)
    now[0] += 59
    assert await endpoint.expire_idle() == []
    assert (await endpoints.post(endpoint.url, PING, kept))[0] == 200  # activity resets the clock
    now[0] += 2
    assert await endpoint.expire_idle() == [idle["Mcp-Session-Id"]]
    status, answer = await endpoints.post(endpoint.url, PING, idle)
    assert status == 404 and answer["error"]["message"] == "Session not found"
    assert (await endpoints.post(endpoint.url, PING, kept))[0] == 200
    assert endpoints.live.hub.open_sessions == {kept["Mcp-Session-Id"]}


async def test_a_session_with_an_open_stream_is_not_idle(endpoints: Endpoints) -> None:
    now = [0.0]
    endpoint = await endpoints.start(limits=HttpLimits(session_idle=10), clock=lambda: now[0])
    headers = await endpoints.open_session(endpoint.url)
    get_headers = {"Accept": "text/event-stream", "Mcp-Session-Id": headers["Mcp-Session-Id"]}
    async with endpoints.http.get(endpoint.url, headers=get_headers) as stream:
        await stream.content.readuntil(b"\n\n")
        now[0] += 1000
        assert await endpoint.expire_idle() == []
    await asyncio.sleep(0.1)
    now[0] += 11
    assert await endpoint.expire_idle() == [headers["Mcp-Session-Id"]]


async def test_beyond_max_sessions_initialize_gets_503(endpoints: Endpoints) -> None:
    endpoint = await endpoints.start(limits=HttpLimits(max_sessions=2))
    first = await endpoints.open_session(endpoint.url)
    await endpoints.open_session(endpoint.url)
    status, answer = await endpoints.post(endpoint.url, INIT, ACCEPT)
    assert status == 503 and "--max-sessions" in answer["error"]["message"] and answer["id"] == 0
    async with endpoints.http.delete(endpoint.url, headers=first) as response:
        assert response.status == 200
    assert (await endpoints.post(endpoint.url, INIT, ACCEPT))[0] == 200
