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
from fsm_hub.errors import (
    InstanceUnavailable,
    LocalResourceError,
    LogUnwritable,
    StoreError,
    TransportError,
)
from fsm_hub.mcp.protocol import as_call_tool_result, usable_tools
from fsm_hub.store.recorder import fire

log = logging.getLogger(__name__)
T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
OnMessage = Callable[[dict[str, Any]], Any]
TOOLS_CHANGED = "notifications/tools/list_changed"
LOCAL_BACKOFF = 1.0
"""Seconds before a ping or connect that failed for lack of the hub's own resources is retried."""

LISTS_CHANGED = frozenset(
    {TOOLS_CHANGED, "notifications/resources/list_changed", "notifications/prompts/list_changed"}
)
"""Notifications that make the supervisor refresh (tools) and tell the sessions (all three)."""
FOLD_LIMIT = 100
"""List changes folded into one pending refresh before the GET stream is no longer read until
that refresh starts: a storm then costs what the socket lets through, not the hub's CPU."""


@dataclass(frozen=True, slots=True)
class Timing:
    """Every timing constant of supervision (seconds), all settable on `fsm-hub serve`."""

    ping_interval: float = 5.0
    ping_timeout: float = 2.0
    ping_misses: int = 3
    """Consecutive missed pings that make an active instance `lost`."""
    connect_timeout: float = 5.0
    """Handshake (initialize + tools/list) budget."""
    start_timeout: float = 30.0
    """The same budget for a configured stdio server, which is spawned first: `npx -y pkg`
    downloads on its first run (Claude Desktop and Claude Code allow 30 s)."""
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
    refresh_interval: float = 0.5
    """Pause after a refresh before the next one, when list changes arrived during it: an
    instance announcing changes in a tight loop costs one refresh per interval, not one per
    announcement."""


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
    """The instance said its tool list changed (folded into one pending refresh, never queued)."""


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
        """Rediscover, Remove and CheckNow only: list changes never queue (see `_changed_lists`)."""
        self._refresh: asyncio.Task[None] | None = None
        """The one refresh running (or pausing between two), a child task the loop never awaits."""
        self._refresh_tools_pending = False
        self._lists_pending = False
        """List changes that arrived while `_refresh` runs: folded here, taken by its next round."""
        self._folded = 0
        self._next_round: asyncio.Future[None] | None = None
        """What the GET stream's reader waits for once FOLD_LIMIT changes are folded."""
        self._reported_garbage = False
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._starved = False
        """A ping or connect failed for lack of our own resources, and none has got through since."""
        machine.add_listener(self)  # type: ignore[no-untyped-call]  # for on_enter_active

    # -- outside world ----------------------------------------------------------------------

    @property
    def state(self) -> str:
        return str(self.machine.model.state)

    @property
    def client(self) -> InstanceClient | None:
        """The supervisor's own client (health, tool cache) while connected; sessions have theirs."""
        return self._client

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"supervise-{self.instance_id}")
        return self._task

    def send(self, command: Command) -> None:
        if isinstance(command, RefreshTools):
            self._changed_lists(tools=True)
            return
        if isinstance(command, CheckNow) and CheckNow() in self._inbox:
            return  # one ping answers every failed call waiting for it
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
        except LocalResourceError as exc:  # our fds/memory ran out: no evidence, try again soon
            await _close_quietly(client)
            self._starving(exc)
            command = await self._wait(LOCAL_BACKOFF)
            if command is not None:
                await self._handle(command)
            return  # still connecting (unless the command moved it): the next step connects again
        except Exception as exc:  # whatever the instance did wrong, it is a failed connect
            self._fed()
            self.last_error = _describe(exc)
            try:
                await self._fire("connect_failed", reason="handshake failed", error=self.last_error)
            finally:
                await _close_quietly(client)
            return
        self._fed()
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
        return self._usable(await client.list_tools())

    async def _watch(self) -> None:
        """Active: ping every interval; `ping_misses` misses in a row make it lost."""
        client = self._client
        assert client is not None
        session = client.session_id
        misses = 0
        delay = self.timing.ping_interval
        while self.state == "active":
            command = await self._wait(delay, active=True)
            delay = self.timing.ping_interval
            if isinstance(command, Rediscover | Remove):
                await self._handle(command)
                continue
            try:
                await self._within(client.ping(self.timing.ping_timeout), self.timing.ping_timeout, "ping")
            except LocalResourceError as exc:  # says nothing about the instance: neither miss nor answer
                self._starving(exc)
                delay = LOCAL_BACKOFF
                continue
            except Exception as exc:
                self._fed()
                misses += 1
                if misses >= self.timing.ping_misses:
                    self.last_error = _describe(exc)
                    await self._fire("lost", reason=f"{misses} pings missed", error=self.last_error)
                    await self._disconnect()
                continue
            self._fed()
            misses = 0
            if client.session_id != session:
                # The client re-initialized a lost session: the GET stream and any
                # list_changed sent meanwhile belonged to the old one.
                session = client.session_id
                await self._stop_listening()
                self._listen(client)
                self._changed_lists(tools=True)

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

    # -- list changes: coalesced, beside the loop ------------------------------------------

    def _changed_lists(self, *, tools: bool) -> None:
        """The instance said a list changed: start the one refresh, or fold this into its next round.

        The refresh runs in a child task so that pings, Remove and Rediscover never wait behind
        it, and a storm of announcements costs one flag, not one queued command each.
        """
        if self._client is None or self.state != "active":
            return  # stale: the next handshake lists the tools anyway
        if self._refresh is not None:
            self._refresh_tools_pending |= tools
            self._lists_pending = True
            self._folded += 1
            return
        self._refresh = asyncio.create_task(
            self._refreshing(self._client, tools), name=f"refresh-{self.instance_id}"
        )
        self._refresh.add_done_callback(self._refresh_done)

    async def _refreshing(self, client: InstanceClient, tools: bool) -> None:
        while True:
            self._refresh_tools_pending = self._lists_pending = False
            self._start_round()
            if tools:
                await self._refresh_tools(client)
            else:
                self._on_change(self)
            if not self._lists_pending:
                return
            await self._sleep(self.timing.refresh_interval)
            tools = self._refresh_tools_pending

    def _start_round(self) -> None:
        """A refresh round starts (or refreshing ends): folding starts over, the reader goes on."""
        self._folded = 0
        waiting, self._next_round = self._next_round, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        if self._refresh is task:
            self._refresh = None
            self._start_round()
        if not task.cancelled() and task.exception() is not None:
            log.warning("refreshing the lists of %s failed: %s", self.instance_id, task.exception())

    async def _stop_refreshing(self) -> None:
        refresh, self._refresh = self._refresh, None
        if refresh is not None:
            refresh.cancel()
            await asyncio.wait([refresh])
        self._start_round()

    async def _refresh_tools(self, client: InstanceClient | None = None) -> None:
        client = client or self._client
        if client is None:
            return
        try:
            tools = await self._within(client.list_tools(), self.timing.connect_timeout, "tools/list")
        except Exception as exc:  # the next ping decides whether the instance is still there
            log.warning("refreshing tools of %s failed: %s", self.instance_id, _describe(exc))
        else:
            if client is not self._client:
                return  # disconnected meanwhile: the list belongs to a closed session
            self.tools = self._usable(tools)
        self._on_change(self)

    def _starving(self, exc: LocalResourceError) -> None:
        """One warning per episode of local resource failures, however many pings it lasts."""
        if not self._starved:
            self._starved = True
            log.warning(
                "fsm-hub: %s not checked, the hub is out of resources (%s); no transition recorded, "
                "retrying every %gs", self.instance_id, _describe(exc), LOCAL_BACKOFF,
            )

    def _fed(self) -> None:
        """A ping or connect got an answer or a failure of the instance's own: the episode is over."""
        if self._starved:
            self._starved = False
            log.warning("fsm-hub: %s can be checked again, the hub has resources back", self.instance_id)

    def _usable(self, tools: list[Any]) -> list[dict[str, Any]]:
        """`tools` without the entries no client could use, said once per instance."""
        usable, dropped = usable_tools(tools)
        if dropped and not self._reported_garbage:
            self._reported_garbage = True
            log.warning(
                "instance %s listed %d invalid tool entr%s (%s); left out",
                self.instance_id,
                len(dropped),
                "y" if len(dropped) == 1 else "ies",
                "; ".join(dropped[:3]),
            )
        return usable

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
        method = message.get("method")
        if method in LISTS_CHANGED:
            self._changed_lists(tools=method == TOOLS_CHANGED)

    def _heard(self, message: dict[str, Any]) -> asyncio.Future[None] | None:
        """`_notice` for a stream of notifications only (HTTP's GET stream), which may be paused.

        Past FOLD_LIMIT folded changes the answer is a future the stream's reader awaits (the
        upstream client awaits what a receiver returns): it stops reading until the next refresh
        round, and TCP slows the instance down instead of the hub parsing every announcement.
        """
        self._notice(message)
        if self._folded <= FOLD_LIMIT:
            return None
        if self._next_round is None:
            self._next_round = asyncio.get_running_loop().create_future()
        return self._next_round

    def _listen(self, client: InstanceClient) -> None:
        """Follow the instance's notifications for list changes.

        Over HTTP that is the GET stream, which nothing else shares: it may be paused in a storm.
        A stdio instance's notifications share one pipe with the answers (pings, tools/list), so
        its reader is never paused there; its storms are still coalesced.
        """
        receiver = self._heard if getattr(client, "notifications_apart", False) else self._notice
        self._listener = client.listen(receiver)
        self._listener.add_done_callback(_retrieve)

    async def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.wait([listener])

    async def _disconnect(self) -> None:
        await self._stop_listening()
        await self._stop_refreshing()
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
