"""Server-Sent Events as MCP uses them: the one decoder and the one encoder of the project.

Only ``data`` matters to MCP (one JSON-RPC message per event); ``id``, ``event`` and ``retry``
are skipped. There is no line limit below the message limit: aiohttp's ``readline`` stops at
512 KiB, which would lose large answers, so the decoder works on whatever chunks arrive.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import aiohttp

from fsm_hub.errors import TransportError
from fsm_hub.mcp.jsonrpc import MAX_MESSAGE

CONTENT_TYPE: Final = "text/event-stream"


class SseTooLarge(TransportError):
    """One SSE event (or one line of it) is larger than the message limit."""


class SseDecoder:
    """Splits an SSE body into the data of its events, fed in whatever chunks the network gives.

    Tolerates CRLF or LF line ends, comment lines and events without data.
    """

    __slots__ = ("_buffer", "_data", "_data_size", "_limit", "_scanned", "last_id", "retry")

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.last_id: str | None = None
        """The last event ``id`` seen (for ``Last-Event-ID`` when resuming a stream)."""
        self.retry: int | None = None
        """The last ``retry`` (milliseconds) the server suggested."""
        self._buffer = bytearray()
        self._data: list[bytes] | None = None
        self._data_size = 0
        self._scanned = 0
        self._limit = limit

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event completed by ``chunk``."""
        buffer = self._buffer
        buffer += chunk
        events: list[bytes] = []
        start = 0
        # Resume the newline search where the last chunk ended: a long line is scanned once.
        end = buffer.find(b"\n", self._scanned)
        while end != -1:
            self._line(bytes(buffer[start:end]), events)
            start = end + 1
            end = buffer.find(b"\n", start)
        del buffer[:start]
        self._scanned = len(buffer)
        if self._scanned + self._data_size > self._limit:
            raise SseTooLarge(f"an SSE event exceeds {self._limit} bytes")
        return events

    def close(self) -> list[bytes]:
        """The data of an event cut short by the end of the body (a lenient reading)."""
        events: list[bytes] = []
        if self._buffer:
            self._line(bytes(self._buffer), events)
            self._buffer.clear()
            self._scanned = 0
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[bytes]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            if self._data is not None:
                events.append(b"\n".join(self._data))
                self._data = None
                self._data_size = 0
            return
        if line.startswith(b":"):
            return
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field != b"data":
            if field == b"id" and b"\0" not in value:
                self.last_id = value.decode("utf-8", "replace")
            elif field == b"retry" and value.isdigit():
                self.retry = int(value)
            return
        self._data_size += len(value) + 1
        if self._data is None:
            self._data = [value]
        else:
            self._data.append(value)


async def events(stream: aiohttp.StreamReader, *, limit: int = MAX_MESSAGE) -> AsyncIterator[bytes]:
    """The data of each event of an SSE body, in order; a trailing unterminated event included."""
    decoder = SseDecoder(limit)
    async for chunk in stream.iter_any():
        for data in decoder.feed(chunk):
            yield data
    for data in decoder.close():
        yield data


def encode_event(data: bytes) -> bytes:
    """One ``message`` event carrying ``data`` (a JSON text, which never holds a raw newline)."""
    return b"event: message\ndata: " + data + b"\n\n"


COMMENT: Final = b": fsm-hub notifications\n\n"
"""The priming comment a GET stream opens with."""
