"""The one bounded, strict JSON-RPC codec, and a session fed arbitrary JSON through it."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fsm_hub.mcp import jsonrpc
from fsm_hub.mcp.jsonrpc import MAX_BATCH, MAX_DEPTH, JsonRpcDecodeError, decode, encode, encode_answer
from tests.live_hub import LiveHub

LiveHubFactory = Callable[..., Awaitable[LiveHub]]


def code_of(data: bytes) -> int:
    with pytest.raises(JsonRpcDecodeError) as caught:
        decode(data)
    return caught.value.code


def test_nesting_at_the_limit_decodes_and_beyond_is_an_invalid_request() -> None:
    assert decode(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    assert code_of(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)) == -32600
    assert code_of(b"[" * 100_000) == -32600  # never a RecursionError, even unbalanced
    assert code_of(b'{"a":' * 5000 + b"1" + b"}" * 5000) == -32600
    # Brackets inside strings are text, not nesting.
    assert decode(json.dumps({"s": "[" * 10_000}).encode()) == {"s": "[" * 10_000}


def test_a_batch_beyond_the_limit_is_refused_before_it_is_built() -> None:
    assert len(decode(b"[" + b",".join([b"{}"] * MAX_BATCH) + b"]")) == MAX_BATCH
    assert code_of(b"[" + b",".join([b"{}"] * (MAX_BATCH + 1)) + b"]") == -32600
    assert code_of(b"[" + b"{}," * 2_000_000 + b"{}]") == -32600  # the 6 MB bomb


def test_a_message_beyond_the_size_limit_is_refused() -> None:
    with pytest.raises(JsonRpcDecodeError, match="exceeds 10"):
        decode(b'"' + b"x" * 20 + b'"', max_bytes=10)


@pytest.mark.parametrize("text", [b"NaN", b"[Infinity]", b'{"a":-Infinity}', b"1e999", b"[-1e400]"])
def test_non_standard_numbers_are_parse_errors(text: bytes) -> None:
    assert code_of(text) == -32700


@pytest.mark.parametrize("text", [b"", b"  ", b"[1,]", b"{} {}", b"\xff\xfe", b"[1 2]", b"[", b"]"])
def test_bad_syntax_is_a_parse_error(text: bytes) -> None:
    assert code_of(text) == -32700


def test_nothing_non_standard_is_ever_written() -> None:
    for value in (math.nan, math.inf, -math.inf, [1, {"a": math.nan}]):
        with pytest.raises(ValueError):
            encode(value)
    answer = json.loads(encode_answer({"jsonrpc": "2.0", "id": 7, "result": {"x": math.inf}}))
    assert answer["id"] == 7 and answer["error"]["code"] == -32603
    assert b"\\udc80" in encode({"s": "\udc80"})  # a lone surrogate stays escaped, valid JSON


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)  # fmt: skip
methods = st.sampled_from(
    ["ping", "tools/list", "tools/call", "initialize", "notifications/cancelled", "resources/read", "x/y"]
)
messages = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"]), "method": methods | json_values},
    optional={"id": st.integers(-3, 3) | st.text(max_size=3) | json_values, "params": json_values},
)
inputs = messages | json_values | st.lists(messages | json_values, max_size=5)


_hubs: dict[int, LiveHub] = {}
"""One hub for all examples of a test (the fixture is the same object across them)."""


def expected_ids(value: Any) -> list[str]:
    """The id of every answer the session owes, as repr (null for what has no usable id)."""
    if isinstance(value, list) and not value:
        return ["None"]  # an empty batch: one Invalid Request
    entries = value if isinstance(value, list) else [value]
    owed = []
    for m in entries:
        if isinstance(m, dict) and m.get("jsonrpc") == "2.0":
            method = m.get("method")
            if method is None and "id" in m and ("result" in m or "error" in m):
                continue  # a client's response
            if isinstance(method, str) and "id" not in m:
                continue  # a notification, valid or not, is never answered
        request_id = m.get("id") if isinstance(m, dict) else None
        owed.append(repr(request_id if jsonrpc.valid_id(request_id) else None))
    return owed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=inputs)
async def test_arbitrary_json_gets_exactly_one_answer_per_request(
    live_hub: LiveHubFactory, value: Any
) -> None:
    live = _hubs.get(id(live_hub)) or _hubs.setdefault(id(live_hub), await live_hub())
    session, _ = live.session(initialized=False)
    decoded = decode(encode(value))
    answer = await session.handle(decoded)
    written = [] if answer is None else json.loads(encode_answer(answer))
    replies = written if isinstance(written, list) else [written]
    assert all(r.get("jsonrpc") == "2.0" and ("result" in r) != ("error" in r) for r in replies)
    assert sorted(repr(r["id"]) for r in replies) == sorted(expected_ids(decoded))
    await session.close("test")
