"""Configured servers: the `mcpServers` file Claude Desktop, Claude Code and Cursor use, as instances.

    {"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "server-fs", "${HOME}"], "env": {"TOKEN": "${T}"},
                  "cwd": "/srv"},
        "remote": {"type": "http", "url": "https://example.com/mcp", "headers": {"Authorization": "..."}}}}

Decisions the format leaves open:

- The id of a configured server is `cfg-<name>` when the name is a valid tool-name word
  (`[A-Za-z0-9_-]`, at most 48 characters), else `cfg-<slug>-<8 hex of sha256(name)>`. Announced
  (brummer) ids never start with `cfg-`, so the two kinds cannot collide; `is_configured_id` tells.
- `${VAR}` and `${VAR:-default}` expand from the hub's environment in `command`, `args`, `env`,
  `cwd`, `url` and `headers`. An unset variable without a default makes that one entry invalid.
- One bad entry is skipped with a warning; if it was running it keeps its last good settings
  (like an announcement caught mid-write). A file that does not parse at all keeps the whole last
  good config. A missing file means no configured servers.
- Unknown keys are ignored with a warning. There is no `Updated`: every setting a server has
  (command, args, env, cwd, url, headers) changes how it is reached, so any change is `Changed`
  (→ rediscover); a removed entry is `Gone` (→ remove).
- Secrets: values of `env` and `headers` live only in `Secrets`, whose repr and str show names
  with `***`. What goes into events is `ServerSpec.describe()`: names, the command, args and url
  *as written* (before expansion, so an expanded `${TOKEN}` cannot leak through them either), and
  a fingerprint keyed with a per-process random key — it tells two settings apart within one run
  and lets nobody test guesses of a secret against the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from watchfiles import awatch

from fsm_hub.discovery.directory import Gone, Sleep, Warn, warn_to_stderr
from fsm_hub.discovery.security import directory_refusal, file_refusal
from fsm_hub.errors import ConfigError, RefusedConfig

ENV_CONFIG = "FSM_HUB_CONFIG"
MAX_CONFIG_SIZE = 1024 * 1024
ID_PREFIX = "cfg-"
POLL_INTERVAL = 1.0
"""The watcher brings changes within ~0.1 s; the poll is the fallback (no inotify, no directory)."""
_WATCH_STEP_MS = 50
_WATCH_DEBOUNCE_MS = 50
_MASK = "***"
_FINGERPRINT_KEY = secrets.token_bytes(32)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-]{1,48}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_STDIO_KEYS = frozenset({"type", "command", "args", "env", "cwd"})
_HTTP_KEYS = frozenset({"type", "url", "headers"})
_HTTP_TYPES = ("http", "streamable-http", "streamableHttp")

Kind: TypeAlias = Literal["stdio", "http"]


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    """`$FSM_HUB_CONFIG`, else `$XDG_CONFIG_HOME/fsm-hub/servers.json`, else `~/.config/fsm-hub/...`."""
    if override := env.get(ENV_CONFIG):
        return Path(override).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "fsm-hub" / "servers.json"


def instance_id(name: str) -> str:
    """The stable id of the configured server called `name` (see the module docstring)."""
    if _SAFE_NAME.fullmatch(name):
        return ID_PREFIX + name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    slug = _UNSAFE.sub("_", name)[:32].strip("_") or "server"
    return f"{ID_PREFIX}{slug}-{digest}"


def is_configured_id(value: str) -> bool:
    """Whether an id belongs to a configured server (an announcement claiming one is not trusted)."""
    return value.startswith(ID_PREFIX)


class Secrets:
    """Names → secret values (env or headers). Shows names only: repr, str and format say `***`.

    Deliberately not a Mapping: `dict(...)`, `json.dumps(...)` and `{**...}` fail instead of
    copying the values somewhere they could be logged. `reveal()` is the one way to them.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values = dict(values or {})

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secrets) and self._values == other._values

    def __hash__(self) -> int:
        return hash(frozenset(self._values.items()))

    def __repr__(self) -> str:
        return "Secrets({" + ", ".join(f"{k!r}: {_MASK!r}" for k in self._values) + "})"

    __str__ = __repr__

    def __copy__(self) -> Secrets:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> Secrets:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("Secrets are not pickled: they would leave the process with their values")

    def names(self) -> tuple[str, ...]:
        return tuple(self._values)

    def reveal(self) -> dict[str, str]:
        """The values, for the one place that needs them: the spawn or the HTTP request."""
        return dict(self._values)


