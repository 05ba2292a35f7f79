"""Tables for the terminal: aligned columns, safe cells, relative times, state colours on a TTY."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from fsm_hub.core.display import shown
from fsm_hub.core.events import parse_time, utc_now

STATE_COLOURS = {
    "discovered": "36",  # cyan
    "connecting": "33",  # yellow
    "active": "32",  # green
    "retrying": "35",  # magenta
    "dead": "31",  # red
}
"""ANSI SGR codes per state; the timeline and the dashboard use the same hues."""

now: Callable[[], datetime] = utc_now
"""The moment relative times are measured from (tests replace it)."""


def colour_enabled(stream: object = None) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    target = stream if stream is not None else sys.stdout
    isatty = getattr(target, "isatty", None)
    return bool(isatty and isatty())


def paint(text: str, state: str, enabled: bool) -> str:
    code = STATE_COLOURS.get(state)
    return f"\x1b[{code}m{text}\x1b[0m" if enabled and code else text


def ago(delta: timedelta) -> str:
    """`just now`, `42s ago`, `5m ago`, `3h ago`, `2d ago` (`in 5m` for the future)."""
    seconds = int(delta.total_seconds())
    future, seconds = seconds < 0, abs(seconds)
    if seconds < 1:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            amount = f"{seconds // size}{unit}"
            return f"in {amount}" if future else f"{amount} ago"
    return "just now"  # unreachable


def when(at: str) -> str:
    """An absolute time to the second, with how long ago it was: `2026-03-14 03:14:19Z (5m ago)`."""
    try:
        moment = parse_time(at)
    except ValueError:
        return shown(at)
    return f"{moment:%Y-%m-%d %H:%M:%S}Z ({ago(now() - moment)})"


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    colour_column: int | None = None,
    colour: bool = False,
) -> str:
    """Left-aligned columns; every cell is made printable, the state column is painted last."""
    cells = [[shown(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(row: Sequence[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        if colour_column is not None and row is not headers:
            padded[colour_column] = paint(padded[colour_column], row[colour_column].strip(), colour)
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])
