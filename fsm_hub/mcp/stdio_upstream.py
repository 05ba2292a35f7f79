"""Client side of MCP over stdio: the hub spawns a configured server and talks to it through pipes.

It offers what the supervisor needs of `McpClient` (initialize, list_tools, call_tool, request,
notify, ping, listen, close), so a configured stdio server is supervised like any instance.

- The child runs in its own process group (a `npx` wrapper and its `node` go down together), in
  the configured cwd, with the configured env over a minimal inherited one (`INHERITED_ENV`).
- stdout is protocol only: one JSON-RPC message per line. A line that is not JSON-RPC, stdout
  closing, or the process exiting fails every pending and later call with a TransportError that
  says how it ended (exit code or signal) and the last lines of its stderr.
- stderr is read continuously, whatever the server writes, into a bounded tail (`StderrTail`),
  so a chatty server never blocks on a full pipe.
- Writes wait for the pipe to drain (flow control), so a server that stops reading slows its
  callers down rather than growing our memory.
- Shutdown follows the MCP spec for stdio: close stdin, then SIGTERM to the group, then SIGKILL
  once `grace` seconds pass (on the injected `sleep`).
- There is no session over stdio (`session_id` is None). Server requests are handed to the
  receiver of the one call in flight (or the listener) and then answered here: `ping` with an
  empty result, anything else with -32601, because the hub relays no client answers back.
- Notifications that no call claims (no progressToken of a call in flight) go to the listener
  and to every tap (`tap`): synchronous receivers that must not block, because this reader also
  carries the answers and pings. The hub's clients of the process are such taps
  (`fsm_hub.mcp.stdio_sessions`); what each of them gets is decided there, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from fsm_hub import __version__
from fsm_hub.errors import LOCAL_ERRNOS, LocalResourceError, TransportError
from fsm_hub.mcp.jsonrpc import request as _encode
from fsm_hub.mcp.jsonrpc import result_of, snippet
from fsm_hub.mcp.methods import OnMessage, UpstreamMethods, deliver
from fsm_hub.mcp.protocol import LATEST as PROTOCOL_VERSION
from fsm_hub.mcp.protocol import PROTOCOL_VERSIONS as SUPPORTED_PROTOCOL_VERSIONS

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
Tap = Callable[[dict[str, Any]], None]
"""Sees each unclaimed notification, synchronously, on the reader: it must not block."""

INHERITED_ENV: Final = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ",
    "XDG_RUNTIME_DIR",
)  # fmt: skip
"""What a server inherits from the hub's environment; everything else must be configured."""
MAX_LINE: Final = 64 * 1024 * 1024
STDERR_LINES: Final = 20
STDERR_BYTES: Final = 4096
DEFAULT_GRACE: Final = 2.0
"""Seconds between closing stdin and SIGTERM, and between SIGTERM and SIGKILL."""
_ORPHAN_STEP: Final = 0.05
_EXIT_WAIT: Final = 1.0
"""After stdout ends, how long the process may take to exit before we say it closed stdout."""


