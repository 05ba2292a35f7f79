"""The `fsm-hub` command. Every error the user can cause ends as one line on stderr."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from fsm_hub import __version__
from fsm_hub.cli_servers import app as servers_app
from fsm_hub.core.display import redact, redact_url, shown
from fsm_hub.core.events import HUB_STREAM, StoredEvent, parse_time
from fsm_hub.core.view import InstanceView, View, fold
from fsm_hub.errors import FsmHubError, NoEventLog
from fsm_hub.observe import tables
from fsm_hub.observe.help import FriendlyCommand
from fsm_hub.observe.moments import parse_moment
from fsm_hub.observe.tables import table, when
from fsm_hub.store.sqlite import EventLog, default_db_path


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fsm-hub {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="fsm-hub",
    help="One MCP endpoint for all your local dev servers, every connection an audited FSM.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
app.add_typer(servers_app, name="servers")


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """One MCP endpoint for all your local dev servers, every connection an audited FSM."""


def command(**kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return app.command(cls=FriendlyCommand, **kwargs)


DbOption = Annotated[
    Path | None,
    typer.Option(
        "--db",
        metavar="PATH",
        help="Event log file (default: $FSM_HUB_DB, else $XDG_STATE_HOME/fsm-hub/events.db).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
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


def db_path(db: Path | None) -> Path:
    return db if db is not None else default_db_path()


def open_log(db: Path | None) -> EventLog:
    """The log for a reading command; a missing one is an error (only `serve` creates logs)."""
    path = db_path(db)
    if not path.exists():
        raise NoEventLog(
            f"no event log at {path} (start a hub with `fsm-hub serve`, or point --db / $FSM_HUB_DB"
            " at an existing log)"
        )
    return EventLog.open(path)


def _moment(option: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return parse_moment(text, tables.now())
    except ValueError:
        raise fail(f"{option}: {text!r} is neither ISO 8601 nor a span like 10m, 2h, 3d") from None


def _reason(data: dict[str, Any]) -> str:
    """Reason and error, the error only when it adds something the reason does not say."""
    reason = str(data.get("reason") or "")
    error = str(data.get("error") or "")
    if error and error not in reason:
        return f"{reason}: {error}" if reason else error
    return reason


def _announcement(data: dict[str, Any]) -> str:
    parts = [f"{key} {data[key]}" for key in ("port", "pid") if data.get(key) is not None]
    if data.get("url"):
        parts.append(redact_url(str(data["url"])))
    return ", ".join(parts)


def describe(event: StoredEvent) -> tuple[str, str, str]:
    """(event, from → to, reason) columns for one stored event; unknown values are omitted."""
    data: dict[str, Any] = event.data
    if event.type == "transition":
        return data.get("event", "?"), f"{data.get('from')} → {data.get('to')}", _reason(data)
    if event.type == "instance_discovered":
        return event.type, "", _announcement(data)
    if event.type == "instance_updated":
        changed = ", ".join(f"{k} {redact_url(str(v))}" for k, v in data.items() if v is not None)
        return event.type, "", f"changed: {changed}" if changed else ""
    if event.type in ("session_connected", "session_disconnected"):
        detail = f"session {data.get('session_id')}"
        return event.type, "", f"{detail} {data['reason']}" if data.get("reason") else detail
    return event.type, "", ", ".join(f"{k}={v}" for k, v in data.items() if v is not None)


def _history_row(event: StoredEvent, names: dict[str, str] | None) -> tuple[str, ...]:
    row = (when(event.at), *describe(event))
    if names is None:
        return row
    return (row[0], names.get(event.stream, event.stream), *row[1:])


def _names(view: View) -> dict[str, str]:
    return {i.id: i.name for i in view.instances.values()}


@command()
def history(
    instance: Annotated[
        str | None,
        typer.Argument(
            metavar="INSTANCE",
            help="Instance id, unique id prefix, name, or 'hub'. Omit with --all.",
            show_default=False,
        ),
    ] = None,
    all_streams: Annotated[
        bool, typer.Option("--all", help="Every instance's events and the hub's, interleaved.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON: an array, or one object per line with --follow.")
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option("--limit", metavar="N", min=1, help="Keep only the most recent N events."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", metavar="TIME", help="Only events at or after TIME (ISO 8601, or 10m, 2h, 3d ago)."
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", metavar="TIME", help="Only events at or before TIME (same forms)."),
    ] = None,
    follow_: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Then print new events as they are committed, until Ctrl-C."),
    ] = False,
    db: DbOption = None,
) -> None:
    """Show recorded events in order: why an instance is in the state it is in."""
    if (instance is None) == (not all_streams):
        raise fail("give an INSTANCE or --all (not both)")
    start, end = _moment("--since", since), _moment("--until", until)
    if follow_ and end is not None:
        raise fail("--until and --follow exclude each other")

    def show() -> None:
        with open_log(db) as log:
            stream = log.resolve(instance) if instance is not None else None
            events: list[StoredEvent] = list(
                log.events(stream=stream, until=end, last=None if start else limit)
            )
            names = _names(fold(log.events())) if all_streams else None
        if start is not None:
            events = [e for e in events if parse_time(e.at) >= start]
            events = events[-limit:] if limit else events
        last_seq = events[-1].seq if events else _last_seq(db)
        if follow_:
            _print_followed(events, names, as_json)
            _follow(db, stream, last_seq, names, as_json)
            return
        if as_json:
            typer.echo(json.dumps(redact([e.to_json() for e in events]), indent=2, ensure_ascii=False))
            return
        if not events:
            typer.echo("no events recorded" + (" in that span" if start or end else " yet"))
            return
        headers: tuple[str, ...] = ("TIME", "EVENT", "FROM → TO", "REASON")
        if names is not None:
            headers = ("TIME", "INSTANCE", *headers[1:])
        typer.echo(table(headers, [_history_row(e, names) for e in events]))

    run(show)


def _last_seq(db: Path | None) -> int:
    with open_log(db) as log:
        last = list(log.events(last=1))
    return last[-1].seq if last else 0


def _print_followed(events: Iterable[StoredEvent], names: dict[str, str] | None, as_json: bool) -> None:
    for event in events:
        if as_json:
            typer.echo(json.dumps(redact(event.to_json()), ensure_ascii=False))
        else:
            typer.echo("  ".join(shown(cell) for cell in _history_row(event, names) if cell))


def _follow(db: Path | None, stream: str | None, after: int, names: dict[str, str] | None,
            as_json: bool) -> None:
    """Print events as they are committed until SIGINT/SIGTERM; then exit 0."""
    from fsm_hub.observe.follow import follow

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        for event in follow(db_path(db), after=after, stream=stream):
            if names is not None and event.type in ("instance_discovered", "instance_updated"):
                name = event.data.get("name")
                if isinstance(name, str):
                    names[event.stream] = name
            _print_followed([event], names, as_json)
            sys.stdout.flush()
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@command()
def instances(
    at: Annotated[
        str | None,
        typer.Option(
            "--at", metavar="TIME", help="Show the view as it was at TIME (ISO 8601, naive = UTC; or 2h ago)."
        ),
    ] = None,
    as_json: JsonOption = False,
    db: DbOption = None,
) -> None:
    """List every known instance with its current (or past) state."""
    from fsm_hub.observe.status import latest_run, running_owner, stopped_note

    def show() -> None:
        try:
            moment = parse_moment(at, tables.now()) if at else None
        except ValueError:
            raise fail(f"--at: {at!r} is not an ISO 8601 time") from None
        with open_log(db) as log:
            view = log.fold(until=moment)
            hub_events = list(log.events(stream=HUB_STREAM)) if moment is None else []
            last = list(log.events(last=1))
        listed = sorted(view.instances.values(), key=lambda i: (i.name, i.id))
        if moment is None and running_owner(db_path(db)) is None:
            run_ = latest_run(hub_events, last[-1].at if last else None)
            typer.echo(f"fsm-hub: {stopped_note(run_)}", err=True)
        if as_json:
            typer.echo(json.dumps(redact([i.to_json() for i in listed]), indent=2, ensure_ascii=False))
            return
        if not listed:
            typer.echo("no instances yet — `fsm-hub serve` discovers them in the instances directory"
                       if moment is None else "no instances were known at that moment")
            return
        typer.echo(
            table(
                ("ID", "NAME", "KIND", "STATE", "SINCE", "PORT", "RETRIES", "LAST ERROR"),
                [_instance_row(i) for i in listed],
                colour_column=2,
                colour=tables.colour_enabled(),
            )
        )

    run(show)


def _instance_row(instance: InstanceView) -> tuple[str, ...]:
    return (
        instance.id,
        instance.name,
        instance.kind,
        instance.state,
        when(instance.since),
        str(instance.port or ""),
        str(instance.retry_count),
        instance.last_error or "",
    )


@command()
def status(as_json: JsonOption = False, db: DbOption = None) -> None:
    """Is a hub running on this log, what does it hold, how many instances are in each state."""
    from fsm_hub.observe.status import latest_run, running_owner
    from fsm_hub.observe.status import status as gather

    def show() -> None:
        path = db_path(db)
        with open_log(db) as log:
            view = fold(log.events())
            hub_events = list(log.events(stream=HUB_STREAM))
            last = list(log.events(last=1))
        facts = gather(path, view, latest_run(hub_events, last[-1].at if last else None), running_owner(path))
        if as_json:
            typer.echo(json.dumps(redact(facts), indent=2, ensure_ascii=False))
            return
        typer.echo(_status_text(facts))

    run(show)


def _status_text(facts: dict[str, Any]) -> str:
    hub, log, counts = facts["hub"], facts["log"], facts["instances"]
    if hub["running"]:
        line = f"hub:        running, pid {hub['pid']}, since {when(hub['since'])}" if hub["since"] else (
            f"hub:        running, pid {hub['pid']}")
        lines = [line, f"serves:     {', '.join(hub['serves']) or 'no client endpoint (supervising only)'}",
                 f"private:    {hub['endpoint']} (for attaching processes)"]
        attached = [f"pid {p['pid']} since {when(p['since'])}" for p in hub["attached"]]
        lines.append(f"attached:   {'; '.join(attached) if attached else 'no other process'}")
    elif hub["last_started_at"] is None:
        lines = ["hub:        not running (none has run on this log)"]
    elif hub["last_stopped_at"]:
        stopped = f"{when(hub['last_stopped_at'])} ({hub['last_stop_reason']})"
        lines = [f"hub:        not running; stopped {stopped}"]
    else:
        lines = [f"hub:        not running; the last one (pid {hub['last_pid']}) ended without a stop"]
    by_state = ", ".join(f"{n} {s}" for s, n in counts["by_state"].items()) or "none yet"
    lines += [
        f"instances:  {counts['total']} ({by_state})",
        f"log:        {log['path']} ({log['bytes']} bytes, {log['events']} events)",
    ]
    if log["last_event_at"]:
        lines.append(f"last event: {when(log['last_event_at'])}")
    if log["head_hash"]:
        lines.append(f"head hash:  {log['head_hash']}")
    if hub["instances_dir"]:
        lines.append(f"instances directory: {shown(hub['instances_dir'])}")
    return "\n".join(lines)


@command()
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


@command()
def timeline(
    refs: Annotated[
        list[str] | None,
        typer.Argument(metavar="[INSTANCE]...", help="Instances to show (default: all).", show_default=False),
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", metavar="TIME", help="Start at TIME (ISO 8601, or 10m, 2h, 3d).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="FILE", help="Write an .svg or .html file instead of text."),
    ] = None,
    db: DbOption = None,
) -> None:
    """Each instance's life as swimlanes of state over time (text, or SVG / HTML with --out)."""
    from fsm_hub.observe import timeline as render
    from fsm_hub.observe.status import running_owner

    start = _moment("--since", since)
    if out is not None and out.suffix.lower() not in (".svg", ".html", ".htm"):
        raise fail(f"--out: {out} must end in .svg or .html")

    def show() -> None:
        with open_log(db) as log:
            streams = {log.resolve(ref) for ref in refs} if refs else None
            everything = list(log.events())
        events = [e for e in everything if streams is None or e.stream in streams]
        # With no hub running, nothing is known after the last event: the lanes end there.
        live = running_owner(db_path(db)) is not None
        until = tables.now() if live or not everything else parse_time(everything[-1].at)
        lanes = render.lanes(events, until=until, since=start)
        if out is None:
            typer.echo(render.text(lanes, colour=tables.colour_enabled()))
            return
        document = render.svg(lanes) if out.suffix.lower() == ".svg" else render.html(lanes)
        out.write_text(document, encoding="utf-8")
        typer.echo(f"wrote {out} ({len(lanes)} lane{'s' if len(lanes) != 1 else ''})")

    run(show)


