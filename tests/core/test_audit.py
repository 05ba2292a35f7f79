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
from fsm_hub.core.chain import link
from fsm_hub.core.events import transition_data
from fsm_hub.core.view import fold
from fsm_hub.store.sqlite import EventLog
from tests.logs import Sample


def forge(sample: Sample, tmp_path: Path, *rows: tuple[str, int, str, dict[str, object]]) -> Path:
    """A copy of the sample log with raw rows (stream, version, type, data) appended by sqlite3.

    The forger knows the chain: each row carries the right hash, so only what the rows say is
    wrong (see the tamper tests for rows that break the chain).
    """
    copy = tmp_path / "forged.db"
    shutil.copy(sample.path, copy)
    with sqlite3.connect(copy) as db:
        seq, previous = db.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        for stream, version, type, data in rows:
            seq += 1
            at, text = "2026-03-14T04:00:00.000000+00:00", json.dumps(data)
            previous = link(previous, seq, stream, version, type, at, text)
            db.execute(
                "INSERT INTO events (seq, stream, version, type, at, data, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, stream, version, type, at, text, previous),
            )
    db.close()
    return copy


def tamper(sample: Sample, tmp_path: Path, *statements: str) -> Path:
    """A copy of the sample log changed by raw SQL that does not fix the chain up."""
    copy = tmp_path / "tampered.db"
    shutil.copy(sample.path, copy)
    with sqlite3.connect(copy) as db:
        for statement in statements:
            db.execute(statement)
    db.close()
    return copy


def verify_json(path: Path) -> tuple[int, dict[str, object]]:
    result = CliRunner().invoke(app, ["replay", "--verify", "--json", "--db", str(path)])
    return result.exit_code, json.loads(result.stdout)


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


def test_verify_prints_the_head_and_json_says_the_same(sample_log: Sample) -> None:
    code, report = verify_json(sample_log.path)
    assert code == 0
    with sqlite3.connect(sample_log.path) as db:
        head = "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1"
        head_seq, head_hash = db.execute(head).fetchone()
    assert report == {"ok": True, "events": 16, "head_seq": head_seq, "head_hash": head_hash.hex(),
                      "problems": []}
    code, errors, out = verify(sample_log.path)
    assert (code, errors) == (0, [])
    assert out.splitlines()[-3:] == [
        f"head: seq {head_seq} hash {head_hash.hex()}",
        "hash chain unbroken; every stored snapshot equals the fold at its seq",
        "verified: every stream gapless, every transition legal",
    ]


@pytest.mark.parametrize(
    ("statements", "broken"),
    [
        (["UPDATE events SET at = '2026-03-14T03:14:16.000000+00:00' WHERE seq = 9"], 9),  # edited
        (["DELETE FROM events WHERE seq = 6"], 7),  # deleted: the next row no longer links
        (["UPDATE events SET seq = seq + 100 WHERE seq >= 12",  # inserted (with a seq made for it)
          "INSERT INTO events (seq, stream, version, type, at, data, hash)"
          " SELECT 12, 'hub', 99, 'hub_stopped', at, '{}', hash FROM events WHERE seq = 11",
          "UPDATE events SET seq = seq - 99 WHERE seq >= 112"], 12),
        (["UPDATE events SET seq = -3 WHERE seq = 3", "UPDATE events SET seq = 3 WHERE seq = 4",
          "UPDATE events SET seq = 4 WHERE seq = -3"], 3),  # reordered
    ],
    ids=["edited", "deleted", "inserted", "reordered"],
)
def test_tampering_is_reported_at_the_first_broken_seq(
    sample_log: Sample, tmp_path: Path, statements: list[str], broken: int
) -> None:
    path = tamper(sample_log, tmp_path, *statements)
    code, report = verify_json(path)
    assert code == 1
    assert report["ok"] is False
    problems = report["problems"]
    assert isinstance(problems, list)
    chain = [p for p in problems if "hash chain broken" in p]
    assert chain and chain[0].startswith(f"seq {broken} ")
    with EventLog.open(path) as log:
        assert log.verify().first_broken_seq == broken


def test_the_migration_chains_a_log_written_before_the_chain(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    schema = (Path(__file__).resolve().parents[2] / "migrations" / "0001_events.sql").read_text()
    with sqlite3.connect(old) as db:
        db.executescript(schema)
        db.execute("PRAGMA user_version = 1")
        for seq in range(1, 4):
            db.execute("INSERT INTO events VALUES (?, 'hub', ?, 'hub_started', ?, '{}')",
                       (seq, seq, f"2026-03-14T0{seq}:00:00.000000+00:00"))
    db.close()
    code, report = verify_json(old)  # opening migrates it
    assert (code, report["ok"], report["events"], report["head_seq"]) == (0, True, 3, 3)
    expected = bytes(32)
    for seq in range(1, 4):
        at = f"2026-03-14T0{seq}:00:00.000000+00:00"
        expected = link(expected, seq, "hub", seq, "hub_started", at, "{}")
    assert report["head_hash"] == expected.hex()
