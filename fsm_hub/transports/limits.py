"""How much the Streamable HTTP endpoints let a client hold: sessions, connections, time, bytes.

Apart from `http.py` so that `serve` can take these settings without importing aiohttp before
its first stdio answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from fsm_hub.mcp import jsonrpc


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one endpoint allows; the defaults are the documented ones."""

    session_idle: float = 1800.0
    """Seconds a session may go without a request or an open stream before it is closed."""
    max_sessions: int = 1000
    """Live sessions; beyond it `initialize` gets 503."""
    max_connections: int = 256
    """Open TCP connections; beyond it a new connection gets 503 and is closed."""
    head_timeout: float = 10.0
    """Seconds a new connection may take to send its first request head."""
    idle_timeout: float = 60.0
    """Seconds a keep-alive connection may wait for (or dribble) its next request head."""
    body_timeout: float = 30.0
    """Seconds a request body may take to arrive."""
    max_body: int = jsonrpc.MAX_MESSAGE
    stream_keep: float = 300.0
    """Seconds a POST stream whose connection dropped is kept, once its call has ended, for a
    client to resume it (with `Last-Event-ID`) and get the answer."""
