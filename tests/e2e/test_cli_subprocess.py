"""The installed `fsm-hub` console script, run as a real process on a log this test wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.logs import Sample

pytestmark = pytest.mark.e2e
FSM_HUB = Path(sys.executable).with_name("fsm-hub")


def fsm_hub(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert FSM_HUB.exists(), f"{FSM_HUB} is missing: install the project (pip install -e .)"
    return subprocess.run(
        [str(FSM_HUB), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_the_console_script_reads_a_real_log(sample_log: Sample) -> None:
    listed = fsm_hub("instances", "--json", env={"FSM_HUB_DB": str(sample_log.path)})
    assert listed.returncode == 0
    assert listed.stderr.startswith("fsm-hub: no hub is running; the last one (pid 1) ended without")
    assert [(i["name"], i["state"]) for i in json.loads(listed.stdout)] == [
        ("api", "retrying"),
        ("docs", "dead"),
        ("docs", "discovered"),
        ("web", "active"),
    ]
    history = fsm_hub("history", "web", "--db", str(sample_log.path))
    assert history.returncode == 0
    assert "discovered → connecting" in history.stdout
    verified = fsm_hub("replay", "--verify", "--db", str(sample_log.path))
    assert verified.returncode == 0
    assert verified.stdout.splitlines()[-1] == "verified: every stream gapless, every transition legal"


def test_the_console_script_fails_in_one_line(tmp_path: Path) -> None:
    corrupt = tmp_path / "events.db"
    corrupt.write_bytes(b"this is not a database\n" * 20)
    result = fsm_hub("instances", "--db", str(corrupt))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"fsm-hub: {corrupt} is not an fsm-hub event log (not a SQLite database)\n"
