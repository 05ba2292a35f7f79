"""fsm-hub: one MCP endpoint for many local dev servers, each connection an audited state machine."""

from __future__ import annotations

__version__ = "0.1.0"
