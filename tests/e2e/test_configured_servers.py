"""Configured servers through the real console script: `fsm-hub serve --config`, then history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession
from mcp.client.stdio import stdio_client

from tests.e2e.lab import FAST, FSM_HUB, Lab, eventually
from tests.servers.everything import everything_stdio
from tests.servers.launch import REPO_ROOT

LIGHT = str(REPO_ROOT / "tests" / "servers" / "stdio_server.py")
SECRET = "s3cr3t-token-value-7f1e"


def light(*mode: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"command": sys.executable, "args": ["-S", LIGHT, *mode]}
    if env:
        entry["env"] = env
    return entry


def write_config(path: Path, servers: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps({"mcpServers": servers}))
    temporary.chmod(0o600)
    temporary.replace(path)


def history(lab: Lab, ref: str) -> list[dict[str, Any]]:
    done = lab.cli("history", ref, "--json")
    assert done.returncode == 0, done.stderr
    events: list[dict[str, Any]] = json.loads(done.stdout)
    return events


def moves(lab: Lab, ref: str) -> list[tuple[str, str, str | None]]:
    return [
        (e["data"]["event"], e["data"]["to"], e["data"]["error"])
        for e in history(lab, ref)
        if e["type"] == "transition"
    ]


async def listed(client: ClientSession) -> dict[str, dict[str, Any]]:
    result = await client.call_tool("instances_list", {})
    assert result.structured_content is not None
    return {i["name"]: i for i in result.structured_content["instances"]}


async def state_of(client: ClientSession, name: str) -> str | None:
    return (await listed(client)).get(name, {}).get("state")


def config_path(lab: Lab) -> Path:
    return lab.root / "servers.json"


def hub(lab: Lab, *extra: str) -> Any:
    return stdio_client(lab.hub("--config", str(config_path(lab)), *extra))


async def test_stdio_servers_are_instances_and_calls_reach_them(lab: Lab) -> None:
    write_config(
        config_path(lab),
        {
            "light": light(env={"API_TOKEN": SECRET}),
            "sdk": {"command": sys.executable, "args": ["-m", "tests.servers.sdk_stdio_server"],
                    "cwd": str(REPO_ROOT)},
        },
    )
    async with hub(lab, "--start-timeout", "20") as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        await eventually(lambda: _all(client, {"light", "sdk"}, "active"), timeout=40)
        seen = await listed(client)
        assert {(i["id"], i["kind"], i["source"]) for i in seen.values()} == {
            ("cfg-light", "stdio", str(config_path(lab))),
            ("cfg-sdk", "stdio", str(config_path(lab))),
        }
        for name in ("light", "sdk"):
            through = await client.call_tool(
                "instances_call", {"instance_id": name, "tool": "echo", "arguments": {"text": "hi"}}
            )
            assert not through.is_error and through.content[0].text == "hi"  # type: ignore[union-attr]
        status = await client.call_tool("hub_status", {})
        assert status.structured_content is not None
        assert status.structured_content["config"] == str(config_path(lab))
        assert SECRET not in json.dumps(status.structured_content) + json.dumps(seen)
    spawned = [e for e in history(lab, "cfg-light") if e["type"] == "process_spawned"]
    assert len(spawned) == 1 and spawned[0]["data"]["identity"]
    assert moves(lab, "cfg-light")[-2:] == [("connect", "connecting", None), ("connected", "active", None)]
    discovered = history(lab, "cfg-light")[0]["data"]
    assert discovered["server"]["env"] == ["API_TOKEN"]
    # The secret is in no row of the log (nor in the snapshots written beside it).
    for stored in (path for path in lab.root.glob("events.db*") if path.is_file()):
        assert SECRET.encode() not in stored.read_bytes(), stored


async def test_server_everything_in_stdio_mode(lab: Lab) -> None:
    params = everything_stdio()
    write_config(config_path(lab), {"everything": {"command": params.command, "args": params.args}})
    async with hub(lab, "--start-timeout", "20") as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        await eventually(lambda: _all(client, {"everything"}, "active"), timeout=40)
        through = await client.call_tool(
            "instances_call", {"instance_id": "everything", "tool": "echo", "arguments": {"message": "hi"}}
        )
        assert not through.is_error and "hi" in through.content[0].text  # type: ignore[union-attr]
    # Directly, with the same client code: the same answer.
    async with stdio_client(params) as (read, write), ClientSession(read, write) as direct:
        await direct.initialize()
        answer = await direct.call_tool("echo", {"message": "hi"})
        assert answer.content[0].text == through.content[0].text  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mode", "last_event", "error_has"),
    [
        (["exit-at-start"], ("connect_failed", "dead"),
         ["exited with code 2", "fatal: cannot open the database"]),
        (["no-initialize"], ("connect_failed", "dead"), ["timed out after 1.5s"]),  # --start-timeout
        (["flood-stderr", "2"], ("connected", "active"), []),
    ],
    ids=["exit-at-start", "no-initialize", "flood-stderr"],
)
async def test_fault_modes_at_start(
    lab: Lab, mode: list[str], last_event: tuple[str, str], error_has: list[str]
) -> None:
    write_config(config_path(lab), {"fault": light(*mode)})
    async with hub(lab) as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        await eventually(lambda: _all(client, {"fault"}, last_event[1]), timeout=30)
    recorded = moves(lab, "cfg-fault")
    assert recorded[-1][:2] == last_event
    if error_has:
        errors = [error for _, _, error in recorded if error]
        assert errors and all(all(part in e for part in error_has) for e in errors), errors
        assert len([m for m in recorded if m[0] == "connect"]) == 3  # --retry-attempts 3: no hot loop


@pytest.mark.parametrize(
    ("mode", "error_has"),
    [(["exit-after", "1"], "exited with code 3"), (["garbage"], "not JSON-RPC")],
    ids=["exit-after", "garbage"],
)
async def test_fault_modes_in_a_call_make_it_lost_and_respawned(
    lab: Lab, mode: list[str], error_has: str
) -> None:
    write_config(config_path(lab), {"fault": light(*mode)})
    async with hub(lab) as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        await eventually(lambda: _all(client, {"fault"}, "active"), timeout=30)
        for _ in range(2):
            await client.call_tool("instances_call", {"instance_id": "fault", "tool": "echo",
                                                      "arguments": {"text": "x"}})
        await eventually(lambda: _lost_then_active(lab), timeout=30)
    lost = [m for m in moves(lab, "cfg-fault") if m[0] == "lost"]
    assert error_has in (lost[0][2] or "")
    assert len([e for e in history(lab, "cfg-fault") if e["type"] == "process_spawned"]) >= 2


async def test_a_config_edited_while_the_hub_runs(lab: Lab) -> None:
    path = config_path(lab)
    write_config(path, {"one": light()})
    async with hub(lab) as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        await eventually(lambda: _all(client, {"one"}, "active"), timeout=30)
        first_pid = _spawned_pids(lab, "cfg-one")[-1]
        write_config(path, {"one": light(env={"MODE": "changed"}), "two": light()})
        await eventually(lambda: _all(client, {"one", "two"}, "active"), timeout=30)
        await eventually(lambda: len(_spawned_pids(lab, "cfg-one")) == 2, timeout=10)
        assert not _running(first_pid)
        write_config(path, {"two": light("ignore-sigterm")})
        await eventually(lambda: _all(client, {"one"}, "dead", only=False), timeout=30)
        gone = _spawned_pids(lab, "cfg-one")[-1]
        await eventually(lambda: not _running(gone), timeout=10)
        stubborn = await eventually(lambda: _second_spawn(lab, "cfg-two"), timeout=30)
        await eventually(lambda: _all(client, {"two"}, "active", only=False), timeout=30)
    # hub_stopped ends every child: SIGTERM ignored, then SIGKILL (the zombie is reaped by then)
    await eventually(lambda: not _running(stubborn), timeout=10)
    events = [(e["type"], e["data"].get("event")) for e in history(lab, "cfg-one")]
    assert ("instance_updated", None) in events
    assert [m[:2] for m in moves(lab, "cfg-one") if m[0] in ("rediscover", "remove")] == [
        ("rediscover", "discovered"), ("remove", "dead"),
    ]
    removed = next(e for e in history(lab, "cfg-one") if e["data"].get("event") == "remove")
    assert "removed from" in removed["data"]["reason"]
    reasons = [e["data"]["reason"] for e in history(lab, "cfg-one") if e["data"].get("event") == "rediscover"]
    assert reasons == ["config changed: env names"]


async def test_a_killed_hub_leaves_no_orphan_past_its_next_start(lab: Lab) -> None:
    write_config(config_path(lab), {"kept": light("ignore-sigterm")})
    command = [FSM_HUB, "serve", "--db", str(lab.db), "--instances-dir", str(lab.instances_dir),
               "--config", str(config_path(lab)), *FAST]
    first = subprocess.Popen(  # noqa: ASYNC220  # the hub must be SIGKILLed: a plain child process
        command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await eventually(lambda: _spawned_pids(lab, "cfg-kept") and _state(lab, "cfg-kept") == "active", 30)
    finally:
        first.kill()
        first.wait(timeout=10)
    orphan = _spawned_pids(lab, "cfg-kept")[-1]
    assert _running(orphan)  # SIGKILL gave the hub no chance to stop it
    async with hub(lab) as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        await eventually(lambda: _all(client, {"kept"}, "active"), timeout=30)
        assert not _running(orphan)
    ended = [e for e in history(lab, "cfg-kept") if e["type"] == "orphan_ended"]
    assert [e["data"]["pid"] for e in ended] == [orphan]


def test_an_announcement_claiming_a_configured_id_is_refused(lab: Lab) -> None:
    payload = {"id": "cfg-light", "name": "impostor", "directory": str(lab.root), "port": 9,
               "started_at": "2026-11-25T03:14:15Z", "last_ping": "2026-11-25T03:14:15Z",
               "process_info": {"pid": os.getpid(), "executable": sys.executable}}
    (lab.instances_dir / "cfg-light.json").write_text(json.dumps(payload))
    from fsm_hub.discovery.directory import parse_announcement
    from fsm_hub.errors import RefusedAnnouncement

    with pytest.raises(RefusedAnnouncement, match="configured server"):
        parse_announcement((lab.instances_dir / "cfg-light.json").read_bytes(), expected_id="cfg-light")


# -- helpers -----------------------------------------------------------------------------------


async def _all(client: ClientSession, names: set[str], state: str, *, only: bool = True) -> bool:
    seen = await listed(client)
    if only and set(seen) != names:
        return False
    return all(seen.get(name, {}).get("state") == state for name in names)


def _spawned_pids(lab: Lab, ref: str) -> list[int]:
    done = lab.cli("history", ref, "--json")
    if done.returncode != 0:
        return []
    return [e["data"]["pid"] for e in json.loads(done.stdout) if e["type"] == "process_spawned"]


def _second_spawn(lab: Lab, ref: str) -> int | None:
    pids = _spawned_pids(lab, ref)
    return pids[-1] if len(pids) >= 2 else None


def _state(lab: Lab, ref: str) -> str | None:
    done = lab.cli("instances", "--json")
    for instance in json.loads(done.stdout or "[]"):
        if instance["id"] == ref:
            return str(instance["state"])
    return None


def _lost_then_active(lab: Lab) -> bool:
    recorded = moves(lab, "cfg-fault")
    return any(m[0] == "lost" for m in recorded) and recorded[-1][1] == "active"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


