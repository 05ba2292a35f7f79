"""McpClient against real SDK servers (subprocesses) and against servers that misbehave."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from fsm_hub.errors import McpError, SessionExpired, TransportError
from fsm_hub.mcp.protocol import LATEST as PROTOCOL_VERSION
from fsm_hub.mcp.sse import SseDecoder
from fsm_hub.mcp.upstream import McpClient
from tests.servers.faults import PRELUDE, FakeMcp, refused_url
from tests.servers.launch import SdkServerFactory

FakeFactory = Callable[..., Awaitable[FakeMcp]]


class Inbox:
    """Collects what a client hands to on_message."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    async def __call__(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.arrived.set()

    def methods(self) -> list[str]:
        return [m.get("method", "?") for m in self.messages]


@pytest.fixture(autouse=True)
def no_unclosed_aiohttp_sessions() -> Iterator[None]:
    """Fail a test that leaves an aiohttp session or connector for the garbage collector."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    assert [str(w.message) for w in caught if "Unclosed" in str(w.message)] == []


# -- real SDK servers ----------------------------------------------------------------------


async def test_handshake_and_tool_call_over_sse(sdk_server: SdkServerFactory) -> None:
    async with McpClient(sdk_server()) as client:
        assert client.protocol_version == PROTOCOL_VERSION
        assert client.server_info == {"name": "sdk-test-server", "version": "1.2.3"}
        assert "tools" in client.capabilities
        assert client.session_id
        names = {tool["name"] for tool in await client.list_tools()}
        assert {"echo", "add", "progress", "sleep", "fail", "add_tool"} <= names
        assert await client.call_tool("echo", {"text": "hi"}) == {
            "content": [{"type": "text", "text": "hi"}],
            "isError": False,
            "structuredContent": {"result": "hi"},
        }


async def test_json_stateless_server(sdk_server: SdkServerFactory) -> None:
    async with McpClient(sdk_server(json=True, stateless=True)) as client:
        assert client.session_id is None
        result = await client.call_tool("add", {"a": 2, "b": 3})
        assert result["structuredContent"] == {"result": 5}
        await client.ping()
        # Stateless servers have no session to DELETE (405); close must not mind.


async def test_priming_events_from_sdk_event_store(sdk_server: SdkServerFactory) -> None:
    async with McpClient(sdk_server(event_store=True)) as client:
        result = await client.call_tool("add", {"a": 40, "b": 2})
        assert result["content"] == [{"type": "text", "text": "42"}]


async def test_progress_notifications_reach_on_message(sdk_server: SdkServerFactory) -> None:
    inbox = Inbox()
    async with McpClient(sdk_server()) as client:
        result = await client.call_tool(
            "progress", {"steps": 3}, meta={"progressToken": "p-1"}, on_message=inbox
        )
    assert result["content"][0]["text"] == "done after 3 steps"
    assert [m["params"]["progress"] for m in inbox.messages] == [1, 2, 3]
    assert {m["params"]["progressToken"] for m in inbox.messages} == {"p-1"}


async def test_list_changed_in_post_stream_and_on_get_stream(sdk_server: SdkServerFactory) -> None:
    during_call, standalone = Inbox(), Inbox()
    async with McpClient(sdk_server(fresh=True), on_message=standalone) as client:
        listener = client.listen()
        added: list[str] = []
        for attempt in range(50):  # the server registers the GET stream a moment after its headers
            if client.listening:
                added.append(f"dynamic_{attempt}")
                await client.call_tool("add_tool", {"name": added[-1]}, on_message=during_call)
                try:
                    await asyncio.wait_for(standalone.arrived.wait(), 0.1)
                    break
                except TimeoutError:
                    continue
            await asyncio.sleep(0.02)
        assert during_call.methods()[0] == "notifications/tools/list_changed"
        assert standalone.methods()[0] == "notifications/tools/list_changed"
        assert set(added) <= {tool["name"] for tool in await client.list_tools()}
        assert await client.call_tool(added[0]) == {
            "content": [{"type": "text", "text": f"I am {added[0]}"}],
            "isError": False,
            "structuredContent": {"result": f"I am {added[0]}"},
        }
    assert listener.done() and not client.listening


async def test_json_rpc_errors_and_ping(sdk_server: SdkServerFactory) -> None:
    async with McpClient(sdk_server(json=True)) as client:
        await client.ping()
        with pytest.raises(McpError) as caught:
            await client.request("no/such/method")
        assert caught.value.code == -32601
        assert caught.value.data == "no/such/method"
        failed = await client.call_tool("fail", {"message": "boom"})
        assert failed["isError"] is True


async def test_resources_prompts_and_cancel_notification(sdk_server: SdkServerFactory) -> None:
    async with McpClient(sdk_server()) as client:
        resources = await client.request("resources/list")
        assert [r["uri"] for r in resources["resources"]] == ["memo://greeting"]
        read = await client.request("resources/read", {"uri": "memo://greeting"})
        assert read["contents"][0]["text"] == "hello from the sdk server"
        prompts = await client.request("prompts/list")
        assert [p["name"] for p in prompts["prompts"]] == ["review"]
        prompt = await client.request("prompts/get", {"name": "review", "arguments": {"code": "x=1"}})
        assert prompt["messages"][0]["content"]["text"] == "Please review: x=1"
        await client.notify("notifications/cancelled", {"requestId": 999, "reason": "test"})
        assert (await client.call_tool("echo", {"text": "still fine"}))["isError"] is False


async def test_reinitializes_when_real_server_forgets_session(sdk_server: SdkServerFactory) -> None:
    url = sdk_server()
    async with McpClient(url) as client:
        old = client.session_id
        assert old is not None
        async with aiohttp.ClientSession() as other:  # someone else ends our session
            async with other.delete(url, headers={"Mcp-Session-Id": old}) as response:
                assert response.status == 200
        result = await client.call_tool("echo", {"text": "again"})
        assert result["content"][0]["text"] == "again"
        assert client.session_id not in (None, old)


async def test_timeout_against_real_server(sdk_server: SdkServerFactory) -> None:
    async with McpClient(sdk_server(json=True)) as client:
        started = time.monotonic()
        with pytest.raises(TransportError, match=r"tools/call to .* timed out after 0.2s"):
            await client.call_tool("sleep", {"seconds": 5}, timeout=0.2)
        assert time.monotonic() - started < 1
        await client.ping()  # the client is still usable


async def test_close_ends_real_session(sdk_server: SdkServerFactory) -> None:
    url = sdk_server()
    client = McpClient(url)
    await client.initialize()
    session_id = client.session_id
    await client.close()
    async with aiohttp.ClientSession() as other:
        headers = {
            "Mcp-Session-Id": str(session_id),
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": PROTOCOL_VERSION,
        }
        async with other.post(
            url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers=headers
        ) as response:
            assert response.status == 404


# -- wire details --------------------------------------------------------------------------


async def test_headers_and_request_ids(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp()
    async with McpClient(fake.url) as client:
        await client.ping()
        await client.call_tool("echo", {"x": 1})
    init, initialized, ping, call = (r for r in fake.requests if r.method == "POST")
    assert init.headers["Accept"] == "application/json, text/event-stream"
    assert init.headers["Content-Type"] == "application/json"
    assert "Mcp-Session-Id" not in init.headers
    for later in (initialized, ping, call):
        assert later.headers["Mcp-Session-Id"] == "session-1"
        assert later.headers["MCP-Protocol-Version"] == PROTOCOL_VERSION
        assert later.headers["Accept"] == "application/json, text/event-stream"
    assert all("Origin" not in r.headers for r in fake.requests)
    assert initialized.message == {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert [init.message["id"], ping.message["id"], call.message["id"]] == [1, 2, 3]
    assert call.message["params"] == {"name": "echo", "arguments": {"x": 1}}


async def test_sse_quirks_crlf_comments_priming_and_notifications(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(sse=True, line_end="\r\n", prelude=PRELUDE)
    default_inbox, call_inbox = Inbox(), Inbox()
    async with McpClient(fake.url, on_message=default_inbox) as client:
        result = await client.call_tool("echo", {"a": 1}, on_message=call_inbox)
        assert result == {"content": [{"type": "text", "text": '{"a": 1}'}], "isError": False}
        assert call_inbox.methods() == ["notifications/progress", "notifications/tools/list_changed"]
        assert default_inbox.messages == []
        assert (await client.request("ping")) == {}
        assert default_inbox.methods() == ["notifications/progress", "notifications/tools/list_changed"]


async def test_broken_on_message_does_not_fail_the_call(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(sse=True, prelude=PRELUDE)

    def broken(message: dict[str, Any]) -> None:
        raise RuntimeError("receiver bug")

    async with McpClient(fake.url) as client:
        assert (await client.call_tool("echo", {}, on_message=broken))["isError"] is False


def test_sse_decoder_handles_split_chunks() -> None:
    decoder = SseDecoder()
    stream = b': c\r\nid: 1\r\n\r\ndata: {"a":\r\ndata: 1}\r\n\r\nevent: message\ndata: [2]\n\n'
    events = [event for i in range(len(stream)) for event in decoder.feed(stream[i : i + 1])]
    assert events == [b'{"a":\n1}', b"[2]"]
    assert decoder.close() == []


# -- session expiry ------------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 400])
async def test_one_reinitialize_after_session_expiry(fake_mcp: FakeFactory, status: int) -> None:
    fake = await fake_mcp(expire_after=2, expire_status=status)
    async with McpClient(fake.url) as client:
        await client.ping()  # 1st request after notifications/initialized (which counted too)
        result = await client.call_tool("echo", {"n": 1})  # session-1 expires here
        assert result["content"][0]["text"] == '{"n": 1}'
        assert client.session_id == "session-2"
    assert len(fake.posted("initialize")) == 2
    retried = fake.posted("tools/call")
    assert [r.headers["Mcp-Session-Id"] for r in retried] == ["session-1", "session-2"]
    assert retried[0].message == retried[1].message


async def test_second_expiry_raises_session_expired(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(expire_after=1)  # notifications/initialized uses up each session
    async with McpClient(fake.url) as client:
        with pytest.raises(SessionExpired, match="HTTP 404"):
            await client.call_tool("echo", {})
    assert len(fake.posted("initialize")) == 2


async def test_concurrent_calls_share_one_reinitialize(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp()
    async with McpClient(fake.url) as client:
        fake.live_sessions.clear()  # the server restarts and forgets everything
        results = await asyncio.gather(*(client.call_tool("echo", {"i": i}) for i in range(5)))
        assert [r["content"][0]["text"] for r in results] == [f'{{"i": {i}}}' for i in range(5)]
    assert len(fake.posted("initialize")) == 2


# -- transport failures --------------------------------------------------------------------


async def test_connection_refused() -> None:
    url = refused_url()
    client = McpClient(url, timeout=2)
    with pytest.raises(TransportError, match=r"cannot connect to .*: Connection refused") as caught:
        await client.initialize()
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    await client.close()


async def test_hang_times_out(hang_url: str) -> None:
    client = McpClient(hang_url, timeout=0.1)
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"^initialize to .* timed out after 0.1s$"):
        await client.initialize()
    with pytest.raises(TransportError, match=r"^ping to .* timed out after 0.15s$"):
        await client.ping(timeout=0.15)
    await client.close()
    assert time.monotonic() - started < 1


async def test_connection_reset(reset_url: str) -> None:
    client = McpClient(reset_url, timeout=2)
    with pytest.raises(TransportError, match=r"^http://127.0.0.1:\d+/mcp reset the connection$"):
        async with client:
            pass
    assert client._http is None  # a failed __aenter__ still released the HTTP session


async def test_http_500(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp()
    async with McpClient(fake.url) as client:
        fake.status = 500
        with pytest.raises(TransportError, match="answered HTTP 500: Internal Server Error: it broke"):
            await client.call_tool("echo", {})


async def test_garbage_body(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp()
    async with McpClient(fake.url) as client:
        fake.garbage = True
        with pytest.raises(TransportError, match="not JSON: <html><body>502 Bad Gateway"):
            await client.request("tools/list")


@pytest.mark.parametrize(("cut", "message"), [("abort", "cut the response off"), ("eof", "ended the SSE")])
async def test_sse_cut_before_response(fake_mcp: FakeFactory, cut: str, message: str) -> None:
    fake = await fake_mcp(sse=True, prelude=PRELUDE[3:4], cut=cut)
    inbox = Inbox()
    async with McpClient(fake.url) as client:
        with pytest.raises(TransportError, match=message):
            await client.call_tool("echo", {}, on_message=inbox)
    assert inbox.methods() == ["notifications/progress"]


# -- quirks of real servers ----------------------------------------------------------------


async def test_brummer_like_server(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(brummer=True, sessions=False)
    async with McpClient(fake.url) as client:
        assert client.session_id is None
        assert client.server_info["name"] == "brummer"
        await client.ping()  # -32601 still means alive
        assert await client.call_tool("status", {"v": 1}) == {
            "content": [{"type": "text", "text": '{"ok": true, "echo": {"v": 1}}'}],
            "isError": False,
            "structuredContent": {"ok": True, "echo": {"v": 1}},
        }
        assert await client.call_tool("raw_list") == {
            "content": [{"type": "text", "text": "[1, 2, 3]"}],
            "isError": False,
        }
    assert all("Mcp-Session-Id" not in r.headers for r in fake.requests)
    assert fake.of_method("DELETE") == []  # no session, nothing to delete


async def test_json_rpc_error_becomes_mcp_error(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp()
    async with McpClient(fake.url) as client:
        with pytest.raises(McpError) as caught:
            await client.call_tool("fail", {})
    error = caught.value
    assert (error.code, error.message, error.data) == (-32602, "Invalid params", {"field": "x"})


async def test_pagination_across_three_pages(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(tool_pages=(("a", "b"), ("c",), ("d", "e")))
    async with McpClient(fake.url) as client:
        assert [tool["name"] for tool in await client.list_tools()] == ["a", "b", "c", "d", "e"]
    assert [r.message.get("params") for r in fake.posted("tools/list")] == [
        None,
        {"cursor": "page-1"},
        {"cursor": "page-2"},
    ]


async def test_pagination_cursor_loop_is_refused(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(tool_pages=(("a",), ("b",), ("c",)), loop_cursor=True)
    async with McpClient(fake.url) as client:
        with pytest.raises(TransportError, match="pagination loops"):
            await client.list_tools()
    assert len(fake.posted("tools/list")) == 3


async def test_old_protocol_version_is_accepted(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(version="2024-11-05")
    async with McpClient(fake.url) as client:
        assert client.protocol_version == "2024-11-05"
        await client.ping()
    assert fake.posted("initialize")[0].message["params"]["protocolVersion"] == "2025-11-25"
    assert fake.posted("ping")[0].headers["MCP-Protocol-Version"] == "2024-11-05"


async def test_unsupported_protocol_version_is_refused(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(version="1999-01-01")
    client = McpClient(fake.url)
    with pytest.raises(TransportError, match="speaks MCP protocol version '1999-01-01'"):
        await client.initialize()
    await client.close()
    assert fake.posted("notifications/initialized") == []
    assert [r.headers["Mcp-Session-Id"] for r in fake.of_method("DELETE")] == ["session-1"]


# -- standalone stream and close -------------------------------------------------------------


async def test_listen_returns_quietly_on_405(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp()
    async with McpClient(fake.url) as client:
        listener = client.listen()
        await asyncio.wait_for(listener, 1)
        assert listener.done() and listener.exception() is None
        assert not client.listening
    assert fake.of_method("GET")[0].headers["Mcp-Session-Id"] == "session-1"


async def test_listen_delivers_and_is_cancellable(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(get_stream=True)
    inbox = Inbox()
    async with McpClient(fake.url) as client:
        listener = client.listen(inbox)
        assert client.listen() is listener
        fake.push({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        await asyncio.wait_for(inbox.arrived.wait(), 1)
        assert client.listening
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener
        assert not client.listening
    assert inbox.messages == [{"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}]
    assert fake.of_method("GET")[0].headers["Accept"] == "text/event-stream"


async def test_close_deletes_session_and_releases_everything(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(get_stream=True)
    inbox = Inbox()
    client = McpClient(fake.url, on_message=inbox)
    await client.initialize()
    listener = client.listen()
    fake.push({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
    await asyncio.wait_for(inbox.arrived.wait(), 1)  # the GET stream is open
    http = client._http
    assert http is not None
    await client.close()
    assert listener.cancelled()
    assert [r.headers["Mcp-Session-Id"] for r in fake.of_method("DELETE")] == ["session-1"]
    assert http.closed and http.connector is None
    assert client._http is None
    for _ in range(100):  # the server notices closed sockets a moment later
        if all(t.is_closing() for t in fake.transports):
            break
        await asyncio.sleep(0.01)
    assert all(t.is_closing() for t in fake.transports)
    with pytest.raises(TransportError, match="closed"):
        await client.ping()
    await client.close()  # twice is fine


async def test_shared_http_session_is_left_open(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp()
    async with aiohttp.ClientSession() as shared:
        async with McpClient(fake.url, session=shared) as client:
            await client.ping()
        assert not shared.closed
        assert len(fake.of_method("DELETE")) == 1


async def test_close_does_not_wait_long_for_delete(fake_mcp: FakeFactory) -> None:
    fake = await fake_mcp(delete_hangs=True)
    client = McpClient(fake.url, timeout=0.1)
    await client.initialize()
    started = time.monotonic()
    await client.close()
    assert time.monotonic() - started < 0.5
    assert len(fake.of_method("DELETE")) == 1
