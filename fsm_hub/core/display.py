"""Making recorded text safe to show: URL credentials redacted, control characters escaped.

Every place that shows a URL, a name, a reason or an error to a person or a model goes
through here, so a secret in an announcement or an escape sequence in a name is handled once.
"""

from __future__ import annotations

import re
from typing import Any

_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s@]*)@")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def redact_url(text: str) -> str:
    """`http://user:secret@host/…` → `http://***@host/…`, in a URL or anywhere in a text."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}***@", text)


def redact(value: Any) -> Any:
    """`redact_url` applied to every string inside a JSON-like value."""
    if isinstance(value, str):
        return redact_url(value) if "@" in value else value
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in named:
        return named[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """One terminal-safe line: control, bidi and line-separator characters escaped."""
    return _CONTROL.sub(_escape, text)


def shown(text: object) -> str:
    """What a table cell shows for a recorded value: redacted, then made printable."""
    return printable(redact_url(str(text)))
