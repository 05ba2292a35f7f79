"""Newline-delimited JSON-RPC over stdin/stdout. Stdout carries protocol only; logs go to stderr.

Writes are flow-controlled: an answer waits (`send`) while the client is not reading, so a
stuck client holds the call that answers it, not the hub's memory. Notifications, which have
no caller to hold, are dropped once `NOTIFICATION_BACKLOG` bytes wait unread. Empty or closed
stdin is simply the end of input.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
import threading
from typing import Any, Final

from fsm_hub.mcp import jsonrpc

log = logging.getLogger(__name__)

MAX_LINE = jsonrpc.MAX_MESSAGE
"""The longest line read; a longer one is skipped whole and answered with one error."""
READ_BUFFER: Final = 1024 * 1024
"""Input read ahead of the lines being handled (a longer line is read in pieces)."""
NOTIFICATION_BACKLOG: Final = 8 * 1024 * 1024
"""Unread output beyond which a notification is dropped instead of buffered."""
HIGH_WATER: Final = 1024 * 1024
"""Unread output beyond which `send` waits for the client to read."""


class StdioChannel:
    """Reads request lines from stdin and writes messages to stdout, one JSON per line."""

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lines: asyncio.Queue[bytes | None] | None = None
        self._closed_input = False
        self._sending = asyncio.Lock()
        self.dropped = 0
        """Notifications dropped because the client was not reading."""

    def __repr__(self) -> str:
        waiting = self._writer.transport.get_write_buffer_size() if self._writer is not None else 0
        return f"<StdioChannel unread={waiting} dropped={self.dropped}>"

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        stdin = sys.stdin
        if stdin is None or not _is_open(0):
            self._closed_input = True  # `<&-`: no input at all, which ends the session at once
        else:
            reader = asyncio.StreamReader(limit=READ_BUFFER)
            try:
                if not _pollable(0):
                    raise ValueError("not a pipe, socket or terminal")
                await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
                self._reader = reader
            except (ValueError, OSError):  # a regular file, /dev/null: something epoll cannot watch
                self._lines = asyncio.Queue()
                threading.Thread(target=self._pump, args=(loop, self._lines), daemon=True).start()
        stdout = sys.stdout
        if stdout is None or not _is_open(1):
            return
        try:
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, stdout)
        except (ValueError, OSError):
            return
        transport.set_write_buffer_limits(high=HIGH_WATER)
        self._writer = asyncio.StreamWriter(transport, protocol, None, loop)

    @staticmethod
    def _pump(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[bytes | None]) -> None:
        try:
            for line in sys.stdin.buffer:
                loop.call_soon_threadsafe(lines.put_nowait, line)
        except (OSError, ValueError):
            pass  # unreadable input ends like empty input
        finally:
            loop.call_soon_threadsafe(lines.put_nowait, None)

    async def readline(self) -> bytes | None:
        """The next line (without its newline); None at end of input. Over-long lines raise ValueError."""
        if self._closed_input:
            return None
        if self._lines is not None:
            return await self._lines.get()
        reader = self._reader
        assert reader is not None
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                part = await reader.readuntil(b"\n")
                ended = True
            except asyncio.IncompleteReadError as exc:  # end of input
                part, ended = exc.partial, True
                if not part and not parts:
                    return None
            except asyncio.LimitOverrunError as exc:
                # A line longer than the read buffer: take what is there and read on. The
                # buffer stays small (READ_BUFFER), so unread input waits in the pipe, not here.
                part, ended = await reader.readexactly(exc.consumed), False
            except OSError:
                return None
            size += len(part)
            if size > MAX_LINE:
                if not ended:
                    await self._skip_line()  # drop all of the over-long line: one error for it
                raise ValueError("line too long")
            parts.append(part)
            if ended:
                return parts[0] if len(parts) == 1 else b"".join(parts)

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
        """Write without waiting (notifications); dropped while the client leaves too much unread."""
        writer = self._writer
        if writer is not None and writer.transport.get_write_buffer_size() > NOTIFICATION_BACKLOG:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("fsm-hub: the client is not reading; %d notifications dropped", self.dropped)
            return
        self._put(_line(message))

    async def send(self, message: Any) -> None:
        """Write an answer once the client has read what was written before.

        One answer at a time waits for room (the lock), so unread output stays near
        HIGH_WATER plus one message, however many answers are waiting.
        """
        data = _line(message)
        writer = self._writer
        if writer is None:
            self._put(data)
            return
        async with self._sending:
            if not writer.transport.is_closing():
                try:
                    await writer.drain()
                except (ConnectionError, OSError):
                    pass  # the client is gone; stdin's end will stop the session
            self._put(data)

    def _put(self, data: bytes) -> None:
        writer = self._writer
        if writer is not None:
            if not writer.transport.is_closing():
                writer.write(data)
            return
        try:
            os.write(sys.stdout.fileno(), data)
        except (OSError, ValueError, AttributeError):
            pass

    async def drain(self) -> None:
        """Let buffered output reach the pipe before exit (at most a second)."""
        if self._writer is None:
            return
        for _ in range(100):
            if self._writer.transport.get_write_buffer_size() == 0:
                return
            await asyncio.sleep(0.01)


def _line(message: Any) -> bytes:
    data = message if isinstance(message, bytes | bytearray) else jsonrpc.encode_answer(message)
    return bytes(data) if data.endswith(b"\n") else bytes(data) + b"\n"


def _pollable(fd: int) -> bool:
    """Whether epoll can watch ``fd``: a pipe, a socket or a terminal (not /dev/null, not a file).

    asyncio only finds out after ``connect_read_pipe`` returns, in a callback, too late to fall back.
    """
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