@dataclass(frozen=True, slots=True)
class ServerDescription:
    """What events, tool output and `servers list` may show of a configured server: no values."""

    id: str
    name: str
    kind: Kind
    source: str
    """The config file it comes from."""
    command: str | None
    args: tuple[str, ...]
    cwd: str | None
    url: str | None
    """Command, args, cwd and url as written in the file, before `${VAR}` expansion."""
    env: tuple[str, ...]
    headers: tuple[str, ...]
    """Names only."""
    fingerprint: str
    """Changes whenever any setting (values included) changes; keyed per hub process."""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "command": self.command,
            "args": list(self.args),
            "cwd": self.cwd,
            "url": self.url,
            "env": list(self.env),
            "headers": list(self.headers),
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """One configured server, expanded and ready to start. Secret values only in `env`/`headers`."""

    name: str
    kind: Kind
    source: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Secrets = field(default_factory=Secrets)
    cwd: str | None = None
    url: str | None = None
    headers: Secrets = field(default_factory=Secrets)
    written: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """command/args/cwd/url as in the file, for `describe` (never secret values: env/headers excluded)."""

    @property
    def id(self) -> str:
        return instance_id(self.name)

    def __repr__(self) -> str:
        # Expanded args and url may hold a `${TOKEN}`'s value: show them as written.
        d = self.describe()
        return (
            f"ServerSpec(name={self.name!r}, kind={self.kind!r}, command={d.command!r}, args={d.args!r}, "
            f"cwd={d.cwd!r}, url={d.url!r}, env={self.env!r}, headers={self.headers!r})"
        )

    def describe(self) -> ServerDescription:
        written = self.written
        return ServerDescription(
            id=self.id,
            name=self.name,
            kind=self.kind,
            source=self.source,
            command=written.get("command", self.command),
            args=tuple(written.get("args", self.args)),
            cwd=written.get("cwd", self.cwd),
            url=written.get("url", self.url),
            env=self.env.names(),
            headers=self.headers.names(),
            fingerprint=self.fingerprint(),
        )

    def fingerprint(self) -> str:
        canonical = json.dumps(
            [
                self.kind,
                self.command,
                self.args,
                sorted(self.env.reveal().items()),
                self.cwd,
                self.url,
                sorted(self.headers.reveal().items()),
            ],
            separators=(",", ":"),
        )
        return hmac.new(_FINGERPRINT_KEY, canonical.encode(), "sha256").hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class ServerFound:
    """A new configured server (→ instance_discovered)."""

    server: ServerSpec


@dataclass(frozen=True, slots=True)
class ServerChanged:
    """Command, args, env, cwd, url or headers changed (→ rediscover with the new settings)."""

    server: ServerSpec
    previous: ServerSpec


ConfigChange: TypeAlias = ServerFound | ServerChanged | Gone


@dataclass(frozen=True, slots=True)
class ParsedConfig:
    """One reading of the file: the usable servers by id, and the names of entries skipped."""

    servers: dict[str, ServerSpec]
    invalid: frozenset[str]
    """Ids of entries present but unusable (they keep their last good settings)."""
    warnings: tuple[str, ...]


# --- reading ----------------------------------------------------------------------------------


def read_config_bytes(path: Path) -> bytes | None:
    """The file's bytes, None if it does not exist; RefusedConfig if others could have written it.

    Symbolic links are followed (dotfile repos link configs); the checks apply to the file opened
    and to the directory holding the real file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot open {path} ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if refusal := file_refusal(path, st):
            raise RefusedConfig(refusal)
        real_parent = Path(os.path.realpath(path)).parent
        if refusal := directory_refusal(real_parent, os.stat(real_parent)):
            raise RefusedConfig(refusal)
        if st.st_size > MAX_CONFIG_SIZE:
            raise ConfigError(f"{path} is larger than {MAX_CONFIG_SIZE // 1024} KiB")
        data = b""
        while len(data) <= MAX_CONFIG_SIZE and (chunk := os.read(fd, MAX_CONFIG_SIZE + 1 - len(data))):
            data += chunk
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror})") from None
    finally:
        os.close(fd)
    return data


def load_document(data: bytes, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole document and its `mcpServers` object; ConfigError if it is not one."""
    if not data.strip():
        return {}, {}
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{source} is not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{source} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{source} must hold a JSON object with an 'mcpServers' object")
    servers = document.get("mcpServers", {})
    if not isinstance(servers, dict):
        raise ConfigError(f"{source}: 'mcpServers' must be an object")
    return document, servers


