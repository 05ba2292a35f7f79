"""The one timestamp format, and the public shape of a stored event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from fsm_hub.core.events import StoredEvent, format_time, parse_time, transition_data


@pytest.mark.parametrize(
    "moment",
    [datetime(2026, 3, 14, 3, 14, 15, 926535, tzinfo=UTC),
     datetime(2026, 3, 14, 3, 14, 15, 926535),  # naive means UTC
     datetime(2026, 3, 14, 5, 14, 15, 926535, tzinfo=timezone(timedelta(hours=2)))],
    ids=["utc", "naive", "offset"],
)
def test_format_time_is_utc_with_microseconds(moment: datetime) -> None:
    assert format_time(moment) == "2026-03-14T03:14:15.926535+00:00"


def test_format_time_keeps_zero_microseconds_so_times_sort_as_text() -> None:
    whole = format_time(datetime(2026, 3, 14, 3, 14, 15, tzinfo=UTC))
    assert whole == "2026-03-14T03:14:15.000000+00:00"
    assert whole < format_time(datetime(2026, 3, 14, 3, 14, 15, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    "text",
    ["2026-03-14T03:14:15Z", "2026-03-14T03:14:15z", " 2026-03-14T03:14:15+00:00 ",
     "2026-03-14T04:14:15+01:00", "2026-03-14T03:14:15", "2026-03-14 03:14:15.000000"],
)
def test_parse_time_accepts_iso_8601(text: str) -> None:
    assert parse_time(text) == datetime(2026, 3, 14, 3, 14, 15, tzinfo=UTC)


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01", "03:14"])
def test_parse_time_refuses_the_rest(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def test_a_stored_event_decodes_its_payload_on_demand() -> None:
    data = transition_data("connect", "retrying", "connecting", reason="backoff", attempt=2)
    event = StoredEvent(7, "inst", 3, "transition", "2026-03-14T03:14:15.926535+00:00",
                        '{"event": "connect", "from": "retrying", "to": "connecting",'
                        ' "reason": "backoff", "attempt": 2, "error": null}')
    assert event.data == data
    assert list(event.to_json()) == ["seq", "stream", "version", "type", "at", "data"]
