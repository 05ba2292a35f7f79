"""A FakeMcp with a `sleep` tool that only ends when cancelled, and that remembers cancellations.

Lets a test see, from the instance's side, that a client's `notifications/cancelled` reached it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.servers.faults import FakeMcp, Recorded


@dataclass
class SlowMcp(FakeMcp):
    sleeping: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once a `sleep` call has arrived (and is being held)."""
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once a `notifications/cancelled` has arrived."""

    def sleep_ids(self) -> list[Any]:
        """The JSON-RPC ids the `sleep` calls arrived with."""
        return [r.message["id"] for r in self.posted("tools/call") if _tool(r.message) == "sleep"]

    def cancelled_ids(self) -> list[Any]:
        return [r.message["params"]["requestId"] for r in self.posted("notifications/cancelled")]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            message = json.loads(await request.read())
            if isinstance(message, dict) and _tool(message) == "sleep":
                self.requests.append(Recorded("POST", dict(request.headers), message))
                self.sleeping.set()
                await self._stopping.wait()  # answered never; the runner's cleanup ends it
                return web.Response(status=503)
            if isinstance(message, dict) and message.get("method") == "notifications/cancelled":
                self.cancelled.set()
        return await super()._handle(request)


def _tool(message: Any) -> str | None:
    if not isinstance(message, dict) or message.get("method") != "tools/call":
        return None
    params = message.get("params")
    return params.get("name") if isinstance(params, dict) else None
