"""The npm reference server `server-everything`: it starts, and answers tools/list and a call the
same way directly (streamable HTTP and stdio) and through `fsm-hub serve --mcp`."""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client

from tests.e2e.lab import Instance, Lab, eventually, state_is
from tests.servers.everything import everything_stdio, spawn_everything_http

pytestmark = pytest.mark.e2e
HUB_TOOLS = {
    "instances_list", "instances_connect", "instances_disconnect",
    "instances_history", "instances_call", "hub_status",
}  # fmt: skip


async def _names_and_echo(client: Any) -> tuple[set[str], str]:
    names = {tool.name for tool in (await client.list_tools()).tools}
    echoed = await client.call_tool("echo", {"message": "through every path"})
    assert not echoed.is_error, echoed.content
    return names, echoed.content[0].text


async def test_server_everything_answers_directly_and_through_the_hub(lab: Lab) -> None:
    process, url = spawn_everything_http(lab.root / "everything.log")
    lab.processes.append(process)
    async with Client(url) as direct:
        over_http = await _names_and_echo(direct)
    async with Client(everything_stdio()) as direct:
        over_stdio = await _names_and_echo(direct)
    assert {"echo", "get-sum"} <= over_http[0]
    assert over_stdio == over_http

    lab.announce(Instance("evr001", "everything", process, url))
    async with Client(lab.hub()) as hub:
        await eventually(lambda: state_is(hub, "everything", "active"))
        bound = await hub.call_tool("instances_connect", {"instance_id": "everything"})
        assert not bound.is_error, bound.content
        names, echoed = await _names_and_echo(hub)
    assert names == HUB_TOOLS | over_http[0]
    assert echoed == over_http[1]
