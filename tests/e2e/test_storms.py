"""Hostile instances against a real `fsm-hub serve --mcp`: a list_changed storm and a garbage tool
list. The hub keeps supervising and serving; the log records only what happened.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, ClientSession
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from fsm_hub.mcp.upstream import McpClient
from tests.e2e.lab import Lab, all_active, eventually, state_is, transitions
from tests.servers.faults import GARBAGE_TOOLS

HUB_TOOLS = {
    "instances_list", "instances_connect", "instances_disconnect",
    "instances_history", "instances_call", "hub_status",
}  # fmt: skip
DETECTION_BOUND = 5.0
"""Seconds within which a killed, unannounced instance must be recorded lost or removed with the
lab's timing (pings every 0.2 s, 0.3 s timeout, 2 misses; discovery watching the directory)."""


async def test_a_storming_instance_is_coalesced_and_its_death_recorded_in_time(lab: Lab) -> None:
    lab.start("c01dbeef", "web")
    storm = lab.start_fault("5702a000", "storm", "storm")
    async with Client(lab.hub()) as client:
        await eventually(lambda: all_active(client, {"web", "storm"}))
        await asyncio.sleep(2.0)  # let it storm: the hub has been told thousands of times by now

        # The hub keeps serving while the storm goes on: its own tools answer at once.
        started = time.perf_counter()
        for _ in range(5):
            assert await all_active(client, {"web", "storm"})
            added = await client.call_tool(
                "instances_call", {"instance_id": "web", "tool": "add", "arguments": {"a": 2, "b": 40}}
            )
            assert added.structured_content == {"result": 42}
        assert (time.perf_counter() - started) / 5 < 0.5

        storm.process.kill()
        storm.process.wait()
        (lab.instances_dir / f"{storm.id}.json").unlink()
        killed = time.perf_counter()
        await eventually(lambda: state_is(client, "storm", "dead"), timeout=DETECTION_BOUND)
        assert time.perf_counter() - killed < DETECTION_BOUND
        assert await state_is(client, "web", "active")

    recorded = transitions(lab, "storm")
    events = [event for event, *_ in recorded]
    assert events[:2] == ["connect", "connected"]
    assert "lost" in events or "remove" in events
    assert recorded[-1][2] == "dead"
    assert [(e, f, t) for e, f, t, _ in transitions(lab, "web")] == [
        ("connect", "discovered", "connecting"),
        ("connected", "connecting", "active"),
    ]  # the healthy neighbour was never recorded otherwise


async def test_a_garbage_tool_list_is_contained_through_the_hub(lab: Lab) -> None:
    junk = lab.start_fault("6a4bace0", "junk", "garbage-tools")
    errlog = lab.root / "hub-stderr.log"
    with errlog.open("w") as stderr:
        async with (
            stdio_client(lab.hub(), errlog=stderr) as (read, write),
            ClientSession(read, write) as client,
        ):
            await client.initialize()
            await eventually(lambda: all_active(client, {"junk"}))
            connected = await client.call_tool("instances_connect", {"instance_id": "junk"})
            assert not connected.is_error, connected.content
            assert connected.structured_content is not None
            assert connected.structured_content["tools"] == ["echo"]

            listed = {t.name for t in (await client.list_tools()).tools}  # the SDK validates it
            assert listed == HUB_TOOLS | {"echo"}
            echoed = await client.call_tool("echo", {"text": "still here"})
            assert not echoed.is_error and json.loads(echoed.content[0].text) == {"text": "still here"}
            status = await client.call_tool("hub_status", {})
            assert not status.is_error

            # Asked again (a reconnect or a refresh), the list is cleaned again, said once only.
            await client.call_tool("instances_disconnect", {})
            await client.call_tool("instances_connect", {"instance_id": "junk"})
            assert {t.name for t in (await client.list_tools()).tools} == HUB_TOOLS | {"echo"}
    warnings = [line for line in errlog.read_text().splitlines() if "invalid tool" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"instance {junk.id} listed 6 invalid tool entries")
    assert "Traceback" not in errlog.read_text()
    assert [e for e, *_ in transitions(lab, "junk")] == ["connect", "connected"]


async def test_the_same_garbage_tool_list_directly_from_the_peer(lab: Lab, tmp_path: Path) -> None:
    """Directly, the raw list holds the garbage and the usable tool answers as through the hub
    (our own client shows both); the SDK client, given the raw list, refuses it and its session."""
    junk = lab.start_fault("6a4bace0", "junk", "garbage-tools")
    async with McpClient(junk.url) as raw:
        assert await raw.list_tools() == GARBAGE_TOOLS
        answer: dict[str, Any] = await raw.call_tool("echo", {"text": "still here"})
        assert json.loads(answer["content"][0]["text"]) == {"text": "still here"}

    with pytest.raises(BaseException) as refused:  # the SDK wraps it in groups
        async with (
            streamable_http_client(junk.url) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            # The SDK lists the tools before a call (for output schemas): refused, list and call.
            await session.call_tool("echo", {"text": "still here"})
    assert "6 validation errors for ListToolsResult" in str(refused.getrepr())
