"""`fsm-hub servers`: list, add, remove and import configured servers (the `mcpServers` file).

Writes go through a temp file in the same directory and a rename, so the hub's watcher never
reads half a file, and the file is (re)created with mode 0600: it may hold secrets. Values of
`env` and headers are never printed; `list` shows their names.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from fsm_hub.core.view import fold
from fsm_hub.discovery.config import (
    default_config_path,
    instance_id,
    load_document,
    parse_config,
    parse_entry,
    read_config_bytes,
)
from fsm_hub.errors import ConfigError, FsmHubError
from fsm_hub.store.sqlite import EventLog, default_db_path

app = typer.Typer(
    name="servers",
    help="Configured MCP servers (stdio or HTTP) the hub starts and supervises.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Config file (default: $FSM_HUB_CONFIG, else $XDG_CONFIG_HOME/fsm-hub/servers.json, "
        "else ~/.config/fsm-hub/servers.json).",
        show_default=False,
    ),
]
T = TypeVar("T")


def _run(action: Callable[[], T]) -> T:
    """Our errors as one line on stderr and exit 1 (the same contract as the main CLI)."""
    try:
        return action()
    except FsmHubError as exc:
        typer.echo(f"fsm-hub: {exc}", err=True)
        raise typer.Exit(1) from None
    except sqlite3.Error as exc:
        typer.echo(f"fsm-hub: event log error: {exc}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"fsm-hub: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        raise typer.Exit(1) from None


def _path(config: Path | None) -> Path:
    return config if config is not None else default_config_path()


class _Anything(Mapping[str, str]):
    """An environment in which every `${VAR}` is set: to check an entry's shape, not its values."""

    def __getitem__(self, key: str) -> str:
        return "x"

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _read_document(path: Path) -> dict[str, Any]:
    """The whole file as JSON (other keys kept as they are); an empty one if it does not exist."""
    data = read_config_bytes(path)
    if data is None or not data.strip():
        return {}
    document, _ = load_document(data, str(path))
    return document


def _servers(document: dict[str, Any]) -> dict[str, Any]:
    servers = document.setdefault("mcpServers", {})
    assert isinstance(servers, dict)  # load_document checked it
    return servers


