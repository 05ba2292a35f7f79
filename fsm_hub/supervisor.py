"""One task per instance: owns its machine, connects, pings, backs off, and records why.

Every transition is committed to the log (by the machine's recorder) before the supervisor
acts on the new state. Timers go through an injected `sleep`, so tests never wait on real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fsm_hub.client import as_call_tool_result
from fsm_hub.errors import FsmHubError, InstanceUnavailable, TransportError
from fsm_hub.machine import InstanceMachine
from fsm_hub.recorder import fire

log = logging.getLogger(__name__)
T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
OnMessage = Callable[[dict[str, Any]], Any]


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


DEFAULT_TIMING = Timing()


def backoff_delay(attempt: int, timing: Timing, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base·factor^(attempt-1))]."""
    ceiling = min(timing.backoff_cap, timing.backoff_base * timing.backoff_factor ** max(attempt - 1, 0))
    return rng.uniform(0.0, ceiling)


class InstanceClient(Protocol):
    """What the supervisor needs of an MCP client (fsm_hub.client.McpClient provides it)."""

    protocol_version: str | None

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
    async def listen(self, on_message: OnMessage) -> None: ...
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
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        on_change: Callable[[Supervisor], None] = lambda _: None,
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
        self._client: InstanceClient | None = None
        self._listener: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[Command] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

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
        self._inbox.put_nowait(command)

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
            with contextlib.suppress(asyncio.CancelledError):
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
        try:
            result = await client.request(
                method, params, timeout=self.timing.call_timeout, on_message=on_message
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
        except asyncio.CancelledError:
            raise
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
            attempt = int(self.machine.model.attempt)
            delay = backoff_delay(attempt + 1, self.timing, self._rng)
            command = await self._wait(delay)
            if command is None:
                await self._fire("connect", reason=f"retry {attempt + 1} after {delay:.3f}s backoff")
            else:
                await self._handle(command)
        else:  # dead: only discovery brings it back
            command = await self._wait(None)
            assert command is not None
            await self._handle(command)

    async def _connect(self) -> None:
        client = self._connector(self.url)
        try:
            result = await self._within(self._handshake(client), self.timing.connect_timeout, "handshake")
        except (FsmHubError, OSError) as exc:
            await _close_quietly(client)
            self.last_error = str(exc)
            await self._fire("connect_failed", reason="handshake failed", error=str(exc))
            return
        self._client, self.tools, self.last_error = client, result, None
        self._listener = asyncio.create_task(self._listen(client), name=f"listen-{self.instance_id}")
        version = client.protocol_version or "?"
        await self._fire("connected", reason=f"handshake ok (MCP {version}, {len(result)} tools)")

    async def _handshake(self, client: InstanceClient) -> list[dict[str, Any]]:
        await client.initialize()
        return await client.list_tools()

    async def _watch(self) -> None:
        """Active: ping every interval; `ping_misses` misses in a row make it lost."""
        misses, error = 0, ""
        while self.state == "active":
            command = await self._wait(self.timing.ping_interval)
            if command is not None and not isinstance(command, CheckNow):
                await self._handle(command)
                continue
            client = self._client
            assert client is not None
            try:
                await self._within(client.ping(self.timing.ping_timeout), self.timing.ping_timeout, "ping")
            except (FsmHubError, OSError) as exc:
                misses, error = misses + 1, str(exc)
                if misses >= self.timing.ping_misses:
                    self.last_error = error
                    await self._disconnect()
                    await self._fire("lost", reason=f"{misses} pings missed", error=error)
                continue
            misses = 0

    async def _handle(self, command: Command) -> None:
        if isinstance(command, Rediscover):
            self.url = command.url
            await self._disconnect()
            await self._fire("rediscover", reason=command.reason)
        elif isinstance(command, Remove):
            await self._disconnect()
            self.last_error = command.reason
            await self._fire("remove", reason=command.reason, error=command.reason)
        elif isinstance(command, RefreshTools) and self._client is not None:
            try:
                self.tools = await self._within(
                    self._client.list_tools(), self.timing.connect_timeout, "tools/list"
                )
            except (FsmHubError, OSError) as exc:
                log.warning("refreshing tools of %s failed: %s", self.instance_id, exc)
            self._on_change(self)

    async def _fire(self, event: str, *, reason: str, error: str | None = None) -> None:
        await fire(self.machine, event, reason=reason, error=error)
        self._on_change(self)

    # -- plumbing ---------------------------------------------------------------------------

    async def _wait(self, delay: float | None) -> Command | None:
        """The next command, or None once `delay` seconds (of the injected clock) pass."""
        if not self._inbox.empty():
            return self._inbox.get_nowait()
        getter = asyncio.ensure_future(self._inbox.get())
        if delay is None:
            return await getter
        timer = asyncio.ensure_future(self._sleep(delay))
        try:
            await asyncio.wait((getter, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None

    async def _within(self, work: Awaitable[T], seconds: float, what: str) -> T:
        """Await `work` for at most `seconds` of the injected clock."""
        task = asyncio.ensure_future(work)
        timer = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait((task, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if task.cancelled():
            raise TransportError(f"{what} timed out after {seconds:g}s")
        return task.result()

    async def _listen(self, client: InstanceClient) -> None:
        def on_message(message: dict[str, Any]) -> None:
            if message.get("method") == "notifications/tools/list_changed":
                self.send(RefreshTools())

        with contextlib.suppress(FsmHubError, OSError):
            await client.listen(on_message)

    async def _disconnect(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener
        client, self._client = self._client, None
        self.tools = None
        if client is not None:
            await _close_quietly(client)


async def _close_quietly(client: InstanceClient) -> None:
    with contextlib.suppress(FsmHubError, OSError, asyncio.TimeoutError):
        await client.close()
