"""`fsm-hub servers` through typer's runner, on real config files and a real event log."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from fsm_hub.cli import app
from fsm_hub.cli_servers import client_config_path
from fsm_hub.discovery.config import ConfiguredServers
from tests.logs import LogBuilder

SECRET = "Bearer very-secret-token"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return tmp_path / "cfg" / "fsm-hub" / "servers.json"


def invoke(config: Path, command: str, *args: str) -> Result:
    """`fsm-hub servers COMMAND --config CONFIG ARGS...`; a slip can never touch the real home."""
    env = {"FSM_HUB_CONFIG": str(config.parent / "default.json"), "FSM_HUB_DB": str(config.parent / "x.db")}
    return CliRunner().invoke(app, ["servers", command, "--config", str(config), *args], env=env)


def servers_in(config: Path) -> dict[str, Any]:
    servers: dict[str, Any] = json.loads(config.read_text())["mcpServers"]
    return servers


def test_add_a_stdio_server_writes_an_owner_only_file(config: Path) -> None:
    result = invoke(config, "add", "files", "--env", "TOKEN=${T}", "--env", "A=b=c", "--cwd", "/srv", "--",
                    "npx", "-y", "server-fs", "--root", "/data")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == f"added stdio server 'files' (instance cfg-files) to {config}\n"
    assert servers_in(config) == {
        "files": {"command": "npx", "args": ["-y", "server-fs", "--root", "/data"],
                  "env": {"TOKEN": "${T}", "A": "b=c"}, "cwd": "/srv"},
    }  # fmt: skip
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    assert [p.name for p in config.parent.iterdir()] == ["servers.json"]  # no temp file left


def test_add_an_http_server_and_the_hub_reads_it(config: Path) -> None:
    result = invoke(
        config, "add", "web", "--url", "http://127.0.0.1:9/mcp", "--header", f"Authorization: {SECRET}"
    )
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    assert servers_in(config)["web"] == {"type": "http", "url": "http://127.0.0.1:9/mcp",
                                         "headers": {"Authorization": SECRET}}  # fmt: skip
    [found] = ConfiguredServers(config, warn=pytest.fail).load()
    assert found.server.headers.reveal() == {"Authorization": SECRET}


def test_add_keeps_other_entries_and_keys_and_the_mode_0600(config: Path) -> None:
    config.parent.mkdir(parents=True, mode=0o700)
    config.write_text(json.dumps({"mcpServers": {"old": {"command": "x"}}, "other": 1}))
    config.chmod(0o640)
    assert invoke(config, "add", "new", "--", "y").exit_code == 0
    document = json.loads(config.read_text())
    assert document == {
        "mcpServers": {"old": {"command": "x"}, "new": {"command": "y", "args": []}},
        "other": 1,
    }
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x"], "give either `-- COMMAND [ARGS...]` or `--url URL`"),
        (["x", "--url", "http://h/mcp", "--", "cmd"], "give either `-- COMMAND [ARGS...]` or `--url URL`"),
        (["x", "--url", "http://h/mcp", "--env", "A=1"], "--env and --cwd are for commands, not for --url"),
        (["x", "--header", "A:1", "--", "cmd"], "--header is for --url servers"),
        (["x", "--env", "NOVALUE", "--", "cmd"], "--env needs K=V, got 'NOVALUE' without '='"),
        (["x", "--url", "ftp://h"], "'url' must be an http(s) URL, got 'ftp://h'"),
    ],
)
def test_add_refuses_bad_input_in_one_line(config: Path, args: list[str], message: str) -> None:
    result = invoke(config, "add", *args)
    assert (result.exit_code, result.stderr) == (1, f"fsm-hub: {message}\n")
    assert not config.exists()


def test_add_refuses_a_name_that_exists_and_remove_removes_it(config: Path) -> None:
    assert invoke(config, "add", "a", "--", "x").exit_code == 0
    again = invoke(config, "add", "a", "--", "y")
    assert again.exit_code == 1 and "a server named 'a' is in" in again.stderr
    assert invoke(config, "remove", "a").stdout == f"removed 'a' from {config}\n"
    assert servers_in(config) == {}
    gone = invoke(config, "remove", "a")
    assert (gone.exit_code, gone.stderr) == (1, f"fsm-hub: no server named 'a' in {config}\n")


def test_list_shows_names_not_values_and_states_from_the_log(config: Path, tmp_path: Path) -> None:
    invoke(config, "add", "files", "--env", f"TOKEN={SECRET}", "--", "srv", "--flag")
    invoke(config, "add", "web", "--url", "http://127.0.0.1:9/mcp", "--header", f"Authorization: {SECRET}")
    log = LogBuilder()
    log.discover("cfg-files", "files")
    log.transition("cfg-files", "connect", "connecting")
    log.transition("cfg-files", "connected", "active")
    db = log.write(tmp_path / "events.db")

    result = invoke(config, "list", "--db", str(db))
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    assert result.stdout.splitlines() == [
        "NAME   ID         KIND   STATE    COMMAND / URL           SECRETS",
        "files  cfg-files  stdio  active   srv --flag              TOKEN=***",
        "web    cfg-web    http   unknown  http://127.0.0.1:9/mcp  Authorization=***",
    ]
    listed = json.loads(invoke(config, "list", "--json", "--db", str(tmp_path / "missing.db")).stdout)
    assert [(s["id"], s["state"], s["env"], s["headers"]) for s in listed] == [
        ("cfg-files", "unknown", ["TOKEN"], []),
        ("cfg-web", "unknown", [], ["Authorization"]),
    ]
    assert SECRET not in json.dumps(listed)


def test_list_with_no_config_is_empty_and_a_refused_one_is_one_line(config: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "none.db")
    assert invoke(config, "list", "--json", "--db", db).stdout == "[]\n"
    invoke(config, "add", "a", "--", "x")
    config.chmod(0o666)
    result = invoke(config, "list", "--db", db)
    assert (result.exit_code, result.stderr) == (
        1,
        f"fsm-hub: {config} is writable by every user (mode 0666)\n",
    )


@pytest.mark.parametrize("client", ["claude-desktop", "claude-code", "cursor"])
def test_import_copies_new_names_and_skips_existing_ones(config: Path, tmp_path: Path, client: str) -> None:
    theirs = tmp_path / "theirs.json"
    theirs.write_text(json.dumps({
        "globalShortcut": "Ctrl+Space",
        "mcpServers": {
            "files": {"command": "npx", "args": ["-y", "fs"], "env": {"K": SECRET}},
            "web": {"type": "http", "url": "http://127.0.0.1:9/mcp"},
            "broken": {"args": []},
        },
    }))  # fmt: skip
    invoke(config, "add", "web", "--url", "http://127.0.0.1:8/mcp")

    result = invoke(config, "import", client, str(theirs))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"imported 1 of 3 servers from {theirs} into {config}: files\n"
    assert result.stderr.splitlines() == [
        "skipped 'web': a server of that name is configured already",
        "skipped 'broken': 'command' is missing",
    ]
    assert SECRET not in result.output
    assert servers_in(config) == {
        "web": {"type": "http", "url": "http://127.0.0.1:8/mcp"},
        "files": {"command": "npx", "args": ["-y", "fs"], "env": {"K": SECRET}},
    }
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_import_says_where_it_looked(config: Path, tmp_path: Path) -> None:
    result = invoke(config, "import", "cursor", str(tmp_path / "nope.json"))
    assert (result.exit_code, result.stderr) == (
        1,
        f"fsm-hub: {tmp_path / 'nope.json'} does not exist (give the path of cursor's config)\n",
    )
    unknown = invoke(config, "import", "vim", str(tmp_path / "x.json"))
    assert unknown.stderr == "fsm-hub: unknown client 'vim': claude-desktop, claude-code, cursor\n"


def test_each_client_keeps_its_config_where_it_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, project = tmp_path / "home", tmp_path / "project"
    project.mkdir()
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    assert client_config_path("claude-code", home, project) == home / ".claude.json"
    (project / ".mcp.json").write_text("{}")
    assert client_config_path("claude-code", home, project) == project / ".mcp.json"
    assert client_config_path("cursor", home, project) == home / ".cursor" / "mcp.json"
    (project / ".cursor").mkdir()
    (project / ".cursor" / "mcp.json").write_text("{}")
    assert client_config_path("cursor", home, project) == project / ".cursor" / "mcp.json"
    desktop = client_config_path("claude-desktop", home, project)
    assert desktop.name == "claude_desktop_config.json" and desktop.is_relative_to(home)