def write_atomically(path: Path, document: Mapping[str, Any]) -> None:
    """Temp file (0600) beside the target, fsync, rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2, ensure_ascii=False)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o600)  # whatever the umask did
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(map(len, column)) for column in zip(headers, *rows, strict=True)]
    lines = (
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (headers, *rows)
    )
    return "\n".join(lines)


@app.command("list")
def list_servers(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
    config: ConfigOption = None,
    db: Annotated[
        Path | None,
        typer.Option(
            "--db", help="Event log to read states from (default: as `fsm-hub serve`).", show_default=False
        ),
    ] = None,
) -> None:
    """List configured servers with their state in the log (`unknown` if the log has none)."""

    def show() -> None:
        path = _path(config)
        data = read_config_bytes(path)
        # The hub expands `${VAR}` from its own environment, not ours: check shapes only here.
        parsed = parse_config(data or b"", str(path), _Anything())
        for warning in parsed.warnings:
            typer.echo(f"fsm-hub: {warning}", err=True)
        with EventLog.open(db if db is not None else default_db_path()) as log:
            view = fold(log.events())
        described = [spec.describe() for spec in parsed.servers.values()]
        states = {
            d.id: view.instances[d.id].state if d.id in view.instances else "unknown" for d in described
        }
        if as_json:
            listed = [{"id": d.id, **d.to_json(), "state": states[d.id]} for d in described]
            for item in listed:
                del item["fingerprint"]  # keyed per process: meaningless outside the hub
            typer.echo(json.dumps(listed, indent=2, ensure_ascii=False))
            return
        rows = [
            (
                d.name,
                d.id,
                d.kind,
                states[d.id],
                d.url or " ".join([d.command or "", *d.args]),
                ", ".join(f"{n}=***" for n in (*d.env, *d.headers)),
            )
            for d in described
        ]
        typer.echo(_table(("NAME", "ID", "KIND", "STATE", "COMMAND / URL", "SECRETS"), rows))

    _run(show)


@app.command()
def add(
    name: Annotated[str, typer.Argument(help="The server's name (its id is cfg-NAME).")],
    command: Annotated[
        list[str] | None,
        typer.Argument(help="After `--`: the command and its arguments.", show_default=False),
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="A Streamable HTTP server instead of a command.")
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", metavar="K=V", help="Environment for the command (repeatable)."),
    ] = None,
    header: Annotated[
        list[str] | None, typer.Option("--header", metavar="K:V", help="HTTP header (repeatable).")
    ] = None,
    cwd: Annotated[str | None, typer.Option("--cwd", help="Working directory of the command.")] = None,
    config: ConfigOption = None,
) -> None:
    """Add a server: `add NAME -- CMD [ARGS...]` or `add NAME --url URL` (`${VAR}` kept as written)."""

    def do() -> None:
        entry = _entry(command or [], url, env or [], header or [], cwd)
        parse_entry(name, entry, "the new entry", _Anything())
        path = _path(config)
        document = _read_document(path)
        servers = _servers(document)
        if name in servers:
            raise ConfigError(f"a server named {name!r} is in {path} already; remove it first")
        servers[name] = entry
        write_atomically(path, document)
        kind = "HTTP" if url else "stdio"
        typer.echo(f"added {kind} server {name!r} (instance {instance_id(name)}) to {path}")

    _run(do)


def _entry(
    command: list[str], url: str | None, env: list[str], header: list[str], cwd: str | None
) -> dict[str, Any]:
    if bool(command) == bool(url):
        raise ConfigError("give either `-- COMMAND [ARGS...]` or `--url URL`")
    if url:
        if env or cwd:
            raise ConfigError("--env and --cwd are for commands, not for --url")
        entry: dict[str, Any] = {"type": "http", "url": url}
        if header:
            entry["headers"] = dict(_pair(h, ":", "--header") for h in header)
        return entry
    if header:
        raise ConfigError("--header is for --url servers")
    entry = {"command": command[0], "args": command[1:]}
    if env:
        entry["env"] = dict(_pair(e, "=", "--env") for e in env)
    if cwd:
        entry["cwd"] = cwd
    return entry


def _pair(text: str, separator: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition(separator)
    if not sep or not key.strip():
        # Only the name: the value may be a secret, and this line may end up in a terminal log.
        raise ConfigError(
            f"{option} needs K{separator}V, got {key.strip() or 'nothing'!r} without {separator!r}"
        )
    return key.strip(), value.strip() if separator == ":" else value


@app.command()
def remove(
    name: Annotated[str, typer.Argument(help="The server's name.")],
    config: ConfigOption = None,
) -> None:
    """Remove a server from the config; a running hub stops it (and records why)."""

    def do() -> None:
        path = _path(config)
        document = _read_document(path)
        servers = _servers(document)
        if name not in servers:
            raise ConfigError(f"no server named {name!r} in {path}")
        del servers[name]
        write_atomically(path, document)
        typer.echo(f"removed {name!r} from {path}")

    _run(do)


CLIENTS = ("claude-desktop", "claude-code", "cursor")


def client_config_path(client: str, home: Path | None = None, cwd: Path | None = None) -> Path:
    """Where each client keeps its `mcpServers`: the project's file if there is one, else the user's."""
    home = home or Path.home()
    cwd = cwd or Path.cwd()
    if client == "claude-desktop":
        if sys.platform == "darwin":
            return home / "Library" / "Application Support" / "Claude" / "claude_desktop_config.json"
        config_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
        return config_home / "Claude" / "claude_desktop_config.json"
    if client == "claude-code":
        return cwd / ".mcp.json" if (cwd / ".mcp.json").is_file() else home / ".claude.json"
    if client == "cursor":
        project = cwd / ".cursor" / "mcp.json"
        return project if project.is_file() else home / ".cursor" / "mcp.json"
    raise ConfigError(f"unknown client {client!r}: {', '.join(CLIENTS)}")


@app.command("import")
def import_servers(
    client: Annotated[str, typer.Argument(help="claude-desktop, claude-code or cursor.", metavar="CLIENT")],
    source: Annotated[
        Path | None, typer.Argument(help="That client's config file (default: where it keeps it).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Copy a client's `mcpServers` into fsm-hub's config, skipping names that exist."""

    def do() -> None:
        origin = source if source is not None else client_config_path(client)
        if client not in CLIENTS:
            raise ConfigError(f"unknown client {client!r}: {', '.join(CLIENTS)}")
        try:
            data = origin.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{origin} does not exist (give the path of {client}'s config)") from None
        _, theirs = load_document(data, str(origin))
        path = _path(config)
        document = _read_document(path)
        ours = _servers(document)
        imported: list[str] = []
        for name, entry in theirs.items():
            if name in ours:
                typer.echo(f"skipped {name!r}: a server of that name is configured already", err=True)
                continue
            try:
                parse_entry(name, entry, str(origin), _Anything())
            except ConfigError as exc:
                typer.echo(f"skipped {name!r}: {exc}", err=True)
                continue
            ours[name] = entry
            imported.append(name)
        if imported:
            write_atomically(path, document)
        listed = f": {', '.join(imported)}" if imported else ""
        typer.echo(f"imported {len(imported)} of {len(theirs)} servers from {origin} into {path}{listed}")

    _run(do)
