"""The stdio server byte for byte: error codes, negotiation, shutdown, cancellation, progress."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.e2e.lab import FSM_HUB, Lab, eventually


class RawHub:
    """`fsm-hub serve --mcp` as a subprocess spoken to in raw JSON lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stdout_lines: list[bytes] = []
        self.messages: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, lab: Lab, *extra: str) -> RawHub:
        process = await asyncio.create_subprocess_exec(
            FSM_HUB, "serve", "--mcp", "--db", str(lab.db), "--instances-dir", str(lab.instances_dir),
            "--ping-interval", "0.2", *extra,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,  # answers of several MB are one line each
        )  # fmt: skip
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.stdout_lines.append(line)
            self.messages.append(json.loads(line))  # stdout is protocol only: every line parses
            self._arrived.set()

    def send_raw(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)

    def send(self, message: dict[str, Any]) -> None:
        self.send_raw(json.dumps(message).encode() + b"\n")

    async def answer(self, request_id: Any, timeout: float = 10.0) -> dict[str, Any]:
        async def find() -> dict[str, Any]:
            while True:
                for message in self.messages:
                    if (
                        isinstance(message, dict)
                        and message.get("id") == request_id
                        and "method" not in message
                    ):
                        return message
                self._arrived.clear()
                await self._arrived.wait()

        return await asyncio.wait_for(find(), timeout)

    async def request(self, request_id: Any, method: str, params: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return await self.answer(request_id)

    async def initialize(self, version: str = "2025-11-25") -> dict[str, Any]:
        params = {
            "protocolVersion": version,
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"},
        }
        answer = await self.request("init", "initialize", params)
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return answer

    async def all_active(self) -> bool:
        """Whether every instance the hub lists is active (and there is at least one)."""
        listed = await self.request(
            f"list-{len(self.messages)}", "tools/call", {"name": "instances_list", "arguments": {}}
        )
        found = listed["result"]["structuredContent"]["instances"]
        return bool(found) and all(i["state"] == "active" for i in found)

    async def close(self) -> tuple[int, str]:
        assert self.process.stdin is not None
        self.process.stdin.close()
        code = await asyncio.wait_for(self.process.wait(), 15)
        await self._reader
        assert self.process.stderr is not None
        return code, (await self.process.stderr.read()).decode()


@pytest.fixture
async def raw(lab: Lab) -> AsyncIterator[RawHub]:
    hub = await RawHub.start(lab)
    yield hub
    if hub.process.returncode is None:
        hub.process.kill()
        await hub.process.wait()


def error_code(answer: dict[str, Any]) -> int:
    return int(answer["error"]["code"])


async def test_unparsable_line_is_32700_and_the_server_keeps_serving(raw: RawHub) -> None:
    raw.send_raw(b"{this is not json\n")
    assert error_code(await raw.answer(None)) == -32700
    assert (await raw.request(1, "ping"))["result"] == {}
    raw.send_raw(b"\xff\xfe garbage bytes\n")
    assert (await raw.request(2, "ping"))["result"] == {}
    parse_errors = [m["error"]["code"] for m in raw.messages if m.get("id") is None]
    assert parse_errors == [-32700, -32700]


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "2.0", "id": 7},
        {"jsonrpc": "1.0", "id": 7, "method": "ping"},
        {"jsonrpc": "2.0", "id": 7, "method": 42},
        {"id": 7, "method": "ping"},
    ],
)
async def test_invalid_request_is_32600(raw: RawHub, message: dict[str, Any]) -> None:
    raw.send(message)
    answer = await raw.answer(7)
    assert error_code(answer) == -32600


async def test_non_object_messages_are_32600(raw: RawHub) -> None:
    raw.send_raw(b"[1, 2]\n")
    await eventually(lambda: len(raw.messages) >= 1, 5)
    batch = raw.messages[0]  # a batch of two invalid requests is answered as a batch
    assert isinstance(batch, list) and [(m["id"], error_code(m)) for m in batch] == [(None, -32600)] * 2
    raw.send_raw(b'"just a string"\n')
    assert error_code(await raw.answer(None)) == -32600


@pytest.mark.parametrize("method", ["server/discover", "some/unknown", "tasks/unknown"])
async def test_unknown_method_is_32601(raw: RawHub, method: str) -> None:
    assert error_code(await raw.request(3, method, {})) == -32601


async def test_server_discover_before_initialize_then_fallback(raw: RawHub) -> None:
    assert error_code(await raw.request(1, "server/discover", {})) == -32601
    answer = await raw.initialize()
    assert answer["result"]["protocolVersion"] == "2025-11-25"


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("tools/call", {}),
        ("tools/call", {"name": 5}),
        ("tools/call", {"name": "echo", "arguments": [1, 2]}),
        ("tools/call", {"name": "no_such_tool", "arguments": {}}),
        ("tools/list", {"cursor": "not-a-cursor"}),
        ("initialize", {"capabilities": {}}),
        ("resources/read", {"uri": "memo://x"}),
    ],
)
async def test_bad_params_are_32602(raw: RawHub, method: str, params: dict[str, Any]) -> None:
    if method != "initialize":
        await raw.initialize()
    assert error_code(await raw.request(4, method, params)) == -32602


