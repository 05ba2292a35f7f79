"""A client's side of SSE resumption, for tests: read events with their ids, drop, resume.

`dropped_call` is the scenario run through the hub and directly against the SDK server: the
same code, so the same outcome can be asserted.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp

PROTOCOL = "2025-11-25"
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
WAIT = 10.0
PRIMING = re.compile(rb"(^|\n)data: ?\r?\n\r?\n")
"""An SSE event without data, in a chunk of an HTTP body."""


async def next_event(response: aiohttp.ClientResponse) -> dict[str, str] | None:
    """The next SSE event's fields (``id``, ``retry``, ``data``…), None once the body ends."""

    async def read() -> dict[str, str] | None:
        fields: dict[str, str] = {}
        while True:
            raw = await response.content.readline()
            if not raw:
                return fields or None
            line = raw.decode().rstrip("\r\n")
            if not line:
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value

    return await asyncio.wait_for(read(), WAIT)


def message_of(event: dict[str, str]) -> Any:
    """The JSON-RPC message an event carries, None for a priming event (no data)."""
    data = event.get("data", "")
    return json.loads(data) if data else None


async def open_session(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    """initialize + initialized at 2025-11-25; the headers of the new session."""
    async with http.post(url, json=INIT, headers=ACCEPT) as response:
        assert response.status == 200, await response.text()
        headers = {
            **ACCEPT,
            "Mcp-Session-Id": response.headers["Mcp-Session-Id"],
            "MCP-Protocol-Version": PROTOCOL,
        }
        await response.read()
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(url, json=initialized, headers=headers) as response:
        assert response.status == 202
    return headers


async def answer_of(response: aiohttp.ClientResponse) -> Any:
    """A POST's answer, whether plain JSON or the last event of an SSE stream."""
    if response.headers["Content-Type"].startswith("application/json"):
        return await response.json()
    answer = None
    while (event := await next_event(response)) is not None:
        message = message_of(event)
        if isinstance(message, dict) and "id" in message:
            answer = message
    return answer


def tool_call(
    name: str, arguments: dict[str, Any], request_id: Any, token: str | None = None
) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    if token is not None:
        params["_meta"] = {"progressToken": token}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


async def call(http: aiohttp.ClientSession, url: str, headers: dict[str, str], message: Any) -> Any:
    async with http.post(url, json=message, headers=headers) as response:
        assert response.status == 200, await response.text()
        return await answer_of(response)


async def dropped_call(http: aiohttp.ClientSession, url: str, key: str) -> tuple[list[Any], list[str]]:
    """Call the SDK server's `gated` tool, drop its stream after the priming event, resume it.

    The gate opens once the resumed GET is open. A GET that ends before the answer (the SDK
    ends a replay whose stream it still holds) is reopened after the last id seen, as a client
    does. The messages after the priming event, and the ids of the events that carried them.
    """
    headers = await open_session(http, url)
    gated = tool_call("gated", {"key": key}, "g", token="resume")
    async with http.post(url, json=gated, headers=headers) as post:
        assert post.status == 200 and post.headers["Content-Type"].startswith("text/event-stream")
        priming = await next_event(post)
        assert priming is not None and message_of(priming) is None and priming.get("id"), priming
        post.close()  # the connection drops; the call goes on
    last_id = priming["id"]
    messages: list[Any] = []
    ids: list[str] = []
    opened = False
    for _ in range(50):
        async with http.get(url, headers={**headers, "Last-Event-ID": last_id}) as get:
            assert get.status == 200 and get.headers["Content-Type"].startswith("text/event-stream")
            if not opened:
                opened = True
                gate = await call(http, url, headers, tool_call("open_gate", {"key": key}, "o"))
                assert gate["result"]["content"][0]["text"] == f"opened {key}"
            while (event := await next_event(get)) is not None:
                last_id = event.get("id", last_id)
                message = message_of(event)
                if message is None:
                    continue
                messages.append(message)
                ids.append(event.get("id", ""))
                if message.get("id") == "g":
                    return messages, ids
    raise AssertionError(f"no answer after 50 GETs; got {messages}")


class CuttingProxy:
    """A TCP proxy that drops the connection carrying a call of ``tool`` once the server has
    sent that call's priming event (an event with no data): a dropped SSE stream, no timer."""

    def __init__(self, upstream_port: int, tool: str) -> None:
        self.upstream_port = upstream_port
        self.marker = f'"name":"{tool}"'.encode()
        self.cut = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        calls = [False]

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, upward: bool) -> None:
            while chunk := await source.read(65536):
                if upward and self.marker in chunk.replace(b" ", b""):
                    calls[0] = True
                if not upward and calls[0] and not self.cut.is_set() and PRIMING.search(chunk):
                    self.cut.set()  # the client gets what came with the priming event, then nothing
                    sink.write(chunk)
                    await sink.drain()
                    sink.transport.abort()  # type: ignore[attr-defined]
                    up_writer.transport.abort()  # type: ignore[attr-defined]
                    return
                sink.write(chunk)
                await sink.drain()
            sink.close()

        try:
            await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()  # type: ignore[attr-defined]
            up_writer.transport.abort()  # type: ignore[attr-defined]
            self._tasks.discard(task)