InstancesDirOption = Annotated[
    Path | None,
    typer.Option(
        "--instances-dir",
        metavar="DIR",
        help="Where instance files go (default: as for serve).",
        show_default=False,
    ),
]


def _announce(
    name: str, port: int, url: str | None, pid: int | None, instances_dir: Path | None, allow_remote: bool
) -> Path:
    import os

    from fsm_hub.discovery.directory import default_instances_dir
    from fsm_hub.observe.announce import instance_document, new_id, write_instance_file

    if not 1 <= port <= 65535:
        raise fail(f"--port must be in 1..65535, not {port}")
    document = instance_document(
        name, port, url=url, pid=pid, directory=os.getcwd(), instance_id=new_id(name)
    )
    directory = instances_dir if instances_dir is not None else default_instances_dir()
    return run(lambda: write_instance_file(directory, document, allow_remote=allow_remote))


PortOption = Annotated[int, typer.Option("--port", metavar="PORT", help="The port the server listens on.")]
UrlOption = Annotated[
    str | None,
    typer.Option("--url", metavar="URL", help="Its MCP endpoint (default: http://127.0.0.1:PORT/mcp)."),
]
RemoteOption = Annotated[
    bool, typer.Option("--allow-remote", help="Allow a URL on a non-loopback host.")
]


