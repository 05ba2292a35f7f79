"""The `fsm-hub` command. Every error the user can cause ends as one line on stderr."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from fsm_hub.cli_servers import app as servers_app
from fsm_hub.core.events import StoredEvent, parse_time
from fsm_hub.core.view import InstanceView
from fsm_hub.errors import FsmHubError
from fsm_hub.store.sqlite import EventLog, default_db_path

app = typer.Typer(
    name="fsm-hub",
    help="One MCP endpoint for all your local dev servers, every connection an audited FSM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(servers_app, name="servers")

DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="Event log file (default: $FSM_HUB_DB, else $XDG_STATE_HOME/fsm-hub/events.db).",
        show_default=False,
    ),
]
T = TypeVar("T")


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"fsm-hub: {message}", err=True)
    return typer.Exit(code)


def run(action: Callable[[], T]) -> T:
    """Turn our errors (and SQLite's) into one line on stderr and exit 1."""
    try:
        return action()
    except FsmHubError as exc:
        raise fail(str(exc)) from None
    except sqlite3.Error as exc:
        raise fail(f"event log error: {exc}") from None
    except OSError as exc:
        raise fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None


def open_log(db: Path | None) -> EventLog:
    return EventLog.open(db if db is not None else default_db_path())


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def describe(event: StoredEvent) -> tuple[str, str, str]:
    """(event, from → to, reason) columns for one stored event."""
    data: dict[str, Any] = event.data
    if event.type == "transition":
        reason = data.get("reason") or ""
        if data.get("error"):
            reason = f"{reason}: {data['error']}" if reason else str(data["error"])
        return data.get("event", "?"), f"{data.get('from')} → {data.get('to')}", reason
    if event.type == "instance_discovered":
        detail = f"port {data.get('port')}, pid {data.get('pid')}, {data.get('url')}"
        return event.type, "", detail
    if event.type in ("session_connected", "session_disconnected"):
        return event.type, "", f"session {data.get('session_id')} {data.get('reason') or ''}"
    return event.type, "", ", ".join(f"{k}={v}" for k, v in data.items() if v is not None)


@app.command()
def history(
    instance: Annotated[str, typer.Argument(help="Instance id, unique id prefix, name, or 'hub'.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the stored events as JSON.")] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Keep only the most recent N events.")
    ] = None,
    db: DbOption = None,
) -> None:
    """Show one instance's recorded events in order: why it is in the state it is in."""

    def show() -> None:
        with open_log(db) as log:
            stream = log.resolve(instance)
            events = list(log.events(stream=stream, last=limit))
        if as_json:
            typer.echo(json.dumps([e.to_json() for e in events], indent=2, ensure_ascii=False))
            return
        rows = [(e.at, *describe(e)) for e in events]
        typer.echo(table(("TIME", "EVENT", "FROM → TO", "REASON"), rows))

    run(show)


@app.command()
def instances(
    at: Annotated[
        str | None,
        typer.Option("--at", help="Show the view as it was at this ISO 8601 moment (naive = UTC)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array.")] = False,
    db: DbOption = None,
) -> None:
    """List every known instance with its current (or past) state."""

    def show() -> None:
        try:
            moment = parse_time(at) if at else None
        except ValueError:
            raise fail(f"--at: {at!r} is not an ISO 8601 time") from None
        with open_log(db) as log:
            view = log.fold(until=moment)
        listed = sorted(view.instances.values(), key=lambda i: (i.name, i.id))
        if as_json:
            typer.echo(json.dumps([i.to_json() for i in listed], indent=2, ensure_ascii=False))
            return
        typer.echo(
            table(
                ("ID", "NAME", "KIND", "STATE", "SINCE", "PORT", "RETRIES", "LAST ERROR"),
                [_instance_row(i) for i in listed],
            )
        )

    run(show)


def _instance_row(instance: InstanceView) -> tuple[str, ...]:
    return (
        instance.id,
        instance.name,
        instance.kind,
        instance.state,
        instance.since,
        str(instance.port or ""),
        str(instance.retry_count),
        instance.last_error or "",
    )


