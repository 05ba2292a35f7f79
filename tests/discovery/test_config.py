"""Configured servers against real files in tmp_path; no test waits on a timer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pickle
import time
from collections.abc import AsyncGenerator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from fsm_hub.discovery.config import (
    ConfiguredServers,
    ServerChanged,
    ServerFound,
    ServerSpec,
    default_config_path,
    diff,
    instance_id,
    is_configured_id,
    parse_config,
    parse_entry,
)
from fsm_hub.discovery.directory import Gone
from fsm_hub.errors import ConfigError

SECRET = "s3cr3t-value-never-shown"
ENVIRON = {"TOKEN": SECRET, "HOME": "/home/me"}


class Warnings(list[str]):
    def __call__(self, message: str) -> None:
        self.append(message)


class ManualSleep:
    """An injected sleeper whose sleeps end when the test says `tick()`."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[None]] = []
        self.credit = 0
        """Ticks given before anyone slept: the next sleeps end at once."""

    def __call__(self, seconds: float) -> Awaitable[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.credit:
            self.credit -= 1
            future.set_result(None)
        else:
            self.waiting.append(future)
        return future

    def tick(self) -> None:
        waiting, self.waiting = self.waiting, []
        if not waiting:
            self.credit += 1
        for future in waiting:
            if not future.done():
                future.set_result(None)


def sleep_forever(seconds: float) -> Awaitable[None]:
    return asyncio.get_running_loop().create_future()


def write_config(path: Path, servers: dict[str, Any], **top: Any) -> Path:
    """Atomically, as an editor or `fsm-hub servers add` does: temp file, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.parent / f".{path.name}.tmp"
    temp.write_text(json.dumps({"mcpServers": servers, **top}))
    temp.chmod(0o600)
    os.replace(temp, path)
    return path


def parse(servers: dict[str, Any], environ: dict[str, str] = ENVIRON, **top: Any) -> Any:
    return parse_config(json.dumps({"mcpServers": servers, **top}).encode(), "servers.json", environ)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    folder = tmp_path / "fsm-hub"
    folder.mkdir(mode=0o700)
    return folder / "servers.json"


# --- parsing ---------------------------------------------------------------------------------


def test_a_stdio_entry_is_expanded_from_the_environment() -> None:
    parsed = parse(
        {
            "files": {
                "command": "${HOME}/bin/srv",
                "args": ["--token", "${TOKEN}", "${MISSING:-fallback}"],
                "env": {"API_KEY": "${TOKEN}", "PLAIN": "x"},
                "cwd": "~/work",
            }
        }
    )
    spec = parsed.servers["cfg-files"]
    assert (spec.kind, spec.command, spec.args) == (
        "stdio",
        "/home/me/bin/srv",
        ("--token", SECRET, "fallback"),
    )
    assert spec.env.reveal() == {"API_KEY": SECRET, "PLAIN": "x"}
    assert spec.cwd == str(Path("~/work").expanduser())
    assert parsed.warnings == ()


def test_http_entries_accept_both_type_names_and_no_type_with_a_url() -> None:
    parsed = parse(
        {
            "a": {
                "type": "http",
                "url": "http://127.0.0.1:1/mcp",
                "headers": {"Authorization": "Bearer ${TOKEN}"},
            },
            "b": {"type": "streamable-http", "url": "https://example.com/mcp"},
            "c": {"url": "https://example.com/other"},
        }
    )
    assert [s.kind for s in parsed.servers.values()] == ["http", "http", "http"]
    assert parsed.servers["cfg-a"].headers.reveal() == {"Authorization": f"Bearer {SECRET}"}


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"args": ["x"]}, "'command' is missing"),
        ({"command": ""}, "'command' must be a non-empty string"),
        ({"command": "x", "args": "not a list"}, "'args' must be an array of strings"),
        ({"command": "x", "env": {"A": 1}}, "'env' must be an object of strings"),
        ({"command": "x", "env": {"A": "${UNSET_VAR}"}}, "env.A: ${UNSET_VAR} is not set"),
        ({"type": "sse", "url": "http://x"}, "deprecated HTTP+SSE"),
        ({"type": "websocket"}, "unknown 'type'"),
        ({"type": "http", "url": "ftp://x"}, "must be an http(s) URL"),
        ("just a string", "it must be an object"),
    ],
)
def test_a_bad_entry_is_skipped_with_its_reason(entry: Any, reason: str) -> None:
    parsed = parse({"bad": entry, "good": {"command": "ok"}})
    assert list(parsed.servers) == ["cfg-good"]
    assert parsed.invalid == frozenset({"cfg-bad"})
    [warning] = parsed.warnings
    assert "server 'bad' skipped" in warning and reason in warning


def test_unknown_keys_are_ignored_with_a_warning() -> None:
    parsed = parse({"s": {"command": "x", "autoApprove": [], "disabled": False}}, globalShortcut="x")
    assert list(parsed.servers) == ["cfg-s"]
    assert parsed.warnings == (
        "servers.json: unknown key 'globalShortcut' ignored",
        "servers.json: server 's': unknown key 'autoApprove' ignored",
        "servers.json: server 's': unknown key 'disabled' ignored",
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "is not valid JSON"),
        (b"[]", "must hold a JSON object"),
        (b'{"mcpServers": []}', "'mcpServers' must be an object"),
        (b"\xff\xfe", "is not UTF-8"),
    ],
)
def test_a_file_that_does_not_parse_is_an_error(data: bytes, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_config(data, "servers.json", ENVIRON)


def test_an_empty_file_means_no_servers() -> None:
    assert parse_config(b"  \n", "servers.json", ENVIRON).servers == {}


# --- ids -------------------------------------------------------------------------------------


def test_ids_are_stable_readable_and_never_look_announced() -> None:
    assert instance_id("github") == "cfg-github"
    assert instance_id("my server/β") == instance_id("my server/β")
    odd = instance_id("my server/β")
    assert odd.startswith("cfg-my_server-") and len(odd.rsplit("-", 1)[1]) == 8
    assert instance_id("a b") != instance_id("a_b")
    assert instance_id("x" * 100) != instance_id("x" * 101)
    assert is_configured_id(odd) and not is_configured_id("abc123")


def test_two_names_with_one_id_keep_the_first() -> None:
    name = "a b"
    clash = instance_id(name).removeprefix("cfg-")  # a safe name that maps onto the same id
    parsed = parse({name: {"command": "x"}, clash: {"command": "y"}})
    assert [s.name for s in parsed.servers.values()] == [name]
    assert "is taken by 'a b'" in parsed.warnings[0]


# --- secrets ---------------------------------------------------------------------------------


def test_no_secret_value_shows_in_repr_str_or_description() -> None:
    parsed = parse(
        {
            "s": {"command": "srv", "args": ["--key=${TOKEN}"], "env": {"API_KEY": "${TOKEN}"}},
            "h": {"type": "http", "url": "http://127.0.0.1:9/mcp?k=${TOKEN}", "headers": {"X-Key": SECRET}},
        }
    )
    for spec in parsed.servers.values():
        description = spec.describe()
        shown = [
            repr(spec),
            str(spec),
            repr(spec.env),
            str(spec.headers),
            f"{spec.env}",
            repr(description),
            json.dumps(description.to_json()),
            repr(ServerFound(spec)),
            repr(parsed),
        ]
        for text in shown:
            assert SECRET not in text
    s = parsed.servers["cfg-s"].describe()
    assert (s.args, s.env) == (("--key=${TOKEN}",), ("API_KEY",))
    assert "'API_KEY': '***'" in repr(parsed.servers["cfg-s"])
    assert parsed.servers["cfg-h"].describe().headers == ("X-Key",)


def test_secrets_cannot_be_copied_out_by_accident() -> None:
    env = parse({"s": {"command": "srv", "env": {"API_KEY": SECRET}}}).servers["cfg-s"].env
    with pytest.raises(TypeError):
        json.dumps(env)
    with pytest.raises(TypeError):
        dict(env)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        pickle.dumps(env)
    assert SECRET not in repr(
        dataclasses.asdict(parse({"s": {"command": "x", "env": {"K": SECRET}}}).servers["cfg-s"])
    )
    assert "API_KEY" in env and len(env) == 1 and env.names() == ("API_KEY",)


def test_the_fingerprint_follows_secret_values_without_revealing_them() -> None:
    one = parse({"s": {"command": "srv", "env": {"K": "${TOKEN}"}}}).servers["cfg-s"]
    two = parse({"s": {"command": "srv", "env": {"K": "${TOKEN}"}}}, {"TOKEN": "other"}).servers["cfg-s"]
    assert one.describe().fingerprint != two.describe().fingerprint
    assert one.describe().fingerprint == one.describe().fingerprint
    assert one.describe().to_json()["env"] == two.describe().to_json()["env"] == ["K"]


def test_an_error_about_a_value_names_the_key_only() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_entry("s", {"command": "x", "env": {"K": SECRET, "N": 5}}, "servers.json")
    assert SECRET not in str(caught.value)


# --- diff ------------------------------------------------------------------------------------


def spec(name: str, **fields: Any) -> ServerSpec:
    return parse({name: {"command": "srv", **fields}}).servers[instance_id(name)]


def test_diff_says_found_changed_and_gone_in_id_order() -> None:
    old = {s.id: s for s in (spec("a"), spec("b"), spec("c", env={"K": "1"}))}
    new = {s.id: s for s in (spec("b"), spec("c", env={"K": "2"}), spec("d"))}
    changes = diff(old, new)
    assert [type(c) for c in changes] == [Gone, ServerChanged, ServerFound]
    assert changes[0] == Gone("cfg-a", "removed from servers.json")
    assert isinstance(changes[1], ServerChanged) and changes[1].previous.env.reveal() == {"K": "1"}
    assert diff(new, new) == []


@pytest.mark.parametrize(
    "change",
    [{"args": ["x"]}, {"env": {"K": "v"}}, {"cwd": "/tmp"}, {"command": "other"}],
)
def test_every_setting_is_a_change(change: dict[str, Any]) -> None:
    assert [type(c) for c in diff({"cfg-a": spec("a")}, {"cfg-a": spec("a", **change)})] == [ServerChanged]


# --- the file: default path, security, last good config ---------------------------------------


def test_the_default_path_follows_xdg() -> None:
    assert default_config_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/fsm-hub/servers.json")
    assert default_config_path({"HOME": "/h"}) == Path("/h/.config/fsm-hub/servers.json")
    assert default_config_path({"FSM_HUB_CONFIG": "/c.json", "HOME": "/h"}) == Path("/c.json")


def test_a_missing_file_means_no_servers_and_no_warning(config: Path) -> None:
    warnings = Warnings()
    servers = ConfiguredServers(config, warn=warnings)
    assert servers.load() == []
    assert (warnings, servers.problem) == ([], None)


def test_a_broken_file_keeps_the_last_good_config_and_says_why_once(config: Path) -> None:
    warnings = Warnings()
    servers = ConfiguredServers(config, warn=warnings, environ=ENVIRON)
    write_config(config, {"a": {"command": "srv"}})
    [found] = servers.load()
    assert isinstance(found, ServerFound)

    config.write_text("{ half written")
    assert servers.load() == [] and servers.load() == []
    assert list(servers.current) == ["cfg-a"]
    assert (
        len(warnings) == 1 and "not valid JSON" in warnings[0] and "keeping the last good one" in warnings[0]
    )
    assert servers.problem is not None

    write_config(config, {"a": {"command": "srv"}, "b": {"command": "srv"}})
    assert [type(c) for c in servers.load()] == [ServerFound]
    assert servers.problem is None


def test_a_file_emptied_mid_write_keeps_the_servers_running(config: Path) -> None:
    warnings = Warnings()
    servers = ConfiguredServers(config, warn=warnings, environ=ENVIRON)
    write_config(config, {"a": {"command": "srv"}})
    servers.load()
    config.write_text("")  # an editor that truncates, then writes
    assert servers.load() == []
    assert list(servers.current) == ["cfg-a"] and "is empty" in warnings[0]
    config.unlink()  # deleted: that is a decision, not a write in progress
    assert servers.load() == [Gone("cfg-a", f"removed from {config}")]


def test_a_bad_entry_keeps_its_last_good_settings(config: Path) -> None:
    servers = ConfiguredServers(config, warn=Warnings(), environ=ENVIRON)
    write_config(config, {"a": {"command": "srv"}})
    servers.load()
    write_config(config, {"a": {"command": 5}})
    assert servers.load() == []
    assert servers.current["cfg-a"].command == "srv"
    assert servers.problem == "1 entry skipped"


@pytest.mark.parametrize(
    ("file_mode", "dir_mode", "reason"),
    [(0o666, 0o700, "writable by every user"), (0o600, 0o777, "writable by every user")],
)
def test_a_config_others_can_write_is_refused(
    config: Path, file_mode: int, dir_mode: int, reason: str
) -> None:
    warnings = Warnings()
    servers = ConfiguredServers(config, warn=warnings, environ=ENVIRON)
    write_config(config, {"a": {"command": "srv"}})
    servers.load()
    config.chmod(file_mode)
    config.parent.chmod(dir_mode)
    try:
        changes = servers.load()
    finally:
        config.parent.chmod(0o700)
    assert changes == [Gone("cfg-a", servers.problem or "")]
    assert "config refused" in warnings[0] and reason in warnings[0]
    assert servers.current == {}


def test_a_symlinked_config_is_followed_and_its_target_checked(tmp_path: Path, config: Path) -> None:
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir(mode=0o700)
    write_config(dotfiles / "servers.json", {"a": {"command": "srv"}})
    config.symlink_to(dotfiles / "servers.json")
    assert [type(c) for c in ConfiguredServers(config, warn=Warnings()).load()] == [ServerFound]


# --- the watch loop ----------------------------------------------------------------------------


async def next_batch(changes: AsyncGenerator[list[Any], None]) -> list[Any]:
    return await asyncio.wait_for(anext(changes), 5)


async def test_polling_applies_an_edit_tick_by_tick(config: Path) -> None:
    clock = ManualSleep()
    servers = ConfiguredServers(config, warn=Warnings(), use_watcher=False, sleep=clock, environ=ENVIRON)
    changes = servers.changes()
    assert await next_batch(changes) == []

    write_config(config, {"a": {"command": "srv"}})
    clock.tick()
    assert [type(c) for c in await next_batch(changes)] == [ServerFound]

    write_config(config, {})
    clock.tick()
    assert await next_batch(changes) == [Gone("cfg-a", f"removed from {config}")]
    await changes.aclose()


async def test_the_watcher_applies_an_atomic_write_within_a_second(config: Path) -> None:
    write_config(config, {"a": {"command": "srv"}})
    changes = ConfiguredServers(config, warn=Warnings(), sleep=sleep_forever, environ=ENVIRON).changes()
    assert [type(c) for c in await next_batch(changes)] == [ServerFound]
    pending = asyncio.ensure_future(anext(changes))
    for _ in range(20):  # the watch task registers its inotify watch on its first step
        await asyncio.sleep(0)

    written = time.monotonic()
    write_config(config, {"a": {"command": "srv", "args": ["--new"]}})
    [changed] = await asyncio.wait_for(pending, 5)
    assert isinstance(changed, ServerChanged) and changed.server.args == ("--new",)
    assert time.monotonic() - written < 1.0
    await changes.aclose()


async def test_closing_the_stream_stops_the_watcher(config: Path) -> None:
    changes = ConfiguredServers(config, warn=Warnings(), sleep=sleep_forever).changes()
    await next_batch(changes)
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) > 1
    await changes.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_a_config_owned_by_another_user_is_refused(config: Path) -> None:
    warnings = Warnings()
    write_config(config, {"a": {"command": "srv"}})
    os.chown(config, 65534, 65534)
    assert ConfiguredServers(config, warn=warnings).load() == []
    assert "owned by uid 65534" in warnings[0]