@command()
def announce(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The instance's name.")],
    port: PortOption,
    url: UrlOption = None,
    pid: Annotated[
        int | None,
        typer.Option("--pid", metavar="PID", min=1, help="Its process id: the hub removes it when it exits."),
    ] = None,
    instances_dir: InstancesDirOption = None,
    allow_remote: RemoteOption = False,
) -> None:
    """Write an instance file for any MCP server (not only brummer's); prints its path."""
    typer.echo(str(_announce(name, port, url, pid, instances_dir, allow_remote)))


@command(name="run")
def run_(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The instance's name.")],
    cmd: Annotated[list[str], typer.Argument(metavar="CMD [ARGS]...", help="The server to start.")],
    port: PortOption,
    url: UrlOption = None,
    instances_dir: InstancesDirOption = None,
    allow_remote: RemoteOption = False,
) -> None:
    """Start CMD, announce it with its pid once it listens, remove the file when it exits.

    Exits with CMD's exit code (128 + N if a signal N ended it)."""
    import subprocess

    try:
        child = subprocess.Popen(cmd)
    except OSError as exc:
        raise fail(f"cannot start {cmd[0]}: {exc.strerror or exc}") from None
    if not _listening(child, url or f"http://127.0.0.1:{port}/"):
        code = child.wait()
        raise typer.Exit(code if code >= 0 else 128 - code)
    try:
        path = _announce(name, port, url, child.pid, instances_dir, allow_remote)
    except typer.Exit:
        child.terminate()
        child.wait()
        raise

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        code = child.wait()
    finally:
        path.unlink(missing_ok=True)
    raise typer.Exit(code if code >= 0 else 128 - code)


