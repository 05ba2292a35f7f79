"""One task per instance: owns its machine, connects, pings, backs off, and records why.

Every transition is committed to the log (by the machine's recorder) before the supervisor
acts on the new state. Timers go through an injected `sleep`, so tests never wait on real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fsm_hub.core.machine import InstanceMachine
from fsm_hub.errors import InstanceUnavailable, LogUnwritable, StoreError, TransportError
from fsm_hub.mcp.upstream import as_call_tool_result
from fsm_hub.store.recorder import fire

log = logging.getLogger(__name__)
T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
OnMessage = Callable[[dict[str, Any]], Any]
TOOLS_CHANGED = "notifications/tools/list_changed"


@dataclass(frozen=True, slots=True)
class Timing:
    """Every timing constant of supervision (seconds), all settable on `fsm-hub serve`."""

    ping_interval: float = 5.0
    ping_timeout: float = 2.0
    ping_misses: int = 3
    """Consecutive missed pings that make an active instance `lost`."""
    connect_timeout: float = 5.0
    """Handshake (initialize + tools/list) budget."""
    backoff_base: float = 0.5
    backoff_factor: float = 2.0
    backoff_cap: float = 30.0
    retry_attempts: int = 8
    """Connect attempts after which a failing instance is `dead`."""
    call_timeout: float = 300.0
    """Budget for one routed request (tool calls can be long)."""
    record_attempts: int = 5
    """Appends of one transition tried (with backoff) before the log counts as unwritable."""
    record_backoff: float = 0.05
    """First pause between those appends; doubles each time."""


DEFAULT_TIMING = Timing()


def timer(seconds: float) -> asyncio.Future[None]:
    """The default `sleep`: asyncio.sleep as a bare future resolved by `call_later`.

    A supervisor sets two timers per ping; as futures rather than tasks, a thousand supervisors
    pinging every few seconds cost a fraction of what `asyncio.sleep` tasks would.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()
    handle = loop.call_later(seconds, _resolve, future)
    future.add_done_callback(lambda _: handle.cancel())
    return future


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def backoff_delay(attempt: int, timing: Timing, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base·factor^(attempt-1))]."""
    ceiling = min(timing.backoff_cap, timing.backoff_base * timing.backoff_factor ** max(attempt - 1, 0))
    return rng.uniform(0.0, ceiling)


class InstanceClient(Protocol):
    """What the supervisor needs of an MCP client (fsm_hub.mcp.upstream.McpClient provides it)."""

    protocol_version: str | None

    @property
    def session_id(self) -> str | None: ...
    async def initialize(self) -> dict[str, Any]: ...
    async def list_tools(self) -> list[dict[str, Any]]: ...
    async def ping(self, timeout: float | None = None) -> None: ...
    async def request(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        on_message: OnMessage | None = None,
    ) -> dict[str, Any]: ...
    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None: ...
    def listen(self, on_message: OnMessage) -> asyncio.Task[None]:
        """Read the standalone GET stream in a task the client owns (and cancels on close)."""
        ...
    async def close(self) -> None: ...


Connector = Callable[[str], InstanceClient]


@dataclass(frozen=True, slots=True)
class Rediscover:
    url: str
    reason: str


@dataclass(frozen=True, slots=True)
class Remove:
    reason: str


@dataclass(frozen=True, slots=True)
class RefreshTools:
    """The instance said its tool list changed."""


@dataclass(frozen=True, slots=True)
class CheckNow:
    """A routed call failed in transport: ping now instead of at the next interval."""


Command = Rediscover | Remove | RefreshTools | CheckNow


class Supervisor:
    """Drives one instance's machine; the only code that sends it events."""

    def __init__(
        self,
        instance_id: str,
        url: str,
        machine: InstanceMachine,
        *,
        connector: Connector,
        timing: Timing = DEFAULT_TIMING,
        sleep: Sleep = timer,
        rng: random.Random | None = None,
        on_change: Callable[[Supervisor], None] = lambda _: None,
        admission: asyncio.Semaphore | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.url = url
        self.machine = machine
        self.timing = timing
        self.tools: list[dict[str, Any]] | None = None
        """The instance's tools while it is active, refreshed on reconnect and list_changed."""
        self.last_error: str | None = None
        self._connector = connector
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._on_change = on_change
        self._admission = admission
        """Bounds how many instances start at once (spawned stdio servers); waiting for a slot
        is not part of the connect timeout."""
        self._client: InstanceClient | None = None
        self._listener: asyncio.Task[None] | None = None
        self._inbox: deque[Command] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        machine.add_listener(self)  # type: ignore[no-untyped-call]  # for on_enter_active

    # -- outside world ----------------------------------------------------------------------

    @property
    def state(self) -> str:
        return str(self.machine.model.state)

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"supervise-{self.instance_id}")
        return self._task

    def send(self, command: Command) -> None:
        self._inbox.append(command)
        self._wake()

    async def deliver(self, command: Command) -> None:
        """Queue `command` for the running loop, or apply it now if the loop has not started."""
        if self.running:
            self.send(command)
        else:
            await self._handle(command)

    async def stop(self) -> None:
        """Cancel the loop and close the instance session; records nothing (hub stop is not death)."""
        if self._task is not None:
            self._task.cancel()
            # A loop that failed was logged by run(); stopping must still close the session.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._disconnect()

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        on_message: OnMessage | None = None,
    ) -> dict[str, Any]:
        """Route a request to the instance, or fail at once if it is not active."""
        client = self._client
        if client is None or self.state != "active":
            raise InstanceUnavailable(self.instance_id, self.state, self.last_error)

        def relay(message: dict[str, Any]) -> Any:
            self._notice(message)  # a call that changes the tools announces it on its own stream
            return on_message(message) if on_message is not None else None

        try:
            result = await client.request(
                method, params, timeout=self.timing.call_timeout, on_message=relay
            )
        except TransportError:
            self.send(CheckNow())
            raise
        return as_call_tool_result(result) if method == "tools/call" else result

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        client = self._client
        if client is None or self.state != "active":
            raise InstanceUnavailable(self.instance_id, self.state, self.last_error)
        await client.notify(method, params)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                await self._step()
        except (asyncio.CancelledError, LogUnwritable):
            raise  # the hub reports an unwritable log once, as one line
        except Exception:
            log.exception("supervisor of %s failed", self.instance_id)
            raise

    async def _step(self) -> None:
        state = self.state
        if state == "discovered":
            await self._fire("connect", reason="discovered")
        elif state == "connecting":
            await self._connect()
        elif state == "active":
            await self._watch()
        elif state == "retrying":
            attempt = int(self.machine.model.attempt) + 1
            delay = backoff_delay(attempt, self.timing, self._rng)
            command = await self._wait(delay)
            if command is None:
                await self._fire("connect", reason=f"retry {attempt} after {delay:.3f}s backoff")
            else:
                await self._handle(command)
        else:  # dead: only discovery brings it back
            command = await self._wait(None)
            assert command is not None
            await self._handle(command)

    async def _connect(self) -> None:
        if self._admission is None:
            await self._connect_now()
            return
        async with self._admission:
            await self._connect_now()

    async def _connect_now(self) -> None:
        client = self._connector(self.url)
        try:
            tools = await self._within(self._handshake(client), self.timing.connect_timeout, "handshake")
        except asyncio.CancelledError:
            await _close_quietly(client)  # the hub is stopping: leave no session behind
            raise
        except Exception as exc:  # whatever the instance did wrong, it is a failed connect
            self.last_error = _describe(exc)
            try:
                await self._fire("connect_failed", reason="handshake failed", error=self.last_error)
            finally:
                await _close_quietly(client)
            return
        version = client.protocol_version or "?"
        try:
            # `on_enter_active` installs the session as the machine enters `active`: after the
            # commit, and in the same step as the state change, so nobody sees one without the other.
            await self._fire(
                "connected", reason=f"handshake ok (MCP {version}, {len(tools)} tools)", notify=False,
                session=(client, tools),
            )
        except BaseException:
            await _close_quietly(client)  # not committed: nothing may route through it
            raise
        self._listen(client)
        self._on_change(self)

    def on_enter_active(self, session: tuple[InstanceClient, list[dict[str, Any]]] | None = None) -> None:
        """The machine's listener: `connected` is committed and the state is changing now."""
        if session is not None:
            self._client, self.tools = session
            self.last_error = None

    async def _handshake(self, client: InstanceClient) -> list[dict[str, Any]]:
        await client.initialize()
        return await client.list_tools()

    async def _watch(self) -> None:
        """Active: ping every interval; `ping_misses` misses in a row make it lost."""
        client = self._client
        assert client is not None
        session = client.session_id
        misses = 0
        while self.state == "active":
            command = await self._wait(self.timing.ping_interval, active=True)
            if isinstance(command, Rediscover | Remove | RefreshTools):
                await self._handle(command)
                continue
            try:
                await self._within(client.ping(self.timing.ping_timeout), self.timing.ping_timeout, "ping")
            except Exception as exc:
                misses += 1
                if misses >= self.timing.ping_misses:
                    self.last_error = _describe(exc)
                    await self._fire("lost", reason=f"{misses} pings missed", error=self.last_error)
                    await self._disconnect()
                continue
            misses = 0
            if client.session_id != session:
                # The client re-initialized a lost session: the GET stream and any
                # list_changed sent meanwhile belonged to the old one.
                session = client.session_id
                await self._stop_listening()
                self._listen(client)
                await self._refresh_tools()

    async def _handle(self, command: Command) -> None:
        if isinstance(command, Rediscover):
            await self._fire("rediscover", reason=command.reason)
            await self._disconnect()
            self.url = command.url
        elif isinstance(command, Remove):
            self.last_error = command.reason
            await self._fire("remove", reason=command.reason, error=command.reason)
            await self._disconnect()
        elif isinstance(command, RefreshTools) and self.state == "active":
            await self._refresh_tools()

    async def _fire(
        self, event: str, *, reason: str, error: str | None = None, notify: bool = True, **details: Any
    ) -> None:
        """Commit and take the transition; a failed append is retried with backoff.

        Until the append succeeds the machine stays in its source state. If the log keeps
        refusing, LogUnwritable ends this loop and the hub stops serving state it cannot record.
        """
        delay = self.timing.record_backoff
        for attempt in range(1, self.timing.record_attempts + 1):
            try:
                await fire(self.machine, event, reason=reason, error=error, **details)
                break
            except StoreError as exc:
                if attempt == self.timing.record_attempts:
                    raise LogUnwritable(str(exc)) from None
                log.info("recording %s of %s failed (%s); retrying", event, self.instance_id, exc)
                await self._sleep(delay)
                delay *= 2
        if notify:
            self._on_change(self)

    async def _refresh_tools(self) -> None:
        client = self._client
        if client is None:
            return
        try:
            self.tools = await self._within(client.list_tools(), self.timing.connect_timeout, "tools/list")
        except Exception as exc:  # the next ping decides whether the instance is still there
            log.warning("refreshing tools of %s failed: %s", self.instance_id, _describe(exc))
        self._on_change(self)

    # -- plumbing ---------------------------------------------------------------------------

    async def _wait(self, delay: float | None, *, active: bool = False) -> Command | None:
        """The next command, or None once `delay` seconds (of the injected clock) pass.

        Unless the instance is active, RefreshTools and CheckNow are stale and dropped: they
        must neither cut a backoff short nor draw a new one.
        """
        alarm = None if delay is None else asyncio.ensure_future(self._sleep(delay))
        if alarm is not None:
            alarm.add_done_callback(self._wake)
        try:
            while True:  # a wake may be spurious: look again every time
                while self._inbox:
                    command = self._inbox.popleft()
                    if active or isinstance(command, Rediscover | Remove):
                        return command
                if alarm is not None and alarm.done():
                    alarm.result()  # a failing sleeper fails loudly
                    return None
                self._wakeup = asyncio.get_running_loop().create_future()
                await self._wakeup
        finally:
            self._wakeup = None
            if alarm is not None:
                alarm.remove_done_callback(self._wake)
                alarm.cancel()

    def _wake(self, _: object = None) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _within(self, work: Awaitable[T], seconds: float, what: str) -> T:
        """Await `work` in this task, cancelling it once `seconds` of the injected clock pass.

        asyncio.timeout's way (cancel the task, tell our cancellation from anyone else's by
        `uncancel`), on the injected clock, and without a task per call.
        """
        task = asyncio.current_task()
        assert task is not None
        deadline = _Deadline(task)
        alarm = asyncio.ensure_future(self._sleep(seconds))
        alarm.add_done_callback(deadline.expire)
        try:
            result = await work
        except BaseException:
            # Expired, and nobody else cancelled us: whatever the work made of our
            # cancellation (CancelledError, or its own error) means it ran out of time.
            if deadline.expired and task.uncancel() == 0:
                raise TransportError(f"{what} timed out after {seconds:g}s") from None
            raise
        finally:
            deadline.over = True
            alarm.cancel()
        if deadline.expired:  # the work swallowed our cancellation: don't leave it counted
            task.uncancel()
        return result

    def _notice(self, message: dict[str, Any]) -> None:
        if message.get("method") == TOOLS_CHANGED:
            self.send(RefreshTools())

    def _listen(self, client: InstanceClient) -> None:
        """Follow the instance's GET stream (if it offers one) for list_changed."""
        self._listener = client.listen(self._notice)
        self._listener.add_done_callback(_retrieve)

    async def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.wait([listener])

    async def _disconnect(self) -> None:
        await self._stop_listening()
        client, self._client = self._client, None
        self.tools = None
        if client is not None:
            await _close_quietly(client)


class _Deadline:
    """Cancels the task awaiting some work when its alarm goes off, unless the work is over."""

    __slots__ = ("expired", "over", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.expired = False
        self.over = False

    def expire(self, alarm: asyncio.Future[None]) -> None:
        # `over` guards against a callback already scheduled when the work finished.
        if self.over or alarm.cancelled():
            return
        self.expired = True
        self.task.cancel()


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _retrieve(task: asyncio.Task[None]) -> None:
    """The stream ended (405, server gone, cancelled): only pings decide about the instance."""
    if not task.cancelled():
        task.exception()


async def _close_quietly(client: InstanceClient) -> None:
    with contextlib.suppress(Exception):
        await client.close()
