"""A FakeMcp whose availability a test switches: it can stop answering while its port stays open
(`pause`), go away so its port refuses connections (`down`), and come back on the same port (`up`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from tests.servers.faults import FakeMcp


@dataclass
class FlakyMcp(FakeMcp):
    port: int = 0
    """The port it listens on once started; `up` comes back on it."""
    _answering: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, port: int = 0) -> str:
        self._answering.set()
        url = await super().start(port or self.port)
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])
        return url

    def pause(self) -> None:
        """Keep accepting connections and reading requests, answer nothing (a wedged process)."""
        self._answering.clear()

    def resume(self) -> None:
        self._answering.set()

    async def down(self) -> None:
        """Close the port: connections are refused. A real restart forgets every session."""
        await self.stop()
        self.live_sessions.clear()
        self._stopping = asyncio.Event()

    async def up(self) -> None:
        await self.start(self.port)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await self._answering.wait()
        return await super()._handle(request)
