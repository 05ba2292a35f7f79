"""StdioClient against real stdio servers: the SDK's, our light one, and our fault servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from fsm_hub.errors import TransportError
from fsm_hub.mcp.stdio_upstream import (
    STDERR_BYTES,
    STDERR_LINES,
    StderrTail,
    StdioClient,
    child_environment,
    end_orphan,
    process_identity,
)
from tests.servers.everything import everything_stdio

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SERVER = str(REPO / "tests" / "servers" / "stdio_server.py")
Make = Callable[..., Awaitable[StdioClient]]


@pytest.fixture
async def stdio() -> AsyncIterator[Make]:
    """``await stdio(mode, n, **client_options)``: an initialized StdioClient on stdio_server.py."""
    clients: list[StdioClient] = []

    async def make(
        mode: str = "light", n: int | None = None, *, initialize: bool = True, **options: Any
    ) -> StdioClient:
        args = ["-S", SERVER, mode, *([str(n)] if n is not None else [])]
        options.setdefault("timeout", 10.0)
        options.setdefault("grace", 2.0)
        client = StdioClient(sys.executable, args, name=f"stdio-{mode}", **options)
        clients.append(client)
        if initialize:
            await client.initialize()
        return client

    yield make
    for client in clients:
        await client.close()


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- a well-behaved server ---------------------------------------------------------------------


async def test_handshake_tools_calls_and_ping_against_the_light_server(stdio: Make) -> None:
    client = await stdio()
    assert client.protocol_version == "2025-11-25"
    assert client.server_info == {"name": "stdio-test-server", "version": "0.1"}
    assert client.session_id is None
    assert "echo" in {t["name"] for t in await client.list_tools()}
    assert await client.call_tool("echo", {"text": "hi"}) == {
        "content": [{"type": "text", "text": "hi"}],
        "isError": False,
    }
    await client.ping()
    assert repr(client).startswith(f"<StdioClient stdio-light pid={client.pid} running")


async def test_concurrent_calls_get_their_own_answers(stdio: Make) -> None:
    client = await stdio()
    results = await asyncio.gather(*(client.call_tool("add", {"a": i, "b": 1}) for i in range(50)))
    assert [r["content"][0]["text"] for r in results] == [str(i + 1) for i in range(50)]


async def test_close_ends_the_process_by_closing_stdin(stdio: Make) -> None:
    client = await stdio()
    pid = client.pid
    assert pid is not None
    await client.close()
    assert client.returncode == 0 and not alive(pid)
    with pytest.raises(TransportError, match="is closed"):
        await client.ping()
    assert "closed" in repr(client)


async def test_progress_goes_to_the_call_and_server_requests_are_answered(stdio: Make) -> None:
    client = await stdio()
    seen: list[dict[str, Any]] = []
    result = await client.call_tool(
        "progress", {"steps": 3}, meta={"progressToken": "t1"}, on_message=seen.append
    )
    assert result["content"][0]["text"] == "done after 3 steps"
    assert [m["params"]["progress"] for m in seen] == [1, 2, 3]

    asked: list[dict[str, Any]] = []
    result = await client.call_tool("ask", on_message=asked.append)
    assert [m["method"] for m in asked] == ["ping"]  # the call in flight saw the server's request
    assert json.loads(result["content"][0]["text"]) == {"jsonrpc": "2.0", "id": "server-1", "result": {}}


async def test_a_batch_on_stdout_is_its_messages_in_order(stdio: Make) -> None:
    client = await stdio()
    heard: list[dict[str, Any]] = []
    client.listen(heard.append)
    assert (await client.call_tool("batch"))["content"][0]["text"] == "batched"
    assert [m["method"] for m in heard] == ["notifications/message"]


async def test_notifications_no_call_claims_go_to_the_listener(stdio: Make) -> None:
    client = await stdio()
    heard: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    listener = client.listen(heard.put_nowait)
    assert client.listen(heard.put_nowait) is listener
    await client.call_tool("changed")
    assert (await asyncio.wait_for(heard.get(), 5))["method"] == "notifications/tools/list_changed"
    await client.close()
    await asyncio.wait_for(listener, 5)  # ends quietly with the server

    again = await stdio()
    cancelled = again.listen(heard.put_nowait)
    cancelled.cancel()  # before it ever ran: the receiver goes all the same
    await asyncio.gather(cancelled, return_exceptions=True)
    await again.call_tool("changed")
    assert heard.empty()


async def test_the_child_gets_the_configured_env_over_a_minimal_one_and_the_cwd(
    stdio: Make, tmp_path: Path
) -> None:
    inherited = {
        "PATH": os.environ["PATH"],
        "HOME": "/home/hub",
        "HUB_SECRET": "do-not-pass",
        "LANG": "C.UTF-8",
    }
    client = await stdio(
        env={"API_KEY": "k", "HOME": "/home/server"}, cwd=str(tmp_path), inherited_env=inherited
    )
    seen = json.loads((await client.call_tool("env"))["content"][0]["text"])
    assert seen["cwd"] == str(tmp_path)
    assert seen["env"]["API_KEY"] == "k" and seen["env"]["HOME"] == "/home/server"
    assert seen["env"]["LANG"] == "C.UTF-8"
    assert "HUB_SECRET" not in seen["env"]
    assert child_environment({"A": "1"}, {"PATH": "/bin", "X": "y"}) == {"PATH": "/bin", "A": "1"}


# --- the SDK's stdio server, and the SDK client as the reference ------------------------------


async def test_the_sdk_stdio_server_answers_us_as_it_answers_the_sdk_client() -> None:
    args = ["-m", "tests.servers.sdk_stdio_server"]
    async with StdioClient(sys.executable, args, cwd=str(REPO), name="sdk", timeout=30) as ours:
        tools = {t["name"] for t in await ours.list_tools()}
        echoed = await ours.call_tool("echo", {"text": "same"})
        failed = await ours.call_tool("fail", {"message": "boom"})
        steps: list[dict[str, Any]] = []
        await ours.call_tool("progress", {"steps": 2}, meta={"progressToken": 7}, on_message=steps.append)
        await ours.ping()
    assert ours.server_info["name"] == "sdk-test-server"

    params = StdioServerParameters(command=sys.executable, args=args, cwd=str(REPO))
    async with Client(params) as sdk:
        sdk_tools = {t.name for t in (await sdk.list_tools()).tools}
        sdk_echoed = (await sdk.call_tool("echo", {"text": "same"})).model_dump(
            by_alias=True, exclude_none=True
        )
        sdk_failed = (await sdk.call_tool("fail", {"message": "boom"})).model_dump(
            by_alias=True, exclude_none=True
        )
    assert tools == sdk_tools
    assert echoed["content"] == sdk_echoed["content"] and echoed["isError"] is sdk_echoed["isError"] is False
    assert failed["isError"] is sdk_failed["isError"] is True
    assert failed["content"][0]["text"] == sdk_failed["content"][0]["text"]
    assert [m["params"]["progress"] for m in steps] == [1, 2]


# --- fault servers ---------------------------------------------------------------------------


async def test_a_server_that_exits_mid_call_fails_it_with_its_code_and_stderr(stdio: Make) -> None:
    client = await stdio("exit-after", 2)
    for _ in range(2):
        await client.call_tool("echo", {"text": "ok"})
    with pytest.raises(TransportError) as caught:
        await client.call_tool("echo", {"text": "dies"})
    message = str(caught.value)
    assert f"stdio-exit-after (pid {client.pid}) exited with code 3" in message
    assert "stderr: exiting after 2 calls" in message
    with pytest.raises(TransportError) as again:
        await client.ping()
    assert str(again.value) == message
    assert client.failure is not None and "failed" in repr(client)


async def test_a_server_that_exits_at_start_says_why(stdio: Make) -> None:
    with pytest.raises(TransportError) as caught:
        await stdio("exit-at-start")
    message = str(caught.value)
    assert "exited with code 2" in message
    assert message.endswith("stderr: starting | fatal: cannot open the database")


async def test_garbage_on_stdout_is_a_transport_error(stdio: Make) -> None:
    client = await stdio("garbage")
    with pytest.raises(TransportError, match="not JSON-RPC on stdout: Traceback"):
        await client.call_tool("echo", {"text": "x"})
    pid = client.pid
    assert pid is not None
    await client.close()
    assert not alive(pid)


async def test_a_server_that_never_answers_initialize_times_out(stdio: Make) -> None:
    client = await stdio("no-initialize", initialize=False)
    with pytest.raises(TransportError, match=r"initialize to stdio-no-initialize timed out after 0\.2s"):
        await client.initialize(timeout=0.2)


async def test_a_server_that_ignores_sigterm_is_killed_after_the_grace_period(stdio: Make) -> None:
    """The grace periods run on the injected clock: the first (after closing stdin) is over at
    once, the second once the server has said it ignores SIGTERM."""
    graces: list[float] = []
    client: StdioClient | None = None

    async def sleep(seconds: float) -> None:
        graces.append(seconds)
        if len(graces) == 2:
            assert client is not None
            # stderr has no event to wait on; close() is bounded by wait_for below
            while "got SIGTERM, ignoring it" not in client.stderr.text():  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    client = await stdio("ignore-sigterm", sleep=sleep, grace=1.5)
    pid = client.pid
    assert pid is not None
    await asyncio.wait_for(client.close(), 10)
    assert client.returncode == -9 and graces == [1.5, 1.5]
    assert not alive(pid)


async def test_a_server_flooding_stderr_never_blocks_and_its_tail_stays_bounded(stdio: Make) -> None:
    client = await stdio("flood-stderr", 8)
    for _ in range(3):
        await client.call_tool("echo", {"text": "still here"})
    tail = client.stderr.text()
    assert tail.endswith("flood done")
    assert len(tail.encode()) <= STDERR_BYTES + 3 * STDERR_LINES
    assert tail.count(" | ") < STDERR_LINES


async def test_a_missing_command_is_one_clear_error(tmp_path: Path) -> None:
    client = StdioClient(str(tmp_path / "no-such-server"), ["--token", "SECRET"], name="ghost")
    with pytest.raises(TransportError) as caught:
        await client.initialize()
    assert (
        str(caught.value) == f"cannot start ghost: No such file or directory: {tmp_path / 'no-such-server'}"
    )
    assert "SECRET" not in str(caught.value)
    await client.close()


async def test_close_stops_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    script = f"sleep 300 & echo $! > {pidfile}; exec {sys.executable} -S {SERVER} ignore-sigterm"
    async with StdioClient("/bin/sh", ["-c", script], grace=0.05) as client:
        grandchild = int(pidfile.read_text())
        assert alive(grandchild)
    assert client.returncode == -9
    for _ in range(100):  # reaped by init in its own time
        if not alive(grandchild):
            break
        await asyncio.sleep(0.01)
    assert not alive(grandchild)


# --- the stderr tail -----------------------------------------------------------------------------


def test_the_stderr_tail_keeps_the_last_lines_within_its_bounds() -> None:
    tail = StderrTail()
    for i in range(100):
        tail.feed(f"line {i}\n".encode())
    assert tail.text() == " | ".join(f"line {i}" for i in range(80, 100))
    tail.feed(b"x" * 10_000 + b"\npartial")
    text = tail.text()
    assert text.endswith("partial") and len(text) <= STDERR_BYTES + 3 * STDERR_LINES
    tail.feed(b"\xff\xfe broken utf-8\n")
    assert tail.text().endswith("\ufffd\ufffd broken utf-8")


# --- orphans of a hub that was killed ----------------------------------------------------------


async def test_an_orphan_still_ours_is_ended_and_a_reused_pid_is_left_alone(stdio: Make) -> None:
    client = await stdio("ignore-sigterm")
    pid, identity = client.pid, client.identity
    assert pid is not None and identity is not None and process_identity(pid) == identity
    assert not await end_orphan(pid, identity + "0")  # another process under that pid: not ours
    assert alive(pid)

    async def instant(seconds: float) -> None:
        await asyncio.sleep(0)

    assert await end_orphan(pid, identity, grace=1.0, sleep=instant)
    assert await asyncio.wait_for(client.wait(), 5) == -9
    assert not await end_orphan(pid, identity)  # gone: nothing to do


async def test_a_server_killed_by_a_signal_names_it(stdio: Make) -> None:
    client = await stdio()
    assert client.pid is not None
    os.kill(client.pid, signal.SIGKILL)
    with pytest.raises(TransportError) as caught:
        await client.ping()
    assert str(caught.value) == f"stdio-light (pid {client.pid}) was killed by SIGKILL; no stderr"


async def test_server_everything_over_stdio_answers_us_as_it_answers_the_sdk_client() -> None:
    params = everything_stdio()
    async with StdioClient(params.command, params.args, name="everything", timeout=60) as ours:
        tools = {t["name"] for t in await ours.list_tools()}
        echoed = await ours.call_tool("echo", {"message": "same"})
        summed = await ours.call_tool("get-sum", {"a": 2, "b": 3})
        await ours.ping()
    async with Client(params) as sdk:
        sdk_tools = {t.name for t in (await sdk.list_tools()).tools}
        sdk_echoed = (await sdk.call_tool("echo", {"message": "same"})).model_dump(
            by_alias=True, exclude_none=True
        )
        sdk_summed = (await sdk.call_tool("get-sum", {"a": 2, "b": 3})).model_dump(
            by_alias=True, exclude_none=True
        )
    assert tools == sdk_tools and {"echo", "get-sum"} <= tools
    assert echoed["content"] == sdk_echoed["content"]
    assert summed["content"] == sdk_summed["content"]
    assert ours.returncode is not None
