"""Moments a user types: ISO 8601 (naive = UTC) or a span back from now (`30s`, `10m`, `2h`, `3d`)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from fsm_hub.core.events import parse_time

_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_moment(text: str, now: datetime) -> datetime:
    """Raises ValueError for anything else."""
    span = _SPAN.match(text.lower())
    if span:
        return now - timedelta(seconds=float(span.group(1)) * _UNITS[span.group(2)])
    return parse_time(text)