@app.command()
def replay(
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check every transition and stream, the hash chain and snapshots; exit 1 if any fail.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --verify: print {ok, events, head_seq, head_hash, problems}.")
    ] = False,
    db: DbOption = None,
) -> None:
    """Fold the whole log and print counts per event type and per state."""

    def check() -> None:
        with open_log(db) as log:
            result = log.verify()
        assert result.view is not None
        if verify and as_json:
            typer.echo(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
            if result.violation_count:
                raise typer.Exit(1)
            return
        typer.echo(f"events: {result.events}")
        typer.echo(table(("TYPE", "COUNT"), sorted((t, str(n)) for t, n in result.by_type.items())))
        states = result.view.count_by_state()
        typer.echo(table(("STATE", "INSTANCES"), sorted((s, str(n)) for s, n in states.items())))
        if verify:
            for violation in result.violations:
                typer.echo(f"violation: {violation}", err=True)
            if result.violation_count:
                raise fail(f"{result.violation_count} violation(s) in {result.events} events")
            typer.echo(f"head: seq {result.head_seq} hash {result.head_hash or '-'}")
            typer.echo("hash chain unbroken; every stored snapshot equals the fold at its seq")
            typer.echo("verified: every stream gapless, every transition legal")

    run(check)


@app.command()
def diagram(
    fmt: Annotated[str, typer.Option("--format", help="mermaid or dot (Graphviz).")] = "mermaid",
) -> None:
    """Print the instance state machine as a diagram."""
    from statemachine.contrib.diagram import formatter

    from fsm_hub.core.machine import InstanceMachine

    if fmt not in ("mermaid", "dot"):
        raise fail(f"--format must be mermaid or dot, not {fmt!r}")
    typer.echo(formatter.render(InstanceMachine, fmt).rstrip("\n"))


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `[::1]:PORT` or `:PORT` (loopback) for `--http`."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise fail(f"--http: {value!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _positive(name: str, value: float) -> float:
    if value <= 0:
        raise fail(f"{name} must be positive, not {value:g}")
    return value


@app.command()
def serve(
    mcp: Annotated[bool, typer.Option("--mcp", help="Serve one MCP client over stdio.")] = False,
    http: Annotated[
        str | None,
        typer.Option("--http", metavar="HOST:PORT", help="Also serve MCP over Streamable HTTP at /mcp."),
    ] = None,
    instances_dir: Annotated[
        Path | None,
        typer.Option(
            "--instances-dir",
            help="Where instances announce themselves (default: $FSM_HUB_INSTANCES_DIR, else "
            "$XDG_RUNTIME_DIR/brummer/instances, else <tmp>/brummer/instances).",
            show_default=False,
        ),
    ] = None,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Accept instance URLs on non-loopback hosts.")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Configured servers, an mcpServers file (default: $FSM_HUB_CONFIG, else "
            "$XDG_CONFIG_HOME/fsm-hub/servers.json, else ~/.config/fsm-hub/servers.json).",
            show_default=False,
        ),
    ] = None,
    ping_interval: Annotated[float, typer.Option(help="Seconds between health pings.")] = 5.0,
    ping_timeout: Annotated[float, typer.Option(help="Seconds a ping may take.")] = 2.0,
    ping_misses: Annotated[int, typer.Option(min=1, help="Missed pings in a row that mean lost.")] = 3,
    connect_timeout: Annotated[float, typer.Option(help="Seconds a handshake may take.")] = 5.0,
    backoff_base: Annotated[float, typer.Option(help="First reconnect backoff ceiling, seconds.")] = 0.5,
    backoff_cap: Annotated[float, typer.Option(help="Largest reconnect backoff, seconds.")] = 30.0,
    retry_attempts: Annotated[
        int, typer.Option(min=1, help="Connect attempts before an instance is dead.")
    ] = 8,
    db: DbOption = None,
) -> None:
    """Run the hub: discover instances, supervise their connections, serve MCP."""
    import asyncio
    import logging

    from fsm_hub.discovery.config import default_config_path
    from fsm_hub.discovery.directory import default_instances_dir
    from fsm_hub.serve.process import ServeOptions
    from fsm_hub.serve.process import serve as run_hub
    from fsm_hub.supervision.supervisor import Timing

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    timing = Timing(
        ping_interval=_positive("--ping-interval", ping_interval),
        ping_timeout=_positive("--ping-timeout", ping_timeout),
        ping_misses=ping_misses,
        connect_timeout=_positive("--connect-timeout", connect_timeout),
        backoff_base=_positive("--backoff-base", backoff_base),
        backoff_cap=_positive("--backoff-cap", backoff_cap),
        retry_attempts=retry_attempts,
    )
    options = ServeOptions(
        db=db if db is not None else default_db_path(),
        instances_dir=instances_dir if instances_dir is not None else default_instances_dir(),
        mcp=mcp,
        http=parse_listen(http) if http else None,
        allow_remote=allow_remote,
        timing=timing,
        config=config if config is not None else default_config_path(),
    )
    code = run(lambda: asyncio.run(run_hub(options)))
    raise typer.Exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        app(args=list(argv) if argv is not None else None)
    except KeyboardInterrupt:
        sys.exit(130)
if __name__ == "__main__":
    main()
