"""JSON-RPC 2.0 as fsm-hub speaks it: error codes, ids, framing and the one bounded codec.

Every byte that crosses a process boundary — from a client, a bridge or an instance — is
decoded by `decode` and every message written is encoded by `encode`. Both are strict:

- a message is at most `MAX_MESSAGE` bytes, nested at most `MAX_DEPTH` deep, and a batch holds
  at most `MAX_BATCH` entries — beyond them a `JsonRpcLimit`, never a `RecursionError` or an
  unbounded allocation;
- `NaN`, `Infinity` and numbers that overflow a double (``1e999``) are not JSON: they are
  refused on the way in and can never be written on the way out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

from fsm_hub.errors import FsmHubError, McpError

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603

MAX_MESSAGE: Final = 64 * 1024 * 1024
"""Bytes in one message (a stdio line, an HTTP body, one SSE event)."""
MAX_DEPTH: Final = 256
"""Nesting of arrays and objects in one message."""
MAX_BATCH: Final = 1000
"""Entries in one batch."""


class JsonRpcDecodeError(FsmHubError):
    """Bytes that are not one acceptable JSON value; `code` is the JSON-RPC error to answer with."""

    def __init__(self, code: int, message: str, *, syntax: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.syntax = syntax
        """Plain bad JSON syntax, rather than a limit or a non-standard value."""


class RpcError(FsmHubError):
    """A JSON-RPC error to answer a request with."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


# -- decoding -------------------------------------------------------------------------------

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_TOO_DEEP: Final = f"Invalid Request: nested deeper than {MAX_DEPTH}"


def nesting_exceeds(data: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays and objects in ``data`` nest deeper than ``limit`` (strings ignored).

    Runs at C speed: strings are cut out, everything but brackets dropped, then one level of
    innermost ``[]``/``{}`` pairs is peeled per pass. Most messages never get past the count.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        peeled = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if not peeled:
            return False
        if len(peeled) == len(brackets):
            return False  # unbalanced: not JSON, and the parser will say so
        brackets = peeled
    return bool(brackets)


def decode(data: bytes | str, *, max_bytes: int = MAX_MESSAGE) -> Any:
    """One JSON value under the limits; raises JsonRpcDecodeError saying which was hit."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise JsonRpcDecodeError(
            INVALID_REQUEST, f"Invalid Request: message of {len(raw)} bytes exceeds {max_bytes}"
        )
    if nesting_exceeds(raw):
        raise JsonRpcDecodeError(INVALID_REQUEST, _TOO_DEEP)
    try:
        text = raw.decode("utf-8")
        start = _WHITESPACE.match(text, 0)
        index = start.end() if start else 0
        if text.startswith("[", index):
            return _decode_batch(text, index + 1)
        value, end = _DECODER.raw_decode(text, index)
    except UnicodeDecodeError:
        raise JsonRpcDecodeError(PARSE_ERROR, "Parse error: not UTF-8") from None
    except RecursionError:
        raise JsonRpcDecodeError(INVALID_REQUEST, _TOO_DEEP) from None
    except ValueError as exc:
        syntax = isinstance(exc, json.JSONDecodeError)
        raise JsonRpcDecodeError(PARSE_ERROR, f"Parse error: {_reason(exc)}", syntax=syntax) from None
    _expect_end(text, end)
    return value


def _decode_batch(text: str, index: int) -> list[Any]:
    """A top-level array, entry by entry: a batch beyond MAX_BATCH is refused before it is built."""
    entries: list[Any] = []
    position = _skip(text, index)
    if text.startswith("]", position):
        _expect_end(text, position + 1)
        return entries
    while True:
        if len(entries) >= MAX_BATCH:
            raise JsonRpcDecodeError(INVALID_REQUEST, f"Invalid Request: batch of more than {MAX_BATCH}")
        value, position = _DECODER.raw_decode(text, position)
        entries.append(value)
        position = _skip(text, position)
        if text.startswith(",", position):
            position = _skip(text, position + 1)
            continue
        if text.startswith("]", position):
            _expect_end(text, position + 1)
            return entries
        raise ValueError(f"expected , or ] at char {position}")


def _skip(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    return match.end() if match else index


def _expect_end(text: str, index: int) -> None:
    if _skip(text, index) != len(text):
        raise JsonRpcDecodeError(PARSE_ERROR, f"Parse error: extra data at char {index}")


def _reason(exc: ValueError) -> str:
    return exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)


# -- encoding -------------------------------------------------------------------------------

_ENCODER: Final = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def encode(message: Any) -> bytes:
    """Strict compact ASCII JSON; raises ValueError for NaN/Infinity (never written anywhere)."""
    return _ENCODER.encode(message).encode()


def encode_answer(message: Any) -> bytes:
    """Encode an answer; one that cannot be written as JSON becomes an internal error for its id."""
    try:
        return encode(message)
    except (ValueError, TypeError, RecursionError) as exc:
        request_id = message.get("id") if isinstance(message, dict) else None
        problem = f"Internal error: the answer cannot be written as JSON ({exc})"
        return encode(error_response(request_id, INTERNAL_ERROR, problem))


def request(request_id: int | str | None, method: str, params: Mapping[str, Any] | None) -> bytes:
    """A request (or, with ``request_id`` None, a notification), encoded."""
    message: dict[str, Any] = {"jsonrpc": "2.0"}
    if request_id is not None:
        message["id"] = request_id
    message["method"] = method
    if params is not None:
        message["params"] = params
    return encode(message)


# -- messages -------------------------------------------------------------------------------


def valid_id(value: Any) -> bool:
    """A request id: a string or an integer (never a bool, a float, null or a container)."""
    return isinstance(value, str | int) and not isinstance(value, bool)


def error_response(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id if valid_id(request_id) else None, "error": error}


def parse_error(message: str = "Parse error: the line is not valid JSON") -> dict[str, Any]:
    return error_response(None, PARSE_ERROR, message)


def decode_error(exc: JsonRpcDecodeError) -> dict[str, Any]:
    return error_response(None, exc.code, exc.message)


def needs_answer(message: Any) -> bool:
    """Whether a decoded message (or batch) gets an answer: a request, or something invalid."""
    if isinstance(message, list):
        return not message or any(needs_answer(m) for m in message)
    if not isinstance(message, dict):
        return True
    if "method" in message:
        return "id" in message
    return not ("result" in message or "error" in message)


def answers(message: dict[str, Any], request_id: int) -> bool:
    """Whether ``message`` is the response to ``request_id`` (some servers echo ids as strings)."""
    if "result" not in message and "error" not in message:
        return False
    answered = message.get("id")
    return answered == request_id or answered == str(request_id)


SNIPPET: Final = 200
"""Characters of a body or value quoted in an error message."""


def result_of(message: dict[str, Any]) -> Any:
    """The ``result`` of a JSON-RPC response; its ``error`` raised as McpError."""
    error = message.get("error")
    if error is not None:
        raise error_of(error)
    return message.get("result")


def error_of(error: object) -> McpError:
    if not isinstance(error, dict):
        return McpError(-32603, str(error))
    code = error.get("code")
    return McpError(
        code if isinstance(code, int) else -32603, str(error.get("message", "")), error.get("data")
    )


def snippet(value: object) -> str:
    """A short single line of a body or value, for error messages."""
    if isinstance(value, bytes | bytearray):
        text = value.decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(value)
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET else text[: SNIPPET - 3] + "..."
