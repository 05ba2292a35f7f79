"""Several `fsm-hub serve --mcp` on one log: one owns it, the others attach and take over."""

from __future__ import annotations

import json
import os
import signal
from contextlib import AsyncExitStack

import pytest
from mcp import Client

from tests.e2e.lab import Lab, eventually, states


async def _owner_pid(lab: Lab) -> int:
    info = lab.db.with_name(lab.db.name + ".owner.json")
    return int(json.loads(info.read_text())["pid"])


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
async def test_attached_process_serves_and_takes_over_when_the_owner_exits(
    lab: Lab, how: signal.Signals
) -> None:
    lab.start("abc123", "api")
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(Client(lab.hub()))
        await eventually(lambda: _active(first))
        owner = await _owner_pid(lab)
        second = await stack.enter_async_context(Client(lab.hub()))
        third = await stack.enter_async_context(Client(lab.hub()))
        assert await _owner_pid(lab) == owner  # still one owner
        for client in (second, third):
            assert await states(client) == {"api": "active"}
        bound = await second.call_tool("instances_connect", {"instance_id": "api"})
        assert not bound.is_error
        assert (await second.call_tool("add", {"a": 1, "b": 2})).structured_content == {"result": 3}
        status = (await third.call_tool("hub_status", {})).structured_content
        assert status["clients"] == 3 and status["sessions"] == 1  # one hub, three sessions

        os.kill(owner, how)
        # The next call of an attached client finds a new owner, its binding restored.
        answer = await second.call_tool("add", {"a": 5, "b": 2})
        assert not answer.is_error, answer.content
        assert answer.structured_content == {"result": 7}
        assert "add" in {t.name for t in (await second.list_tools()).tools}
        assert await states(third) == {"api": "active"}
        new_owner = await _owner_pid(lab)
        assert new_owner not in (owner, os.getpid())

    verified = lab.cli("replay", "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    hub_events = [e["type"] for e in json.loads(lab.cli("history", "hub", "--json").stdout)]
    expected_first = ["hub_started", "hub_stopped"] if how == signal.SIGTERM else ["hub_started"]
    # Whoever took over may exit before the other attached client, which then takes over in turn.
    later_runs = hub_events[len(expected_first) :]
    assert hub_events[: len(expected_first)] == expected_first
    assert later_runs in (["hub_started", "hub_stopped"], ["hub_started", "hub_stopped"] * 2)
    sessions = [
        e["type"]
        for e in json.loads(lab.cli("history", "api", "--json").stdout)
        if e["type"].startswith("session_")
    ]
    # bound once on the first owner, re-bound on the new one; the SIGKILLed owner recorded no end
    # (a last takeover cut short by its own client's exit binds nothing)
    extras = [[], ["session_connected", "session_disconnected"]] if len(later_runs) == 4 else [[]]
    if how == signal.SIGTERM:
        assert sessions in [["session_connected", "session_disconnected"] * 2 + extra for extra in extras]
    else:
        assert sessions in [
            ["session_connected", "session_connected", "session_disconnected", *extra] for extra in extras
        ]


async def _active(client: Client) -> bool:
    return await states(client) == {"api": "active"}