def child_environment(
    configured: Mapping[str, str], inherited: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The configured env over the minimal inherited one."""
    env = {name: inherited[name] for name in INHERITED_ENV if name in inherited}
    env.update(configured)
    return env


class StderrTail:
    """The last `STDERR_LINES` lines of a stream, at most `STDERR_BYTES` bytes in all."""

    __slots__ = ("_lines", "_partial", "_size")

    def __init__(self) -> None:
        self._lines: deque[bytes] = deque()
        self._partial = bytearray()
        self._size = 0

    def feed(self, chunk: bytes) -> None:
        self._partial += chunk
        *complete, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest[-STDERR_BYTES:])
        for line in complete[-STDERR_LINES:]:
            self._push(bytes(line[-STDERR_BYTES:]))

    def _push(self, line: bytes) -> None:
        self._lines.append(line)
        self._size += len(line)
        while len(self._lines) > STDERR_LINES or self._size > STDERR_BYTES:
            self._size -= len(self._lines.popleft())

    def text(self) -> str:
        """The tail on one line (lines joined by ` | `), the unterminated last line included."""
        lines = [*self._lines, bytes(self._partial)] if self._partial else list(self._lines)
        decoded = (line.decode("utf-8", "replace").rstrip("\r") for line in lines)
        return " | ".join(line for line in decoded if line.strip())


def process_identity(pid: int) -> str | None:
    """What tells this process from a later one given the same pid: boot id and start time.

    Linux only (/proc); None elsewhere, or if the process is gone or a zombie.
    """
    try:
        line = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = line.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return f"{boot}:{fields[19]}"


async def end_orphan(
    pid: int, identity: str, *, grace: float = DEFAULT_GRACE, sleep: Sleep = asyncio.sleep
) -> bool:
    """End the group of a server a hub started and never stopped (it was SIGKILLed, say), if
    `pid` is still that very process: SIGTERM, then SIGKILL once `grace` seconds pass.

    Whether it was found (and ended). A process that is not ours, or a pid now used by another
    program, is left alone.
    """
    if process_identity(pid) != identity:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    steps = max(1, round(grace / _ORPHAN_STEP))
    for _ in range(steps):
        if process_identity(pid) != identity:
            break
        await sleep(_ORPHAN_STEP)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return True


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class StdioClient(UpstreamMethods):
    """One MCP server as a child process speaking JSON-RPC lines on stdin/stdout.

    Safe to share between concurrent tasks: one reader task owns stdout, writes are whole lines.
    """

    def __init__(
        self,
        command: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        name: str | None = None,
        timeout: float = 30.0,
        grace: float = DEFAULT_GRACE,
        on_message: OnMessage | None = None,
        client_info: Mapping[str, str] | None = None,
        capabilities: Mapping[str, Any] | None = None,
        inherited_env: Mapping[str, str] = os.environ,
        sleep: Sleep = asyncio.sleep,
        on_spawn: Callable[[int, str | None], Awaitable[None]] | None = None,
    ) -> None:
        self.command = command
        self.name = name or os.path.basename(command)
        """How errors name the server: never its args or env, which may hold secrets."""
        self.timeout = timeout
        self.grace = grace
        self.on_message = on_message
        self.protocol_version: str | None = None
        self.server_info: dict[str, Any] = {}
        self.capabilities: dict[str, Any] = {}
        self.stderr = StderrTail()
        self._args = tuple(args)
        self._env = child_environment(env or {}, inherited_env)
        self._cwd = cwd
        self._client_info = dict(client_info or {"name": "fsm-hub", "version": __version__})
        self._client_capabilities = dict(capabilities or {})
        self._sleep = sleep
        self._on_spawn = on_spawn
        """Awaited with (pid, identity) right after the spawn: the hub records the child there."""
        self._process: asyncio.subprocess.Process | None = None
        self.identity: str | None = None
        """`process_identity` of the child right after spawn: record it with the pid, so a later
        hub can tell (`end_orphan`) whether a recorded pid is still this server."""
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._receivers: dict[int, OnMessage] = {}
        self._progress: dict[object, OnMessage] = {}
        self._listener: OnMessage | None = None
        self._taps: list[Tap] = []
        self._listening: asyncio.Task[None] | None = None
        self._failure: TransportError | None = None
        self._ended = asyncio.Event()
        self._closed = False
        self._next_id = 0

    def __repr__(self) -> str:
        pid = self.pid if self.pid is not None else "-"
        state = (
            "closed" if self._closed else "failed" if self._failure else "running" if self._process else "new"
        )
        return f"<StdioClient {self.name} pid={pid} {state} pending={len(self._pending)}>"

    @property
    def session_id(self) -> None:
        """stdio has no sessions; the supervisor takes None as "never re-initialized"."""
        return None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    async def wait(self) -> int:
        """Wait for the child to exit; its return code (negative: the signal that ended it)."""
        if self._process is None:
            raise TransportError(f"{self.name} is not started")
        return await self._process.wait()

    async def __aenter__(self) -> StdioClient:
        try:
            await self.initialize()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the server (initialize does it if needed)."""
        if self._closed:
            raise TransportError(f"the client for {self.name} is closed")
        if self._process is not None:
            return
        try:
            self._process = await asyncio.create_subprocess_exec(
                self.command,
                *self._args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self._cwd,
                env=self._env,
                start_new_session=True,
                limit=MAX_LINE,
            )
        except OSError as exc:
            where = f" in {self._cwd}" if self._cwd and isinstance(exc, FileNotFoundError) else ""
            error = LocalResourceError if exc.errno in LOCAL_ERRNOS else TransportError
            raise error(f"cannot start {self.name}: {exc.strerror or exc}: {self.command}{where}") from None
        process = self._process
        self.identity = process_identity(process.pid)
        assert process.stdout is not None and process.stderr is not None
        self._tasks = [
            asyncio.create_task(self._drain_stderr(process.stderr), name=f"stderr {self.name}"),
            asyncio.create_task(self._read(process, process.stdout), name=f"stdout {self.name}"),
        ]
        if self._on_spawn is not None:
            await self._on_spawn(process.pid, self.identity)

    async def initialize(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Spawn if needed, then initialize + notifications/initialized; returns the InitializeResult."""
        await self.start()
        params = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": self._client_capabilities,
            "clientInfo": self._client_info,
        }
        result = await self.request("initialize", params, timeout=timeout)
        version = result.get("protocolVersion")
        if version not in SUPPORTED_PROTOCOL_VERSIONS:
            raise TransportError(
                f"{self.name} speaks MCP protocol version {version!r}; "
                f"fsm-hub speaks {', '.join(SUPPORTED_PROTOCOL_VERSIONS)}"
            )
        self.protocol_version = version
        self.server_info = _dict_or_empty(result.get("serverInfo"))
        self.capabilities = _dict_or_empty(result.get("capabilities"))
        await self.notify("notifications/initialized")
        return result

    async def close(self) -> None:
        """Close stdin, then SIGTERM, then SIGKILL the process group; idempotent."""
        if self._closed:
            return
        self._closed = True
        process = self._process
        try:
            if process is not None:
                await self._stop(process)
        finally:
            self._fail(TransportError(f"the client for {self.name} is closed"))
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _stop(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is None and process.stdin is not None:
            process.stdin.close()
            if await self._exited(process, self.grace):
                return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.returncode is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
            if await self._exited(process, self.grace if sig == signal.SIGTERM else None):
                break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # children that outlived their leader

    async def _exited(self, process: asyncio.subprocess.Process, seconds: float | None) -> bool:
        """Whether the process ends within `seconds` (None: wait for it) of the injected clock."""
        waiter = asyncio.ensure_future(process.wait())
        if seconds is None:
            await waiter
            return True
        alarm = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait([waiter, alarm], return_when=asyncio.FIRST_COMPLETED)
        finally:
            alarm.cancel()
            waiter.cancel()
            await asyncio.gather(waiter, alarm, return_exceptions=True)
        return process.returncode is not None

    # -- requests --------------------------------------------------------------------------

    async def notify(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> None:
        """Send a JSON-RPC notification."""
        seconds = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(seconds):
                await self._write(_encode(None, method, params))
        except TimeoutError:
            raise TransportError(f"{method} to {self.name} timed out after {seconds:g}s") from None

    @property
    def peer(self) -> str:
        return self.name

    async def _call(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        timeout: float | None,
        on_message: OnMessage | None,
    ) -> Any:
        if self._closed:
            raise TransportError(f"the client for {self.name} is closed")
        if self._failure is not None:
            raise self._failure
        if self._process is None:
            raise TransportError(f"{self.name} is not started (initialize first)")
        self._next_id += 1
        request_id = self._next_id
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        token = _progress_token(params)
        if on_message is not None:
            self._receivers[request_id] = on_message
            if token is not None:
                self._progress[token] = on_message
        seconds = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(seconds):
                await self._write(_encode(request_id, method, params))
                message = await answer
        except TimeoutError:
            self._cancel_upstream(request_id, "timed out")
            raise TransportError(f"{method} to {self.name} timed out after {seconds:g}s") from None
        except asyncio.CancelledError:
            self._cancel_upstream(request_id, "cancelled by the client")
            raise
        finally:
            self._pending.pop(request_id, None)
            self._receivers.pop(request_id, None)
            if token is not None:
                self._progress.pop(token, None)
        return result_of(message)

    def _cancel_upstream(self, request_id: int, reason: str) -> None:
        """Tell the server we gave up (no waiting: the pipe may be what is stuck)."""
        process = self._process
        if self._closed or self._failure is not None or process is None or process.stdin is None:
            return
        params = {"requestId": request_id, "reason": reason}
        with contextlib.suppress(Exception):
            process.stdin.write(_encode(None, "notifications/cancelled", params) + b"\n")

    # -- the framing: one JSON-RPC message per line -----------------------------------------

    async def _write(self, body: bytes) -> None:
        """One line, then wait for the pipe to take it (flow control)."""
        if self._failure is not None:
            raise self._failure
        process = self._process
        assert process is not None and process.stdin is not None
        try:
            process.stdin.write(body + b"\n")
            await process.stdin.drain()
        except (ConnectionError, RuntimeError):  # broken pipe, or closed under us
            await self._wait_for_failure()
            raise self._failure or TransportError(f"{self.name} stopped reading its stdin") from None

    async def _read(self, process: asyncio.subprocess.Process, stdout: asyncio.StreamReader) -> None:
        """The one reader of stdout: answers to their callers, everything else to its receiver."""
        why: str
        try:
            while True:
                try:
                    line = await stdout.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip():
                        why = f"wrote something that is not JSON-RPC on stdout: {snippet(exc.partial)}"
                        break
                    why = await self._ending(process)
                    break
                except asyncio.LimitOverrunError:
                    why = f"wrote a line longer than {MAX_LINE // (1024 * 1024)} MiB on stdout"
                    break
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    message = None
                # A batch (an array, MCP 2025-03-26) is its messages in order.
                batch = message if isinstance(message, list) and message else [message]
                if not all(isinstance(m, dict) for m in batch):
                    why = f"wrote something that is not JSON-RPC on stdout: {snippet(line)}"
                    break
                for one in batch:
                    await self._dispatch(one)
        except Exception as exc:  # a bug of ours must still end the client, not hang it
            why = f"reader failed: {type(exc).__name__}: {exc}"
        self._fail(await self._failure_with_tail(process, why))  # close() stops what is left

    async def _ending(self, process: asyncio.subprocess.Process) -> str:
        # A real process's real exit: the loop's clock, not the injected one.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), _EXIT_WAIT)
        if process.returncode is not None:
            return describe_exit(process.returncode)
        return "closed its stdout"

    async def _failure_with_tail(self, process: asyncio.subprocess.Process, why: str) -> TransportError:
        """The error every caller gets: how it ended, pid, and the stderr tail (read to its end)."""
        stderr_task = self._tasks[0] if self._tasks else None
        if stderr_task is not None and process.returncode is not None:
            await asyncio.wait([stderr_task], timeout=0.5)  # the last words, unless a child holds the pipe
        tail = self.stderr.text()
        return TransportError(
            f"{self.name} (pid {process.pid}) {why}" + (f"; stderr: {tail}" if tail else "; no stderr")
        )

    async def _drain_stderr(self, stderr: asyncio.StreamReader) -> None:
        while chunk := await stderr.read(65536):
            self.stderr.feed(chunk)

    async def _dispatch(self, message: dict[str, Any]) -> None:
        if "method" not in message:
            answered = message.get("id")
            key = answered if isinstance(answered, int) else _int_or_none(answered)
            future = self._pending.get(key) if key is not None else None
            if future is not None and not future.done():
                future.set_result(message)
            return  # an answer to a call that gave up, or an id we never sent: nothing to do
        progress = self._progress_receiver(message)
        receiver = progress or self._receiver_for(message)
        if receiver is not None:
            await deliver(receiver, message)
        if "id" in message:
            await self._answer_server_request(message)
        elif progress is None and self._taps:
            for tap in tuple(self._taps):
                try:
                    tap(message)
                except Exception:
                    log.exception("a tap of %s failed on %s", self.name, message.get("method"))
            # Lines already buffered are read without a pause: let the taps' consumers take this
            # one before the next, so a burst does not pile up behind a reader that never yields.
            await asyncio.sleep(0)

    def _progress_receiver(self, message: dict[str, Any]) -> OnMessage | None:
        """The call whose progressToken the message carries, if one is in flight."""
        params = message.get("params")
        if isinstance(params, dict) and "progressToken" in params:
            token = params["progressToken"]
            with contextlib.suppress(TypeError):
                return self._progress.get(token)
        return None

    def _receiver_for(self, message: dict[str, Any]) -> OnMessage | None:
        if "id" in message and len(self._receivers) == 1:
            return next(iter(self._receivers.values()))  # a server request belongs to the call in flight
        return self._listener or self.on_message

    async def _answer_server_request(self, message: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": message["id"]}
        if message.get("method") == "ping":
            reply["result"] = {}
        else:
            reply["error"] = {"code": -32601, "message": "fsm-hub does not answer server requests over stdio"}
        process = self._process
        if process is not None and process.stdin is not None and self._failure is None:
            # Not waiting for the pipe here: the reader must never block on the server's stdin.
            with contextlib.suppress(Exception):
                process.stdin.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")

    # -- ending ----------------------------------------------------------------------------

    def _fail(self, error: TransportError) -> None:
        if self._failure is None:
            self._failure = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._failure)
        self._ended.set()

    async def _wait_for_failure(self) -> None:
        """A broken pipe: let the reader find out how the process ended (bounded)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXIT_WAIT + 1.0):
                await self._ended.wait()

    @property
    def failure(self) -> TransportError | None:
        """How the server ended, once it has."""
        return self._failure

    # -- notifications -----------------------------------------------------------------------

    def listen(self, on_message: OnMessage | None = None) -> asyncio.Task[None]:
        """Receive the server's notifications (those no call claims) until it ends or close().

        The receiver is in place when this returns; the task ends quietly when the server
        ends, and cancelling it stops listening. Calling again while it runs returns it.
        """
        if self._listening is None or self._listening.done():
            self._listener = on_message or self.on_message
            self._listening = asyncio.create_task(self._until_ended(), name=f"listen {self.name}")
            self._listening.add_done_callback(self._stop_listening)  # even if cancelled before it ran
        return self._listening

    def tap(self, receiver: Tap) -> Callable[[], None]:
        """Show `receiver` every notification no call claims, beside the listener; returns the
        function that removes it. It runs on the reader, so it must hand messages on, not wait."""
        self._taps.append(receiver)

        def untap() -> None:
            with contextlib.suppress(ValueError):
                self._taps.remove(receiver)

        return untap

    @property
    def taps(self) -> int:
        """How many taps are in place (tests check that closed sessions leave none)."""
        return len(self._taps)

    async def _until_ended(self) -> None:
        await self._ended.wait()

    def _stop_listening(self, task: asyncio.Task[None]) -> None:
        if task is self._listening:
            self._listener = None


def _progress_token(params: Mapping[str, Any] | None) -> object:
    meta = params.get("_meta") if params else None
    return meta.get("progressToken") if isinstance(meta, dict) else None


def _int_or_none(value: object) -> int | None:
    """Some servers echo our integer ids as strings."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _dict_or_empty(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
