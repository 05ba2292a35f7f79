"""`fsm-hub serve --http`: a tool call whose SSE stream drops is resumed with `Last-Event-ID`,
and the client gets the rest and the answer — as it does from the SDK server with an event store."""

from __future__ import annotations

import aiohttp
import pytest

from fsm_hub.mcp.protocol import instance_url
from tests.e2e.lab import Lab, eventually
from tests.e2e.test_serve_http import free_port, serve_http
from tests.servers.launch import spawn_sdk_server
from tests.transports.resuming import INIT, dropped_call
from tests.transports.test_http import ACCEPT

pytestmark = pytest.mark.e2e


async def test_a_dropped_tool_call_stream_resumes_through_the_hub_as_from_the_sdk_server(lab: Lab) -> None:
    lab.start("5e0001", "gate")
    port = free_port()
    direct_process, direct_url = spawn_sdk_server(lab.root / "direct.log", event_store=True)
    lab.processes.append(direct_process)
    async with serve_http(lab, port), aiohttp.ClientSession() as http:
        url = instance_url(f"http://127.0.0.1:{port}/mcp", "gate")

        async def active() -> bool:
            try:
                async with http.post(url, json=INIT, headers=ACCEPT) as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(active)
        through_hub, hub_ids = await dropped_call(http, url, "k")
        direct, direct_ids = await dropped_call(http, direct_url, "k")
    assert through_hub == direct
    progress = [m["params"] for m in direct if m.get("method") == "notifications/progress"]
    assert progress == [
        {"progressToken": "resume", "progress": 1.0, "total": 2.0, "message": "waiting"},
        {"progressToken": "resume", "progress": 2.0, "total": 2.0, "message": "opened"},
    ]
    assert direct[-1]["result"]["content"] == [{"type": "text", "text": "gate k passed"}]
    assert hub_ids == ["p1-1", "p1-2", "p1-3"] and len(direct_ids) == 3
