"""The `fsm-hub` commands through typer's runner, on the sample log of tests/logs.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fsm_hub.cli import app, main
from fsm_hub.core.machine import STATES
from fsm_hub.store.schema import latest_version
from tests.logs import Sample

HISTORY_KEYS = ["seq", "stream", "version", "type", "at", "data"]
INSTANCE_KEYS = ["id", "name", "directory", "port", "url", "pid", "state", "since", "retry_count",
                 "last_error", "sessions", "kind", "source"]
# The sample's times: event n (from 1) is at 03:14:15.926535 + (n - 1) s on 2026-03-14, UTC.
AT_SEQ_8 = "2026-03-14T03:14:22.926535"  # api's first connect_failed


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def assert_one_line_error(result: Result, message: str) -> None:
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"fsm-hub: {message}\n"
    assert "Traceback" not in result.output


# -- history -----------------------------------------------------------------------------------


def test_history_table(sample_log: Sample) -> None:
    result = invoke("history", "web", "--db", str(sample_log.path))
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "TIME                              EVENT                FROM → TO                REASON",
        "2026-03-14T03:14:16.926535+00:00  instance_discovered                           "
        "port 8001, pid 4242, http://127.0.0.1:8001/mcp",
        "2026-03-14T03:14:18.926535+00:00  connect              discovered → connecting  test",
        "2026-03-14T03:14:19.926535+00:00  connected            connecting → active      test",
        "2026-03-14T03:14:20.926535+00:00  session_connected                             session session-1",
    ]


def test_history_shows_errors_with_the_reason(sample_log: Sample) -> None:
    result = invoke("history", "b7e8f9000000a", "--db", str(sample_log.path))
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[-2].endswith("lost                 active → retrying        test: connection reset")
    assert lines[-1].endswith("give_up              retrying → dead          test: gave up")


def test_history_json(sample_log: Sample) -> None:
    result = invoke("history", Sample.API, "--json", "--db", str(sample_log.path))
    assert result.exit_code == 0
    printed = json.loads(result.stdout)
    assert all(list(event) == HISTORY_KEYS for event in printed)
    assert printed == [e.to_json() for e in sample_log.log.events if e.stream == Sample.API]
    assert printed[-1]["data"]["error"] == "connection refused"


def test_history_limit_keeps_the_most_recent(sample_log: Sample) -> None:
    result = invoke("history", "api", "--json", "--limit", "2", "--db", str(sample_log.path))
    assert [(e["seq"], e["version"]) for e in json.loads(result.stdout)] == [(9, 4), (10, 5)]
    result = invoke("history", "api", "--json", "--limit", "99", "--db", str(sample_log.path))
    assert len(json.loads(result.stdout)) == 5
    result = invoke("history", "api", "--limit", "0", "--db", str(sample_log.path))
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("ref", "stream"),
    [(Sample.WEB, Sample.WEB), ("a1b2c3d4e5f60002", Sample.API), ("a1b2c3d4e5f6000", None),
     ("web", Sample.WEB), ("b7e8f9000000b", Sample.DOCS_TOO), ("hub", "hub")],
    ids=["id", "id-2", "ambiguous-prefix", "name", "prefix", "hub"],
)
def test_history_resolves_ids_prefixes_and_names(sample_log: Sample, ref: str, stream: str | None) -> None:
    result = invoke("history", ref, "--json", "--db", str(sample_log.path))
    if stream is None:
        assert_one_line_error(
            result, f"{ref!r} matches 2 instances: {Sample.WEB}, {Sample.API}")
        return
    assert result.exit_code == 0
    assert {e["stream"] for e in json.loads(result.stdout)} == {stream}


def test_history_of_the_hub(sample_log: Sample) -> None:
    result = invoke("history", "hub", "--db", str(sample_log.path))
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1] == (
        "2026-03-14T03:14:15.926535+00:00  hub_started             pid=1, version=0.1.0, instances_dir=/run"
    )


@pytest.mark.parametrize(
    ("ref", "message"),
    [("nothing", "no instance matches 'nothing'"),
     ("docs", f"2 instances are named 'docs': {Sample.DOCS}, {Sample.DOCS_TOO}"),
     ("a1b2", f"'a1b2' matches 2 instances: {Sample.WEB}, {Sample.API}")],
    ids=["unknown", "ambiguous-name", "ambiguous-prefix"],
)
def test_history_refuses_unknown_and_ambiguous(sample_log: Sample, ref: str, message: str) -> None:
    assert_one_line_error(invoke("history", ref, "--db", str(sample_log.path)), message)


def test_history_on_a_missing_log(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    assert_one_line_error(invoke("history", "web", "--db", str(missing)), "no instance matches 'web'")
    assert invoke("history", "hub", "--db", str(missing)).exit_code == 0
    assert not missing.exists()


# -- instances ---------------------------------------------------------------------------------


def test_instances_table(sample_log: Sample) -> None:
    result = invoke("instances", "--db", str(sample_log.path))
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "ID                NAME  KIND       STATE       SINCE                             PORT  RETRIES  "
        "LAST ERROR",
        "a1b2c3d4e5f60002  api   announced  retrying    2026-03-14T03:14:24.926535+00:00  8002  2        "
        "connection refused",
        "b7e8f9000000aaaa  docs  announced  dead        2026-03-14T03:14:29.926535+00:00  8003  0        "
        "gave up",
        "b7e8f9000000bbbb  docs  announced  discovered  2026-03-14T03:14:30.926535+00:00  8004  0",
        "a1b2c3d4e5f60001  web   announced  active      2026-03-14T03:14:19.926535+00:00  8001  0",
    ]


def test_instances_json(sample_log: Sample) -> None:
    result = invoke("instances", "--json", "--db", str(sample_log.path))
    assert result.exit_code == 0
    printed = json.loads(result.stdout)
    assert all(list(instance) == INSTANCE_KEYS for instance in printed)
    assert [i["id"] for i in printed] == [Sample.API, Sample.DOCS, Sample.DOCS_TOO, Sample.WEB]
    assert printed[-1] == {
        "id": Sample.WEB, "name": "web", "directory": "/src/web", "port": 8001,
        "url": "http://127.0.0.1:8001/mcp", "pid": 4242, "state": "active",
        "since": "2026-03-14T03:14:19.926535+00:00", "retry_count": 0, "last_error": None,
        "sessions": ["session-1"], "kind": "announced", "source": "",
    }
    assert {i["state"] for i in printed} <= set(STATES)


@pytest.mark.parametrize(
    "moment",
    [f"{AT_SEQ_8}Z", f"{AT_SEQ_8}+00:00", "2026-03-14T05:14:22.926535+02:00",
     "2026-03-13T22:14:22.926535-05:00", AT_SEQ_8, f" {AT_SEQ_8.lower()}z "],
    ids=["Z", "utc-offset", "east", "west", "naive", "lowercase-padded"],
)
def test_instances_at_a_past_moment(sample_log: Sample, moment: str) -> None:
    result = invoke("instances", "--json", "--at", moment, "--db", str(sample_log.path))
    assert result.exit_code == 0, result.stderr
    printed = {i["name"]: i for i in json.loads(result.stdout)}
    assert sorted(printed) == ["api", "web"]
    assert (printed["api"]["state"], printed["api"]["retry_count"]) == ("retrying", 1)
    assert printed["api"]["since"] == f"{AT_SEQ_8}+00:00"


def test_instances_just_before_a_transition(sample_log: Sample) -> None:
    result = invoke("instances", "--json", "--at", "2026-03-14T03:14:22.926534Z", "--db",
                    str(sample_log.path))
    printed = {i["name"]: i for i in json.loads(result.stdout)}
    assert (printed["api"]["state"], printed["api"]["last_error"]) == ("connecting", None)


def test_instances_before_the_log_began(sample_log: Sample) -> None:
    result = invoke("instances", "--json", "--at", "2026-03-14", "--db", str(sample_log.path))
    assert (result.exit_code, json.loads(result.stdout)) == (0, [])


def test_instances_refuses_a_bad_time(sample_log: Sample) -> None:
    result = invoke("instances", "--at", "yesterday", "--db", str(sample_log.path))
    assert_one_line_error(result, "--at: 'yesterday' is not an ISO 8601 time")


def test_instances_on_a_missing_log_is_empty_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "deep" / "none.db"
    result = invoke("instances", "--db", str(missing))
    assert (result.exit_code, result.stdout.splitlines()) == (
        0, ["ID  NAME  KIND  STATE  SINCE  PORT  RETRIES  LAST ERROR"])
    assert not missing.parent.exists()


# -- where the log is --------------------------------------------------------------------------


def test_the_log_comes_from_fsm_hub_db(sample_log: Sample, tmp_path: Path) -> None:
    env: dict[str, str | None] = {"FSM_HUB_DB": str(sample_log.path), "XDG_STATE_HOME": str(tmp_path)}
    result = invoke("instances", "--json", env=env)
    assert len(json.loads(result.stdout)) == 4
    result = invoke("instances", "--json", "--db", str(tmp_path / "other.db"), env=env)
    assert json.loads(result.stdout) == []  # --db wins


def test_the_log_defaults_to_xdg_state_home(sample_log: Sample, tmp_path: Path) -> None:
    state = tmp_path / "xdg-state"
    (state / "fsm-hub").mkdir(parents=True)
    sample_log.path.rename(state / "fsm-hub" / "events.db")
    result = invoke("history", "web", "--json", env={"FSM_HUB_DB": None, "XDG_STATE_HOME": str(state)})
    assert result.exit_code == 0
    assert len(json.loads(result.stdout)) == 4


def test_the_log_falls_back_to_home(sample_log: Sample, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".local" / "state" / "fsm-hub").mkdir(parents=True)
    sample_log.path.rename(home / ".local" / "state" / "fsm-hub" / "events.db")
    env: dict[str, str | None] = {"FSM_HUB_DB": None, "XDG_STATE_HOME": "relative/ignored",
                                  "HOME": str(home)}
    result = invoke("instances", "--json", env=env)
    assert len(json.loads(result.stdout)) == 4


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["history", "web"], ["instances"], ["replay"], ["replay", "--verify"]],
    ids=["history", "instances", "replay", "verify"],
)
@pytest.mark.parametrize(
    ("content", "message"),
    [(b"garbage, not sqlite\n" * 50, "is not an fsm-hub event log (not a SQLite database)"),
     (b"SQLite format 3\x00" + b"\xff" * 2000, "is not an fsm-hub event log (file is not a database)")],
    ids=["garbage", "corrupt-sqlite"],
)
def test_a_corrupt_log_is_one_line_on_stderr(
    tmp_path: Path, command: list[str], content: bytes, message: str
) -> None:
    path = tmp_path / "events.db"
    path.write_bytes(content)
    assert_one_line_error(invoke(*command, "--db", str(path)), f"{path} {message}")
    assert path.read_bytes() == content


def test_a_newer_log_is_one_line_on_stderr(sample_log: Sample) -> None:
    import sqlite3

    with sqlite3.connect(sample_log.path) as db:
        db.execute("PRAGMA user_version = 42")
    db.close()
    result = invoke("instances", "--db", str(sample_log.path))
    assert_one_line_error(
        result, f"{sample_log.path} has schema version 42, newer than this fsm-hub understands"
        f" ({latest_version()}); upgrade fsm-hub")


def test_an_unreadable_log_is_one_line_on_stderr(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory.db"
    directory.mkdir()
    result = invoke("instances", "--db", str(directory))
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("fsm-hub: ")
    assert "Traceback" not in result.output


# -- diagram and main --------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "header"), [([], "stateDiagram-v2"), (["--format", "dot"], "digraph")])
def test_diagram(args: list[str], header: str) -> None:
    result = invoke("diagram", *args)
    assert result.exit_code == 0
    assert result.stdout.startswith(header)
    assert all(state in result.stdout for state in STATES)


def test_diagram_refuses_an_unknown_format() -> None:
    assert_one_line_error(invoke("diagram", "--format", "png"), "--format must be mermaid or dot, not 'png'")


def test_main_exits_with_the_commands_code(sample_log: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["history", "nobody", "--db", str(sample_log.path)])
    assert done.value.code == 1
    assert capsys.readouterr().err == "fsm-hub: no instance matches 'nobody'\n"
    with pytest.raises(SystemExit) as done:
        main(["diagram"])
    assert done.value.code == 0
