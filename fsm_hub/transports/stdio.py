"""Newline-delimited JSON-RPC over stdin/stdout. Stdout carries protocol only; logs go to stderr."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from typing import Any

MAX_LINE = 64 * 1024 * 1024


class StdioChannel:
    """Reads request lines from stdin and writes messages to stdout, one JSON per line."""

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._lines: asyncio.Queue[bytes | None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE)
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            self._reader = reader
        except (ValueError, OSError):  # a regular file or something epoll cannot watch
            self._lines = asyncio.Queue()
            threading.Thread(target=self._pump, args=(loop, self._lines), daemon=True).start()
        try:
            transport, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout)
            self._writer = transport  # type: ignore[assignment]
        except (ValueError, OSError):
            self._writer = None

    @staticmethod
    def _pump(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[bytes | None]) -> None:
        for line in sys.stdin.buffer:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    async def readline(self) -> bytes | None:
        """The next line (without its newline); None at end of input. Over-long lines raise ValueError."""
        if self._lines is not None:
            return await self._lines.get()
        assert self._reader is not None
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial or None
        except asyncio.LimitOverrunError as exc:
            await self._reader.readexactly(exc.consumed)
            await self._skip_line()  # drop all of the over-long line: one error for it, not two
            raise ValueError("line too long") from None
        return line

    async def _skip_line(self) -> None:
        assert self._reader is not None
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.IncompleteReadError:
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)

    def write(self, message: Any) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode()
        if not data.endswith(b"\n"):
            data += b"\n"
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)
        else:
            os.write(sys.stdout.fileno(), data)

    async def drain(self) -> None:
        """Let buffered output reach the pipe before exit."""
        if self._writer is None:
            return
        for _ in range(100):
            if self._writer.get_write_buffer_size() == 0:
                return
            await asyncio.sleep(0.01)
