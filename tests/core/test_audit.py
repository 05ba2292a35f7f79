"""`replay --verify`: a clean log passes; forged rows in a copy of it are each reported."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fsm_hub.cli import app
from fsm_hub.core.audit import audit
from fsm_hub.core.events import transition_data
from fsm_hub.core.view import fold
from fsm_hub.store.sqlite import EventLog
from tests.logs import Sample


def forge(sample: Sample, tmp_path: Path, *rows: tuple[str, int, str, dict[str, object]]) -> Path:
    """A copy of the sample log with raw rows (stream, version, type, data) appended by sqlite3."""
    copy = tmp_path / "forged.db"
    shutil.copy(sample.path, copy)
    with sqlite3.connect(copy) as db:
        for stream, version, type, data in rows:
            db.execute(
                "INSERT INTO events (stream, version, type, at, data) VALUES (?, ?, ?, ?, ?)",
                (stream, version, type, "2026-03-14T04:00:00.000000+00:00", json.dumps(data)),
            )
    db.close()
    return copy


def verify(path: Path) -> tuple[int, list[str], str]:
    result = CliRunner().invoke(app, ["replay", "--verify", "--db", str(path)])
    return result.exit_code, result.stderr.splitlines(), result.stdout


def next_version(sample: Sample, stream: str) -> int:
    return sample.log.versions[stream] + 1


def test_a_clean_log_verifies(sample_log: Sample) -> None:
    with EventLog.open(sample_log.path) as log:
        result = audit(log.events())
    assert (result.violations, result.violation_count, result.events) == ([], 0, 16)
    assert result.by_type == {"hub_started": 1, "instance_discovered": 4, "transition": 10,
                              "session_connected": 1}
    assert result.view == fold(sample_log.log.events)
    code, errors, out = verify(sample_log.path)
    assert (code, errors) == (0, [])
    assert out.splitlines()[0] == "events: 16"
    assert "verified: every stream gapless, every transition legal" in out


def test_an_illegal_transition_is_reported(sample_log: Sample, tmp_path: Path) -> None:
    stream = Sample.DOCS_TOO  # discovered: `connected` cannot happen here
    data = transition_data("connected", "discovered", "active", reason="forged")
    path = forge(sample_log, tmp_path, (stream, next_version(sample_log, stream), "transition", data))
    code, errors, _ = verify(path)
    assert code == 1
    assert errors == [
        f"violation: seq 17 ({stream} v2): illegal transition connected: discovered → active",
        "fsm-hub: 1 violation(s) in 17 events",
    ]


def test_a_version_gap_is_reported(sample_log: Sample, tmp_path: Path) -> None:
    stream = Sample.WEB
    skipped = next_version(sample_log, stream) + 1
    data = transition_data("lost", "active", "retrying", reason="forged")
    path = forge(sample_log, tmp_path, (stream, skipped, "transition", data))
    code, errors, _ = verify(path)
    assert code == 1
    assert errors[0] == f"violation: seq 17 ({stream} v{skipped}): version gap, expected v{skipped - 1}"
    assert errors[-1] == "fsm-hub: 1 violation(s) in 17 events"


def test_a_discontinuity_is_reported(sample_log: Sample, tmp_path: Path) -> None:
    stream = Sample.API  # retrying, but this legal transition claims to start from active
    data = transition_data("lost", "active", "retrying", reason="forged")
    path = forge(sample_log, tmp_path, (stream, next_version(sample_log, stream), "transition", data))
    code, errors, _ = verify(path)
    assert code == 1
    assert errors[0] == (
        f"violation: seq 17 ({stream} v6): lost starts from active but the state was retrying"
    )


def test_a_malformed_payload_is_reported(sample_log: Sample, tmp_path: Path) -> None:
    stream = Sample.WEB
    path = forge(sample_log, tmp_path,
                 (stream, next_version(sample_log, stream), "transition", {"event": "lost"}))
    code, errors, _ = verify(path)
    assert code == 1
    assert errors[0] == f"violation: seq 17 ({stream} v5): malformed transition payload"


def test_many_violations_are_counted_but_only_the_first_listed(sample_log: Sample, tmp_path: Path) -> None:
    stream = Sample.DOCS  # dead; each forged `connect` from active is illegal and discontinuous
    first = next_version(sample_log, stream)
    data = transition_data("connect", "active", "connecting", reason="forged")
    path = forge(sample_log, tmp_path, *[(stream, first + n, "transition", data) for n in range(15)])
    code, errors, _ = verify(path)
    assert code == 1
    assert len(errors) == 20 + 1
    assert errors[-1] == "fsm-hub: 30 violation(s) in 31 events"  # illegal and discontinuous, each


@pytest.mark.parametrize("verify_flag", [[], ["--verify"]])
def test_replay_prints_counts(sample_log: Sample, verify_flag: list[str]) -> None:
    result = CliRunner().invoke(app, ["replay", *verify_flag, "--db", str(sample_log.path)])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[:6] == [
        "events: 16",
        "TYPE                 COUNT",
        "hub_started          1",
        "instance_discovered  4",
        "session_connected    1",
        "transition           10",
    ]
    assert lines[6:11] == ["STATE       INSTANCES", "active      1", "dead        1",
                           "discovered  1", "retrying    1"]