async def test_params_that_are_not_an_object_are_32602(raw: RawHub) -> None:
    await raw.initialize()
    raw.send({"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": [1]})
    assert error_code(await raw.answer(5)) == -32602


@pytest.mark.parametrize(
    ("asked", "agreed"),
    [
        ("2025-11-25", "2025-11-25"),
        ("2025-06-18", "2025-06-18"),
        ("2025-03-26", "2025-03-26"),
        ("2024-11-05", "2024-11-05"),
        ("2023-01-01", "2025-11-25"),
        ("2026-07-28", "2025-11-25"),
    ],
)
async def test_version_negotiation(raw: RawHub, asked: str, agreed: str) -> None:
    answer = await raw.initialize(asked)
    assert answer["result"]["protocolVersion"] == agreed
    assert answer["result"]["capabilities"]["tools"] == {"listChanged": True}


async def test_tools_list_pages_with_a_cursor_and_every_name_is_valid(raw: RawHub) -> None:
    await raw.initialize()
    page = (await raw.request(1, "tools/list", {}))["result"]
    assert "nextCursor" not in page
    assert all(len(t["name"]) <= 64 and t["name"].replace("_", "").replace("-", "").isalnum()
               for t in page["tools"])  # fmt: skip
    assert all(t["inputSchema"]["type"] == "object" for t in page["tools"])
    call = next(t for t in page["tools"] if t["name"] == "instances_call")
    assert call["inputSchema"]["properties"]["arguments"]["type"] == "object"
    empty = (await raw.request(2, "tools/list", {"cursor": str(len(page["tools"]))}))["result"]
    assert empty == {"tools": []}


async def test_stdin_eof_stops_cleanly(lab: Lab, raw: RawHub) -> None:
    await raw.initialize()
    code, stderr = await raw.close()
    assert code == 0
    assert "Traceback" not in stderr
    events = [e["type"] for e in json.loads(lab.cli("history", "hub", "--json").stdout)]
    assert events == ["hub_started", "hub_stopped"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signals_stop_cleanly_and_delete_instance_sessions(
    lab: Lab, signum: signal.Signals, fake_mcp: Any
) -> None:
    fake = await fake_mcp()
    port = int(fake.url.rsplit(":", 1)[1].split("/")[0])
    (lab.instances_dir / "fake1.json").write_text(json.dumps(
        {"id": "fake1", "name": "fake", "directory": "/", "port": port, "url": fake.url}
    ))  # fmt: skip
    hub = await RawHub.start(lab)
    await hub.initialize()

    await eventually(hub.all_active)
    assert fake.live_sessions
    hub.process.send_signal(signum)
    code = await asyncio.wait_for(hub.process.wait(), 15)
    assert code == 0
    assert not fake.live_sessions  # the hub DELETEd its session on the way out
    assert [e["type"] for e in json.loads(lab.cli("history", "hub", "--json").stdout)] == [
        "hub_started",
        "hub_stopped",
    ]
    assert lab.cli("replay", "--verify").returncode == 0


async def test_cancellation_and_progress_pass_through(lab: Lab) -> None:
    instance = lab.start("slow1", "slow")
    hub = await RawHub.start(lab)
    try:
        await hub.initialize()

        await eventually(hub.all_active)
        await hub.request(
            "c", "tools/call", {"name": "instances_connect", "arguments": {"instance_id": "slow"}}
        )

        progress = await hub.request(
            "p", "tools/call",
            {"name": "progress", "arguments": {"steps": 3}, "_meta": {"progressToken": "tok-1"}},
        )  # fmt: skip
        assert progress["result"]["content"][0]["text"] == "done after 3 steps"
        relayed = [m for m in hub.messages if m.get("method") == "notifications/progress"]
        assert [m["params"]["progress"] for m in relayed] == [1, 2, 3]
        assert {m["params"]["progressToken"] for m in relayed} == {"tok-1"}

        hub.send({"jsonrpc": "2.0", "id": "s", "method": "tools/call",
                  "params": {"name": "sleep", "arguments": {"seconds": 30}}})  # fmt: skip
        await asyncio.sleep(0.2)  # let the call reach the instance
        hub.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "s"}})
        # cancelled: no answer for "s"; the session keeps serving
        assert (await hub.request("after", "ping"))["result"] == {}
        with pytest.raises(TimeoutError):
            await hub.answer("s", timeout=0.5)
        code, stderr = await hub.close()
        assert code == 0 and "Traceback" not in stderr
    finally:
        if hub.process.returncode is None:
            hub.process.kill()
    log = (lab.root / "slow1-0.log").read_text()
    assert instance.process.poll() is None
    assert "Traceback" not in log
