"""Recorded text made safe to show: credentials redacted, control characters escaped."""

from __future__ import annotations

import pytest

from fsm_hub.core.display import printable, redact, redact_url, shown
from fsm_hub.mcp.hub_tools import tool_result


@pytest.mark.parametrize(
    ("text", "expected"),
    [("http://admin:secret@127.0.0.1:8001/mcp", "http://***@127.0.0.1:8001/mcp"),
     ("https://token@host/x?a=b@c", "https://***@host/x?a=b@c"),
     ("connect to http://u:p@h:1/ failed; see http://v@w/", "connect to http://***@h:1/ failed; see http://***@w/"),
     ("http://127.0.0.1:8001/mcp", "http://127.0.0.1:8001/mcp"),
     ("mail me at a@b.example", "mail me at a@b.example")],
    ids=["user-password", "token-not-query", "in-a-text", "no-credentials", "not-a-url"],
)
def test_credentials_in_urls_are_redacted(text: str, expected: str) -> None:
    assert redact_url(text) == expected


def test_redact_walks_json_values() -> None:
    value = {"instances": [{"url": "http://a:b@h/mcp", "port": 1, "ok": None}], "n": [1, "x"]}
    assert redact(value) == {"instances": [{"url": "http://***@h/mcp", "port": 1, "ok": None}], "n": [1, "x"]}


def test_the_hub_tools_never_show_credentials_to_the_model() -> None:
    result = tool_result({"instance": {"url": "http://admin:secret@127.0.0.1:9/mcp"}})
    assert "secret" not in result["content"][0]["text"]
    assert result["structuredContent"] == {"instance": {"url": "http://***@127.0.0.1:9/mcp"}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("web\x1b[31m", "web\\x1b[31m"), ("two\nlines\r", "two\\nlines\\r"), ("tab\there", "tab\\there"),
     ("bell\x07", "bell\\x07"), ("c1\x9b", "c1\\x9b"), ("rtl\u202eevil", "rtl\\u202eevil"),
     ("ls\u2028x", "ls\\u2028x"), ("naïve → ok", "naïve → ok")],
    ids=["escape", "newlines", "tab", "bell", "c1", "bidi", "line-separator", "unicode-kept"],
)
def test_control_characters_are_escaped(text: str, expected: str) -> None:
    assert printable(text) == expected


def test_shown_does_both() -> None:
    assert shown("http://a:b@h/\n") == "http://***@h/\\n"