def parse_config(
    data: bytes, source: str, environ: Mapping[str, str] = os.environ, *, top_level_warnings: bool = True
) -> ParsedConfig:
    """Validate and expand a config's bytes; ConfigError only if the file as a whole is unusable."""
    document, entries = load_document(data, source)
    warnings: list[str] = []
    if top_level_warnings:
        for key in sorted(set(document) - {"mcpServers"}):
            warnings.append(f"{source}: unknown key {key!r} ignored")
    servers: dict[str, ServerSpec] = {}
    invalid: set[str] = set()
    for name, entry in entries.items():
        sid = instance_id(name)
        if sid in servers:
            warnings.append(
                f"{source}: server {name!r} skipped: its id {sid} is taken by {servers[sid].name!r}"
            )
            continue
        try:
            spec, notes = parse_entry(name, entry, source, environ)
        except ConfigError as exc:
            invalid.add(sid)
            warnings.append(f"{source}: server {name!r} skipped: {exc}")
            continue
        warnings.extend(f"{source}: server {name!r}: {note}" for note in notes)
        servers[sid] = spec
    return ParsedConfig(servers, frozenset(invalid), tuple(warnings))


def parse_entry(
    name: str, entry: object, source: str, environ: Mapping[str, str] = os.environ
) -> tuple[ServerSpec, list[str]]:
    """One `mcpServers` entry; ConfigError says what is wrong with it (never a secret value)."""
    if not name.strip():
        raise ConfigError("the name is empty")
    if not isinstance(entry, dict):
        raise ConfigError("it must be an object")
    kind_text = entry.get("type")
    if kind_text is not None and not isinstance(kind_text, str):
        raise ConfigError("'type' must be a string")
    if kind_text in _HTTP_TYPES or (kind_text is None and "url" in entry and "command" not in entry):
        kind: Kind = "http"
        known = _HTTP_KEYS
    elif kind_text in (None, "stdio"):
        kind = "stdio"
        known = _STDIO_KEYS
    elif kind_text == "sse":
        raise ConfigError("'type': 'sse' (the deprecated HTTP+SSE transport) is not supported; use 'http'")
    else:
        raise ConfigError(f"unknown 'type' {kind_text!r} (stdio, http or streamable-http)")
    notes = [f"unknown key {key!r} ignored" for key in sorted(set(entry) - known)]
    expand = _Expander(environ)
    if kind == "stdio":
        command = _string(entry, "command", required=True)
        assert command is not None
        args = entry.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ConfigError("'args' must be an array of strings")
        cwd = _string(entry, "cwd")
        spec = ServerSpec(
            name=name,
            kind="stdio",
            source=source,
            command=expand(command, "command"),
            args=tuple(expand(a, "args") for a in args),
            env=Secrets({k: expand(v, f"env.{k}") for k, v in _string_map(entry, "env").items()}),
            cwd=str(Path(expand(cwd, "cwd")).expanduser()) if cwd else None,
            written={"command": command, "args": tuple(args), "cwd": cwd},
        )
    else:
        url = _string(entry, "url", required=True)
        assert url is not None
        expanded = expand(url, "url")
        if not expanded.startswith(("http://", "https://")):
            raise ConfigError(f"'url' must be an http(s) URL, got {url!r}")
        headers = {k: expand(v, f"headers.{k}") for k, v in _string_map(entry, "headers").items()}
        spec = ServerSpec(
            name=name,
            kind="http",
            source=source,
            url=expanded,
            headers=Secrets(headers),
            written={"url": url},
        )
    return spec, notes


