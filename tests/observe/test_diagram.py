"""`fsm-hub diagram`: what the README shows, the same bytes on every run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fsm_hub.core.machine import EVENTS, STATES, legal_targets
from fsm_hub.observe.diagram import dot, edges, mermaid

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_shows_exactly_what_diagram_prints() -> None:
    block = re.search(r"```mermaid\n(.*?)\n```", README.read_text(), re.S)
    assert block is not None
    assert block.group(1) == mermaid()


def test_every_legal_transition_is_drawn_once_with_its_event_name() -> None:
    drawn = {(event, source, target) for source, target, event, _ in edges()}
    legal = {(event, source, target) for (event, source), targets in legal_targets().items()
             for target in targets}
    assert drawn == legal and len(edges()) == len(drawn)
    assert {event for _, _, event, _ in edges()} == set(EVENTS)
    for text in (mermaid(), dot()):
        assert "on_enter" not in text and "before_" not in text
        assert all(state in text for state in STATES)


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["mermaid", "dot"])
def test_diagram_output_is_byte_identical_across_processes(fmt: str) -> None:
    script = Path(sys.executable).with_name("fsm-hub")
    runs = {subprocess.run([str(script), "diagram", "--format", fmt], capture_output=True, timeout=30,
                           check=True).stdout for _ in range(3)}
    assert len(runs) == 1
    assert runs.pop().decode().rstrip("\n") == (mermaid() if fmt == "mermaid" else dot())