def _listening(child: Any, url: str, limit: float = 60.0) -> bool:
    """Wait until CMD accepts connections (announced earlier, the hub would burn its retries
    on a server still starting); False if CMD exits first."""
    import socket
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80))
    deadline = time.monotonic() + limit
    while child.poll() is None:
        try:
            socket.create_connection(address, timeout=0.2).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                typer.echo(f"fsm-hub: {address[0]}:{address[1]} is not accepting connections yet;"
                           " announcing anyway", err=True)
                return True
            time.sleep(0.05)
    return False


class DiagramFormat(StrEnum):
    mermaid = "mermaid"
    dot = "dot"


@command()
def diagram(
    fmt: Annotated[
        DiagramFormat, typer.Option("--format", help="Mermaid, or dot for Graphviz.")
    ] = DiagramFormat.mermaid,
) -> None:
    """Print the instance state machine as a diagram (the same bytes on every run)."""
    from fsm_hub.observe.diagram import render

    typer.echo(render(fmt.value))


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


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


@command()
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
            metavar="DIR",
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
    start_timeout: Annotated[
        float,
        typer.Option(help="Seconds a configured stdio server may take to spawn and handshake."),
    ] = 30.0,
    backoff_base: Annotated[float, typer.Option(help="First reconnect backoff ceiling, seconds.")] = 0.5,
    backoff_cap: Annotated[float, typer.Option(help="Largest reconnect backoff, seconds.")] = 30.0,
    retry_attempts: Annotated[
        int, typer.Option(min=1, help="Connect attempts before an instance is dead.")
    ] = 8,
    session_idle: Annotated[
        float, typer.Option(help="Seconds an HTTP session may be idle before it is closed.")
    ] = 1800.0,
    max_sessions: Annotated[
        int, typer.Option(min=1, help="Live HTTP sessions; beyond it initialize gets 503.")
    ] = 1000,
    call_timeout: Annotated[
        float, typer.Option(help="Seconds any routed request may take before its client gets an error.")
    ] = 300.0,
    start_limit: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Configured stdio servers starting at once (default: max(4, 2 × cores)).",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No start-up banner on stderr.")] = False,
    log_level: Annotated[
        LogLevel, typer.Option("--log-level", help="Least severe stderr log messages shown.")
    ] = LogLevel.warning,
    instance: Annotated[
        str | None,
        typer.Option(
            "--instance",
            metavar="ID_OR_NAME",
            help="With --mcp: serve that one instance's own MCP (its tools unprefixed, no hub tools).",
        ),
    ] = None,
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
    from fsm_hub.transports.limits import HttpLimits

    logging.basicConfig(stream=sys.stderr, level=log_level.value.upper(), format="%(message)s")
    logging.getLogger("fsm_hub.banner").setLevel(logging.CRITICAL + 1 if quiet else logging.INFO)
    if instance is not None and not mcp:
        raise fail("--instance needs --mcp (over HTTP, use /instances/<id or name>/mcp)")
    if instance is not None and not instance.strip():
        raise fail("--instance needs an instance id or name")
    timing = Timing(
        ping_interval=_positive("--ping-interval", ping_interval),
        ping_timeout=_positive("--ping-timeout", ping_timeout),
        ping_misses=ping_misses,
        connect_timeout=_positive("--connect-timeout", connect_timeout),
        start_timeout=_positive("--start-timeout", start_timeout),
        backoff_base=_positive("--backoff-base", backoff_base),
        backoff_cap=_positive("--backoff-cap", backoff_cap),
        retry_attempts=retry_attempts,
        call_timeout=_positive("--call-timeout", call_timeout),
    )
    options = ServeOptions(
        db=db if db is not None else default_db_path(),
        instances_dir=instances_dir if instances_dir is not None else default_instances_dir(),
        mcp=mcp,
        http=parse_listen(http) if http else None,
        allow_remote=allow_remote,
        timing=timing,
        limits=HttpLimits(session_idle=_positive("--session-idle", session_idle), max_sessions=max_sessions),
        instance=instance,
        config=config if config is not None else default_config_path(),
        **({"start_limit": start_limit} if start_limit is not None else {}),
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