class _Expander:
    """`${VAR}` / `${VAR:-default}` from the environment; an unset one names itself, not a value."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def __call__(self, text: str, where: str) -> str:
        def one(match: re.Match[str]) -> str:
            value = self.environ.get(match.group(1))
            if value is None:
                if match.group(2) is None:
                    raise ConfigError(f"{where}: ${{{match.group(1)}}} is not set in the hub's environment")
                return match.group(2)
            return value

        return _VARIABLE.sub(one, text)


def _string(entry: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = entry.get(key)
    if value is None:
        if required:
            raise ConfigError(f"'{key}' is missing")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise ConfigError(f"'{key}' must be a non-empty string")
    return value


def _string_map(entry: dict[str, Any], key: str) -> dict[str, str]:
    value = entry.get(key, {})
    if value is None:
        return {}
    # Name the key, never the value: it is likely a secret.
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"'{key}' must be an object of strings")
    return value


# --- from one config to the next ------------------------------------------------------------------


def diff(previous: Mapping[str, ServerSpec], current: Mapping[str, ServerSpec]) -> list[ConfigChange]:
    """The changes that lead from one config to the next, in id order (pure)."""
    changes: list[ConfigChange] = []
    for sid in sorted(previous.keys() | current.keys()):
        old, new = previous.get(sid), current.get(sid)
        if new is None and old is not None:
            changes.append(Gone(sid, f"removed from {old.source}"))
        elif new is not None and old is None:
            changes.append(ServerFound(new))
        elif new is not None and old is not None and new != old:
            changes.append(ServerChanged(new, old))
    return changes


class ConfiguredServers:
    """Successive readings of one config file turned into changes; keeps the last good config.

    `load()` and `changes()` own the state: use them from one task.
    """

    def __init__(
        self,
        path: Path,
        *,
        environ: Mapping[str, str] = os.environ,
        warn: Warn = warn_to_stderr,
        poll_interval: float = POLL_INTERVAL,
        use_watcher: bool = True,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._environ = environ
        self._warn = warn
        self._sleep = sleep
        self._use_watcher = use_watcher
        self._current: dict[str, ServerSpec] = {}
        self._problem: str | None = None
        self._said: set[str] = set()
        self._seen: tuple[int, ...] | None = None

    @property
    def current(self) -> dict[str, ServerSpec]:
        """The servers in effect, by id (a copy)."""
        return dict(self._current)

    @property
    def problem(self) -> str | None:
        """Why the file is not (fully) in effect right now (for hub_status), or None."""
        return self._problem

    def load(self) -> list[ConfigChange]:
        """Read the file now; return what changed since the last good reading."""
        self._seen = _file_key(self.path)
        try:
            data = read_config_bytes(self.path)
            if data is None:
                parsed = ParsedConfig({}, frozenset(), ())
            elif not data.strip() and self._current:
                raise ConfigError(f"{self.path} is empty (caught mid-write?)")
            else:
                parsed = parse_config(data, str(self.path), self._environ)
        except RefusedConfig as exc:
            return self._fail(f"config refused: {exc}; no configured servers", refused=True)
        except ConfigError as exc:
            return self._fail(f"config not applied: {exc}; keeping the last good one")
        self._problem = None
        self._said.clear()
        for warning in parsed.warnings:
            self._warn(warning)
        nxt = dict(parsed.servers)
        for sid in parsed.invalid:
            if sid in self._current:
                nxt[sid] = self._current[sid]
        if parsed.invalid:
            self._problem = f"{len(parsed.invalid)} entr{'y' if len(parsed.invalid) == 1 else 'ies'} skipped"
        changes = diff(self._current, nxt)
        self._current = nxt
        return changes

    def _fail(self, message: str, *, refused: bool = False) -> list[ConfigChange]:
        self._problem = message
        if message not in self._said:
            self._said = {message}
            self._warn(message)
        if not refused:
            return []
        changes: list[ConfigChange] = [Gone(sid, message) for sid in sorted(self._current)]
        self._current = {}
        return changes

    async def changes(self) -> AsyncGenerator[list[ConfigChange], None]:
        """The initial set first (always, even empty), then each non-empty batch of changes."""
        wake = asyncio.Event()
        stop = asyncio.Event()
        watcher = asyncio.create_task(self._watch(wake, stop)) if self._use_watcher else None
        try:
            yield self.load()
            while True:
                await self._tick(wake)
                woken = wake.is_set()
                wake.clear()
                if not woken and _file_key(self.path) == self._seen:
                    continue  # the poll found the same file (a broken one was reported already)
                batch = self.load()
                if batch:
                    yield batch
        finally:
            stop.set()
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)

    async def _tick(self, wake: asyncio.Event) -> None:
        sleeper = asyncio.ensure_future(self._sleep(self.poll_interval))
        waiter = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait([sleeper, waiter], return_when=asyncio.FIRST_COMPLETED)
            if sleeper.done():
                sleeper.result()
        finally:
            sleeper.cancel()
            waiter.cancel()
            await asyncio.gather(sleeper, waiter, return_exceptions=True)

    async def _watch(self, wake: asyncio.Event, stop: asyncio.Event) -> None:
        """Watch the directory (an editor's or our own atomic rename replaces the file's inode)."""
        directory = self.path.parent
        while not stop.is_set():
            if not directory.is_dir():
                await self._sleep(self.poll_interval)
                continue
            try:
                async for batch in awatch(
                    directory,
                    watch_filter=lambda _, changed: Path(changed).name == self.path.name,
                    recursive=False,
                    stop_event=stop,
                    step=_WATCH_STEP_MS,
                    debounce=_WATCH_DEBOUNCE_MS,
                    rust_timeout=int(self.poll_interval * 1000),
                    yield_on_timeout=True,
                ):
                    if batch:
                        wake.set()
                    if not directory.is_dir():
                        break
            except Exception as exc:  # inotify limits and the like: polling carries on
                message = f"cannot watch {directory} ({exc}); polling it instead"
                if message not in self._said:
                    self._said.add(message)
                    self._warn(message)
                return


def _file_key(path: Path) -> tuple[int, ...] | None:
    """What tells an unchanged file (following links: the target is what is read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
    )
