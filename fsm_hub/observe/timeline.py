"""Swimlanes of state over time: one lane per instance, one colour per state, reasons on hover.

Rendered as compact text for the terminal, or as a self-contained SVG (or an HTML page
holding it): no scripts, fonts or styles from anywhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from xml.sax.saxutils import escape, quoteattr

from fsm_hub.core.display import redact_url, shown
from fsm_hub.core.events import EventType, StoredEvent, parse_time
from fsm_hub.core.machine import STATES
from fsm_hub.observe.tables import paint

STATE_FILLS = {
    "discovered": "#5bc0de",
    "connecting": "#f0ad4e",
    "active": "#5cb85c",
    "retrying": "#b05cc8",
    "dead": "#d9534f",
}
STATE_MARKS = {"discovered": "·", "connecting": "~", "active": "█", "retrying": "▒", "dead": "x"}


@dataclass(frozen=True, slots=True)
class Segment:
    state: str
    start: datetime
    end: datetime
    why: str
    """The event and reason that entered this state."""


@dataclass(frozen=True, slots=True)
class Lane:
    id: str
    name: str
    segments: tuple[Segment, ...]


def lanes(
    events: Iterable[StoredEvent], *, until: datetime, since: datetime | None = None
) -> list[Lane]:
    """The lanes of every instance stream in `events` (hub events are skipped)."""
    names: dict[str, str] = {}
    starts: dict[str, list[tuple[str, datetime, str]]] = {}
    for event in events:
        if event.type in (EventType.INSTANCE_DISCOVERED, EventType.INSTANCE_UPDATED):
            data = event.data
            if isinstance(data.get("name"), str):
                names[event.stream] = data["name"]
            if event.type == EventType.INSTANCE_DISCOVERED and event.stream not in starts:
                starts[event.stream] = [("discovered", parse_time(event.at), "instance_discovered")]
        elif event.type == EventType.TRANSITION:
            data = event.data
            reason = str(data.get("reason") or "")
            error = str(data.get("error") or "")
            if error and error not in reason:
                reason = f"{reason}: {error}" if reason else error
            why = f"{data.get('event')}: {data.get('from')} → {data.get('to')}" + (
                f" ({reason})" if reason else ""
            )
            starts.setdefault(event.stream, []).append((str(data.get("to")), parse_time(event.at), why))
    result: list[Lane] = []
    for stream, marks in starts.items():
        segments: list[Segment] = []
        for index, (state, start, why) in enumerate(marks):
            end = marks[index + 1][1] if index + 1 < len(marks) else until
            if since is not None:
                if end <= since:
                    continue
                start = max(start, since)
            segments.append(Segment(state, start, max(end, start), why))
        if segments:
            result.append(Lane(stream, names.get(stream, stream), tuple(segments)))
    result.sort(key=lambda lane: (lane.name, lane.id))
    return result


def _span(lanes_: Sequence[Lane]) -> tuple[datetime, datetime]:
    start = min(s.start for lane in lanes_ for s in lane.segments)
    end = max(s.end for lane in lanes_ for s in lane.segments)
    return start, end


def text(lanes_: Sequence[Lane], *, width: int = 60, colour: bool = False) -> str:
    """One line per instance: a mark per column for the state it was in most of that time."""
    if not lanes_:
        return "no instances in that span"
    start, end = _span(lanes_)
    total = max((end - start).total_seconds(), 1e-6)
    label = max(len(shown(lane.name)) for lane in lanes_)
    lines = [f"{'':{label}}  {start:%Y-%m-%d %H:%M:%S}Z → {end:%Y-%m-%d %H:%M:%S}Z"]
    for lane in lanes_:
        cells: list[str] = []
        for column in range(width):
            at = start.timestamp() + total * (column + 0.5) / width
            current = [seg.state for seg in lane.segments if seg.start.timestamp() <= at]
            state = current[-1] if current else None
            cells.append(" " if state is None else paint(STATE_MARKS.get(state, "?"), state, colour))
        now = lane.segments[-1].state
        lines.append(f"{shown(lane.name):{label}}  {''.join(cells)}  {paint(now, now, colour)}")
    legend = "  ".join(f"{paint(STATE_MARKS[s], s, colour)} {s}" for s in STATES)
    lines.append(f"{'':{label}}  {legend}")
    return "\n".join(lines)


LANE_HEIGHT = 28
LABEL_WIDTH = 160
PLOT_WIDTH = 800


def svg(lanes_: Sequence[Lane]) -> str:
    """A well-formed, self-contained SVG: one `<g class="lane">` per instance."""
    height = 40 + LANE_HEIGHT * max(len(lanes_), 1) + 30
    width = LABEL_WIDTH + PLOT_WIDTH + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        "<title>fsm-hub timeline</title>",
    ]
    if not lanes_:
        out.append('<text x="10" y="30">no instances in that span</text>')
        out.append("</svg>")
        return "\n".join(out)
    start, end = _span(lanes_)
    total = max((end - start).total_seconds(), 1e-6)

    def x(moment: datetime) -> float:
        return LABEL_WIDTH + PLOT_WIDTH * (moment - start).total_seconds() / total

    out.append(
        f'<text x="{LABEL_WIDTH}" y="20">{escape(f"{start:%Y-%m-%d %H:%M:%S}Z")}</text>'
        f'<text x="{LABEL_WIDTH + PLOT_WIDTH}" y="20" text-anchor="end">'
        f'{escape(f"{end:%Y-%m-%d %H:%M:%S}Z")}</text>'
    )
    for row, lane in enumerate(lanes_):
        y = 30 + row * LANE_HEIGHT
        name = shown(lane.name)
        out.append(f'<g class="lane" data-instance={quoteattr(lane.id)}>')
        out.append(f'<text x="4" y="{y + 17}">{escape(name)}</text>')
        for segment in lane.segments:
            left, right = x(segment.start), x(segment.end)
            tip = (
                f"{segment.state} from {segment.start:%Y-%m-%d %H:%M:%S}Z to "
                f"{segment.end:%Y-%m-%d %H:%M:%S}Z — {redact_url(segment.why)}"
            )
            out.append(
                f'<rect class="state-{segment.state}" x="{left:.2f}" y="{y + 4}" '
                f'width="{max(right - left, 1.0):.2f}" height="{LANE_HEIGHT - 8}" '
                f'fill="{STATE_FILLS.get(segment.state, "#999")}"><title>{escape(shown(tip))}</title></rect>'
            )
        out.append("</g>")
    legend_y = 30 + len(lanes_) * LANE_HEIGHT + 16
    x_at = LABEL_WIDTH
    for state in STATES:
        out.append(
            f'<rect x="{x_at}" y="{legend_y - 10}" width="12" height="12" fill="{STATE_FILLS[state]}"/>'
            f'<text x="{x_at + 16}" y="{legend_y}">{state}</text>'
        )
        x_at += 110
    out.append("</svg>")
    return "\n".join(out)


def html(lanes_: Sequence[Lane]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>fsm-hub timeline</title></head>\n<body>\n" + svg(lanes_) + "\n</body></html>\n"
    )
