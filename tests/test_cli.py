"""The `fsm-hub` commands through typer's runner, on the sample log of tests/logs.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fsm_hub.cli import app, main
from fsm_hub.core.machine import STATES
from fsm_hub.observe import tables
from fsm_hub.store.schema import latest_version
from tests.logs import Sample

HISTORY_KEYS = ["seq", "stream", "version", "type", "at", "data"]
INSTANCE_KEYS = ["id", "name", "directory", "port", "url", "pid", "state", "since", "retry_count",
                 "last_error", "sessions", "kind", "source"]
# The sample's times: event n (from 1) is at 03:14:15.926535 + (n - 1) s on 2026-03-14, UTC.
AT_SEQ_8 = "2026-03-14T03:14:22.926535"  # api's first connect_failed


NOW = datetime(2026, 3, 14, 4, 14, 15, tzinfo=UTC)
"""What relative times are measured from: an hour after the sample log began."""


@pytest.fixture(autouse=True)
def pinned_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tables, "now", lambda: NOW)


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def no_log(path: Path) -> str:
    return (f"no event log at {path} (start a hub with `fsm-hub serve`, or point --db / $FSM_HUB_DB"
            " at an existing log)")


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
        "TIME                            EVENT                FROM → TO                REASON",
        "2026-03-14 03:14:16Z (59m ago)  instance_discovered                           "
        "port 8001, pid 4242, http://127.0.0.1:8001/mcp",
        "2026-03-14 03:14:18Z (59m ago)  connect              discovered → connecting  test",
        "2026-03-14 03:14:19Z (59m ago)  connected            connecting → active      test",
        "2026-03-14 03:14:20Z (59m ago)  session_connected                             session session-1",
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
        "2026-03-14 03:14:15Z (59m ago)  hub_started             pid=1, version=0.1.0, instances_dir=/run"
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
    for args in (["history", "web"], ["history", "hub"], ["history", "--all", "--follow"]):
        assert_one_line_error(invoke(*args, "--db", str(missing)), no_log(missing))
    assert not missing.exists()


# -- instances ---------------------------------------------------------------------------------


def test_instances_table(sample_log: Sample) -> None:
    result = invoke("instances", "--db", str(sample_log.path))
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "ID                NAME  KIND       STATE       SINCE                           PORT  RETRIES  "
        "LAST ERROR",
        "a1b2c3d4e5f60002  api   announced  retrying    2026-03-14 03:14:24Z (59m ago)  8002  2        "
        "connection refused",
        "b7e8f9000000aaaa  docs  announced  dead        2026-03-14 03:14:29Z (59m ago)  8003  0        "
        "gave up",
        "b7e8f9000000bbbb  docs  announced  discovered  2026-03-14 03:14:30Z (59m ago)  8004  0",
        "a1b2c3d4e5f60001  web   announced  active      2026-03-14 03:14:19Z (59m ago)  8001  0",
    ]
    assert result.stderr == (
        "fsm-hub: no hub is running; the last one (pid 1) ended without recording a stop: states as of"
        " its last event at 2026-03-14T03:14:30.926535+00:00\n")


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


def test_instances_on_a_missing_log_fails_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "deep" / "none.db"
    for command in (["instances"], ["status"], ["replay", "--verify"], ["replay"]):
        assert_one_line_error(invoke(*command, "--db", str(missing)), no_log(missing))
    assert not missing.parent.exists()


# -- where the log is --------------------------------------------------------------------------


def test_the_log_comes_from_fsm_hub_db(sample_log: Sample, tmp_path: Path) -> None:
    env: dict[str, str | None] = {"FSM_HUB_DB": str(sample_log.path), "XDG_STATE_HOME": str(tmp_path)}
    result = invoke("instances", "--json", env=env)
    assert len(json.loads(result.stdout)) == 4
    result = invoke("instances", "--json", "--db", str(tmp_path / "other.db"), env=env)
    assert_one_line_error(result, no_log(tmp_path / "other.db"))  # --db wins


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
    result = invoke("diagram", "--format", "png")
    assert result.exit_code == 2
    assert "'png' is not one of" in " ".join(result.stderr.split())


def test_main_exits_with_the_commands_code(sample_log: Sample, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["history", "nobody", "--db", str(sample_log.path)])
    assert done.value.code == 1
    assert capsys.readouterr().err == "fsm-hub: no instance matches 'nobody'\n"
    with pytest.raises(SystemExit) as done:
        main(["diagram"])
    assert done.value.code == 0


# -- small truths, readable tables, the rest of the surface -------------------------------------


def hostile_log(tmp_path: Path) -> Path:
    from tests.logs import LogBuilder

    log = LogBuilder()
    log.hub_started()
    log.add("e1", "instance_discovered", {"name": "evil\x1b[2J\nFORGED ROW", "directory": "/x",
                                           "port": 9001, "pid": None,
                                           "url": "http://admin:secret@127.0.0.1:9001/mcp"})
    log.transition("e1", "connect", "connecting", reason="discovered")
    log.transition("e1", "remove", "dead", reason="process 15390 is gone",
                   error="process 15390 is gone")
    log.add("e1", "instance_updated", {"port": 9002})
    return log.write(tmp_path / "hostile.db")


def test_tables_escape_control_characters_and_redact_credentials(tmp_path: Path) -> None:
    path = hostile_log(tmp_path)
    for args in (["instances"], ["history", "e1"], ["history", "--all"], ["timeline"]):
        result = invoke(*args, "--db", str(path))
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.stdout and "secret" not in result.stdout
        assert not any(line.startswith("FORGED") for line in result.stdout.splitlines())
    assert "evil\\x1b[2J\\nFORGED ROW" in invoke("instances", "--db", str(path)).stdout


def test_history_says_each_thing_once_and_omits_the_unknown(tmp_path: Path) -> None:
    lines = invoke("history", "e1", "--db", str(hostile_log(tmp_path))).stdout.splitlines()
    assert [line.split("  ", 1)[1].split() for line in lines[1:]] == [
        ["instance_discovered", "port", "9001,", "http://***@127.0.0.1:9001/mcp"],
        ["connect", "discovered", "→", "connecting", "discovered"],
        ["remove", "connecting", "→", "dead", "process", "15390", "is", "gone"],
        ["instance_updated", "changed:", "port", "9002"],
    ]
    assert "None" not in "\n".join(lines)


def test_instances_json_keeps_the_full_announcement_after_an_update(tmp_path: Path) -> None:
    [instance] = json.loads(invoke("instances", "--json", "--db", str(hostile_log(tmp_path))).stdout)
    announced = (instance["name"], instance["port"], instance["directory"])
    assert announced == ("evil\x1b[2J\nFORGED ROW", 9002, "/x")


@pytest.mark.parametrize(
    ("args", "seqs"),
    [(["--since", "2026-03-14T03:14:28Z"], [14, 15, 16]),
     (["--until", "2026-03-14T03:14:16.926535Z"], [1, 2]),
     (["--since", "3h"], list(range(1, 17))),
     (["--since", "59m55s"], None),
     (["--since", "2026-03-14T03:14:28Z", "--limit", "2"], [15, 16])],
    ids=["since", "until", "relative", "bad-span", "since-and-limit"],
)
def test_history_all_since_and_until(sample_log: Sample, args: list[str], seqs: list[int] | None) -> None:
    result = invoke("history", "--all", "--json", *args, "--db", str(sample_log.path))
    if seqs is None:
        assert_one_line_error(result, "--since: '59m55s' is neither ISO 8601 nor a span like 10m, 2h, 3d")
        return
    assert [e["seq"] for e in json.loads(result.stdout)] == seqs


def test_history_relative_since(sample_log: Sample) -> None:
    result = invoke("history", "--all", "--json", "--since", "3586s", "--db", str(sample_log.path))
    assert [e["seq"] for e in json.loads(result.stdout)] == [15, 16]  # NOW - 3586 s = 03:14:29


def test_history_needs_one_instance_or_all(sample_log: Sample) -> None:
    assert_one_line_error(invoke("history", "--db", str(sample_log.path)),
                          "give an INSTANCE or --all (not both)")
    assert_one_line_error(invoke("history", "web", "--all", "--db", str(sample_log.path)),
                          "give an INSTANCE or --all (not both)")


def test_status_without_a_hub(sample_log: Sample) -> None:
    result = invoke("status", "--json", "--db", str(sample_log.path))
    assert result.exit_code == 0
    facts = json.loads(result.stdout)
    assert facts["hub"]["running"] is False and facts["hub"]["last_pid"] == 1
    assert facts["instances"] == {"total": 4, "by_state": {"active": 1, "dead": 1, "discovered": 1,
                                                           "retrying": 1}}
    assert facts["log"]["events"] == 16
    verified = json.loads(invoke("replay", "--verify", "--json", "--db", str(sample_log.path)).stdout)
    assert facts["log"]["head_hash"] == verified["head_hash"] and len(verified["head_hash"]) == 64
    text = invoke("status", "--db", str(sample_log.path)).stdout.splitlines()
    assert text[0] == "hub:        not running; the last one (pid 1) ended without a stop"
    assert text[1] == "instances:  4 (1 active, 1 dead, 1 discovered, 1 retrying)"


def test_an_empty_log_says_so(tmp_path: Path) -> None:
    from tests.logs import LogBuilder

    log = LogBuilder()
    log.hub_started()
    log.hub_stopped()
    path = log.write(tmp_path / "empty.db")
    result = invoke("instances", "--db", str(path))
    assert result.stdout.startswith("no instances yet — ")
    assert result.stderr.startswith("fsm-hub: no hub is running; hub stopped at 2026-03-14T03:14:16")
    assert invoke("timeline", "--db", str(path)).stdout == "no instances in that span\n"


def test_timeline_text(sample_log: Sample) -> None:
    lines = invoke("timeline", "--db", str(sample_log.path)).stdout.splitlines()
    assert lines[0].strip() == "2026-03-14 03:14:16Z → 2026-03-14 03:14:30Z"  # ends at the last event
    assert [line.split()[0] for line in lines[1:5]] == ["api", "docs", "docs", "web"]
    assert lines[1].endswith("retrying") and lines[4].endswith("active")
    assert "█" in lines[4] and "x" in lines[2]
    assert "discovered" in lines[-1]


@pytest.mark.parametrize("suffix", [".svg", ".html"])
def test_timeline_file_is_well_formed_with_one_lane_per_instance(sample_log: Sample, tmp_path: Path,
                                                                   suffix: str) -> None:
    import xml.etree.ElementTree as ET

    out = tmp_path / f"life{suffix}"
    result = invoke("timeline", "--out", str(out), "--db", str(sample_log.path))
    assert (result.exit_code, result.stdout) == (0, f"wrote {out} (4 lanes)\n")
    text = out.read_text()
    if suffix == ".html":
        assert text.startswith("<!DOCTYPE html>")
        text = text[text.index("<svg"): text.index("</svg>") + 6]
    root = ET.fromstring(text)
    ns = "{http://www.w3.org/2000/svg}"
    lanes = root.findall(f"{ns}g")
    assert [lane.get("data-instance") for lane in lanes] == [Sample.API, Sample.DOCS, Sample.DOCS_TOO,
                                                             Sample.WEB]
    tips = [t.text for t in lanes[0].iter(f"{ns}title")]
    assert any("connect_failed: connecting → retrying (test: connection refused)" in (t or "") for t in tips)
    assert "http" not in text.replace("http://www.w3.org/2000/svg", "")


def test_timeline_of_some_instances_since_a_moment(sample_log: Sample, tmp_path: Path) -> None:
    out = tmp_path / "web.svg"
    invoke("timeline", "web", "api", "--since", "2026-03-14T03:14:20Z", "--out", str(out), "--db",
           str(sample_log.path))
    assert out.read_text().count('<g class="lane"') == 2
    assert_one_line_error(invoke("timeline", "--out", str(tmp_path / "x.png"), "--db", str(sample_log.path)),
                          f"--out: {tmp_path / 'x.png'} must end in .svg or .html")


def test_version() -> None:
    from fsm_hub import __version__

    result = invoke("--version")
    assert (result.exit_code, result.stdout) == (0, f"fsm-hub {__version__}\n")


@pytest.mark.parametrize("command", ["history", "instances", "status", "replay", "diagram", "serve",
                                     "timeline", "announce", "run"])
def test_help_shows_metavars_not_types(command: str) -> None:
    result = invoke(command, "--help", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout and "<str>" not in result.stdout
    [usage] = [line for line in result.stdout.splitlines() if "Usage:" in line]
    assert "{" not in usage and "}" not in usage


def test_history_usage_names_instance() -> None:
    usage = invoke("history", "--help", env={"COLUMNS": "200"}).stdout
    assert "Usage: fsm-hub history [OPTIONS] [INSTANCE]" in usage
    diagram_help = invoke("diagram", "--help", env={"COLUMNS": "200"}).stdout
    assert "--format" in diagram_help and "mermaid|dot" in diagram_help


def test_colours_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert tables.colour_enabled(Tty()) is True
    assert tables.colour_enabled(object()) is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert tables.colour_enabled(Tty()) is False
    rendered = tables.table(("STATE",), [("active",)], colour_column=0, colour=True)
    assert rendered.splitlines()[1] == "\x1b[32mactive\x1b[0m"


@pytest.mark.parametrize(("seconds", "text"), [(0, "just now"), (42, "42s ago"), (300, "5m ago"),
                                               (7200, "2h ago"), (3 * 86400, "3d ago"), (-60, "in 1m")])
def test_relative_times(seconds: int, text: str) -> None:
    from datetime import timedelta

    assert tables.ago(timedelta(seconds=seconds)) == text


def test_serve_instance_needs_mcp() -> None:
    result = invoke("serve", "--instance", "api")
    assert result.exit_code == 1
    expected = "fsm-hub: --instance needs --mcp (over HTTP, use /instances/<id or name>/mcp)"
    assert result.stderr.strip() == expected
