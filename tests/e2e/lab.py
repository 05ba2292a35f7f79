"""A lab for end-to-end tests: real SDK instances announced in a real instances directory."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mcp_types
from mcp.client.stdio import StdioServerParameters

from tests.servers.launch import spawn_fault_server, spawn_sdk_server

FSM_HUB = str(Path(sys.executable).with_name("fsm-hub"))
FAST = [
    "--ping-interval", "0.2", "--ping-timeout", "0.3", "--ping-misses", "2",
    "--backoff-base", "0.05", "--backoff-cap", "0.1", "--retry-attempts", "3",
    "--connect-timeout", "1", "--start-timeout", "1.5",
]  # fmt: skip


@dataclass
class Instance:
    id: str
    name: str
    process: subprocess.Popen[bytes]
    url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])


@dataclass
class Lab:
    """An instances directory with real SDK servers announced in it, and a log path."""

    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    @property
    def db(self) -> Path:
        return self.root / "events.db"

    def start(self, instance_id: str, name: str) -> Instance:
        process, url = spawn_sdk_server(self.root / f"{instance_id}-{len(self.processes)}.log")
        self.processes.append(process)
        instance = Instance(instance_id, name, process, url)
        self.announce(instance)
        return instance

    def start_fault(self, instance_id: str, name: str, mode: str) -> Instance:
        """A fault server (tests.servers.faults, `mode`) announced like an instance."""
        process, url = spawn_fault_server(self.root / f"{instance_id}-{len(self.processes)}.log", mode)
        self.processes.append(process)
        instance = Instance(instance_id, name, process, url)
        self.announce(instance)
        return instance

    def announce(self, instance: Instance) -> None:
        payload = {
            "id": instance.id,
            "name": instance.name,
            "directory": str(self.root),
            "port": instance.port,
            "started_at": "2026-11-25T03:14:15.926535897Z",
            "last_ping": "2026-11-25T03:14:15.926535897Z",
            "process_info": {"pid": instance.process.pid, "executable": sys.executable},
        }
        temporary = self.instances_dir / f".tmp-{instance.id}"
        temporary.write_text(json.dumps(payload))
        temporary.replace(self.instances_dir / f"{instance.id}.json")

    def hub(self, *extra: str) -> StdioServerParameters:
        args = ["serve", "--mcp", "--db", str(self.db), "--instances-dir", str(self.instances_dir)]
        return StdioServerParameters(command=FSM_HUB, args=[*args, *FAST, *extra])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FSM_HUB, *args, "--db", str(self.db)], capture_output=True, text=True, timeout=30
        )


class Notifications:
    def __init__(self) -> None:
        self.methods: list[str] = []
        self.changed = asyncio.Event()

    async def __call__(self, message: Any) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            self.methods.append("notifications/tools/list_changed")
            self.changed.set()


async def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; bounded, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        if outcome:
            return outcome
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s")
        await asyncio.sleep(0.05)


async def states(client: Any) -> dict[str, str]:
    result = await client.call_tool("instances_list", {})
    return {i["name"]: i["state"] for i in result.structured_content["instances"]}


def transitions(lab: Lab, ref: str) -> list[tuple[str, str, str, str]]:
    done = lab.cli("history", ref, "--json")
    assert done.returncode == 0, done.stderr
    return [
        (e["data"]["event"], e["data"]["from"], e["data"]["to"], e["data"]["reason"])
        for e in json.loads(done.stdout)
        if e["type"] == "transition"
    ]


async def all_active(client: Any, names: set[str]) -> bool:
    current = await states(client)
    return set(current) == names and set(current.values()) == {"active"}


async def state_is(client: Any, name: str, state: str) -> bool:
    return (await states(client)).get(name) == state
