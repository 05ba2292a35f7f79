"""`fsm-hub serve`: own the log and supervise, or attach to the process that does.

The owner runs the hub, a private token-protected HTTP endpoint for attached processes (and the
public one of `--http`), and its own stdio client as an in-process session. An attached process
relays its stdio client to the owner and takes over if the owner exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import secrets
import signal
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fsm_hub.discovery.config import ConfiguredServers
from fsm_hub.discovery.directory import Discovery, process_is_running
from fsm_hub.errors import FsmHubError
from fsm_hub.mcp import jsonrpc
from fsm_hub.mcp.jsonrpc import INTERNAL_ERROR, JsonRpcDecodeError, decode_error, error_response, parse_error
from fsm_hub.mcp.session import Session
from fsm_hub.observe import banner
from fsm_hub.serve.attach import AttachMachine
from fsm_hub.serve.ownership import Owner, Ownership
from fsm_hub.store.sqlite import EventStore
from fsm_hub.supervision.hub import DEFAULT_START_LIMIT, Hub
from fsm_hub.supervision.supervisor import DEFAULT_TIMING, Timing
from fsm_hub.transports.limits import HttpLimits
from fsm_hub.transports.stdio import StdioChannel

if TYPE_CHECKING:
    from fsm_hub.serve.relay import HttpRelay
    from fsm_hub.transports.http import HttpEndpoint

log = logging.getLogger(__name__)
TAKEOVER_WAIT = 10.0
EOF_GRACE = 10.0
"""Seconds the answers to requests read before end of input may still take."""
END_OF_INPUT = "client closed stdin"
MAX_IN_FLIGHT = 16
"""Requests of one stdio client handled at once."""
RELAY_POLL = 0.2
"""Seconds between an attached `serve --http`'s looks at whether the log's owner is gone."""
DEFAULT_LIMITS = HttpLimits()

DISCOVERY_HEAD_START = 0.25
"""Seconds the first look at the instances directory may take before clients are served anyway
(a small directory is then complete at the first call; a huge one fills in while serving)."""


@dataclass(frozen=True, slots=True)
class ServeOptions:
    db: Path
    instances_dir: Path
    mcp: bool = False
    http: tuple[str, int] | None = None
    allow_remote: bool = False
    timing: Timing = DEFAULT_TIMING
    limits: HttpLimits = DEFAULT_LIMITS
    """Session expiry, session and connection caps of both HTTP endpoints."""
    instance: str | None = None
    """`--instance`: the stdio client gets that one instance's own MCP (a per-instance endpoint)."""
    config: Path | None = None
    """The configured servers' file (None: no configured servers)."""
    start_limit: int = DEFAULT_START_LIMIT
    """Configured stdio servers starting (spawn + initialize + tools/list) at once."""


class OwnedHub:
    """Everything the owning process runs, started and stopped as one."""

    def __init__(self, options: ServeOptions, ownership: Ownership) -> None:
        self.options = options
        self.ownership = ownership
        self.store: EventStore | None = None
        self.hub: Hub | None = None
        self.endpoints: list[HttpEndpoint] = []
        self._advertising: asyncio.Task[None] | None = None

    async def start(self, *, settle: float = 0.0, advertise_later: bool = False) -> Hub:
        """Start the hub and its endpoints; advertise the private one once instances have had up
        to `settle` seconds to reconnect (a takeover: the attached clients' next calls then find
        their instances active, not still connecting).

        `advertise_later`: the private endpoint starts in the background, its aiohttp imported in
        a thread, so a stdio client's first answers do not wait for ~0.2 s of imports; attaching
        processes wait for the advertisement anyway (`_wait_for_owner`).
        """
        options = self.options
        self.store = await EventStore.open(options.db)
        discovery = Discovery(options.instances_dir, allow_remote=options.allow_remote)
        configured = ConfiguredServers(options.config) if options.config is not None else None
        self.hub = Hub(
            self.store,
            discovery,
            timing=options.timing,
            configured=configured,
            start_limit=options.start_limit,
        )
        try:
            await self.hub.start(wait_for_discovery=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hub.discovered.wait(), DISCOVERY_HEAD_START)
            if settle:
                await self.hub.settle(settle)
            if advertise_later:
                self._advertising = asyncio.create_task(self._advertise(), name="fsm-hub-private-endpoint")
                self._advertising.add_done_callback(_advertised)
            else:
                await self._advertise()
            if options.http is not None:
                from fsm_hub.transports.http import HttpEndpoint

                public = HttpEndpoint(self.hub, *options.http, limits=options.limits)
                self.endpoints.append(public)
                url = await public.start()
                log.info("fsm-hub: serving MCP over Streamable HTTP at %s", url)
        except asyncio.CancelledError:
            await self.stop("stopped while starting")
            raise
        except BaseException:
            await self.stop("start failed")
            raise
        return self.hub

    async def _advertise(self) -> None:
        """Serve the token-protected endpoint attaching processes use, and say where it is."""
        assert self.hub is not None
        http = await asyncio.to_thread(importlib.import_module, "fsm_hub.transports.http")
        token = secrets.token_urlsafe(24)
        private = http.HttpEndpoint(self.hub, "127.0.0.1", 0, token=token, limits=self.options.limits)
        self.endpoints.append(private)
        self.ownership.advertise(await private.start(), token)

    async def stop(self, reason: str) -> None:
        advertising, self._advertising = self._advertising, None
        if advertising is not None and not advertising.done():
            advertising.cancel()
            await asyncio.gather(advertising, return_exceptions=True)
        for endpoint in self.endpoints:
            with contextlib.suppress(Exception):
                await endpoint.stop()
        if self.hub is not None:
            await self.hub.stop(reason)
        if self.store is not None:
            await self.store.close()
        self.ownership.release()


async def serve(options: ServeOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    ownership = Ownership(options.db)
    channel: StdioChannel | None = None
    if options.mcp:
        channel = StdioChannel()
        await channel.open()
    if ownership.try_acquire():
        owned = OwnedHub(options, ownership)
        hub = await owned.start(advertise_later=channel is not None)
        banner.owner(options, owned)
        hub.on_failure(lambda _: stop.set())
        if channel is None:
            await stop.wait()
            await owned.stop("log unwritable" if hub.failure else "signal")
            return _exit_code(hub)
        code = await _serve_stdio(channel, owned, _stdio_session(hub, channel, options), stop)
        return _exit_code(hub) or code
    relay: HttpRelay | None = None
    if options.http is not None:
        # The public endpoint relays to whoever owns the log; a takeover here must not bind it again.
        from fsm_hub.serve.relay import HttpRelay

        relay = HttpRelay(
            *options.http, ownership.read, limits=options.limits, call_timeout=options.timing.call_timeout
        )
        url = await relay.start()
        owner = ownership.read()
        who = f" (pid {owner.pid})" if owner else ""
        log.warning("fsm-hub: serving MCP over Streamable HTTP at %s, relayed to the owning hub%s", url, who)
        options = replace(options, http=None)
    try:
        if channel is None:
            if relay is None:
                owner = ownership.read()
                who = f" (pid {owner.pid})" if owner else ""
                raise FsmHubError(
                    f"another fsm-hub{who} already serves {options.db}; use serve --mcp or --http to attach"
                )
            return await _relay_until_stopped(options, ownership, stop)
        return await _attach(channel, options, ownership, stop)
    finally:
        if relay is not None:
            await relay.stop()


async def _relay_until_stopped(options: ServeOptions, ownership: Ownership, stop: asyncio.Event) -> int:
    """An attached `serve --http`: relay until a signal; take over the log when its owner exits."""
    owned: OwnedHub | None = None
    try:
        while not stop.is_set():
            if owned is None and ownership.try_acquire():
                log.warning("fsm-hub: the owning hub is gone; taking over")
                owned = OwnedHub(options, ownership)
                await owned.start(settle=options.timing.connect_timeout)  # advertises: the relay follows
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RELAY_POLL)
    finally:
        if owned is not None:
            await owned.stop("signal")
    return 0


async def _serve_stdio(
    channel: StdioChannel,
    owned: OwnedHub,
    session: Session,
    stop: asyncio.Event,
    pending: set[asyncio.Task[Any]] | None = None,
) -> int:
    """Answer the stdio client in-process until stdin closes or a signal arrives."""
    tasks: set[asyncio.Task[Any]] = pending if pending is not None else set()

    async def answer(message: Any) -> None:
        reply = await session.handle(message)
        if reply is not None:
            await channel.send(reply)

    reason = await _pump(channel, stop, tasks, lambda line, message: answer(message))
    await _finish_answers(reason, tasks)
    await session.close(reason)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await owned.stop(reason)
    await channel.drain()
    return 0


async def _pump(
    channel: StdioChannel,
    stop: asyncio.Event,
    tasks: set[asyncio.Task[Any]],
    handle: Any,
) -> str:
    """Read stdin lines until EOF or `stop`; each parsed message is handled in its own task."""
    reading = asyncio.ensure_future(_read_lines(channel, tasks, handle))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((reading, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if reading.done():
        return reading.result()
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    return "signal"


async def _read_lines(channel: StdioChannel, tasks: set[asyncio.Task[Any]], handle: Any) -> str:
    """The hot loop: one line in, one task out; no per-line timers or waits.

    At most MAX_IN_FLIGHT requests are handled at once: beyond, stdin is not read until one
    is answered, so a client that stops reading its answers stops the hub reading its requests
    (memory stays bounded) instead of piling answers up.
    """
    while True:
        if len(tasks) >= MAX_IN_FLIGHT:
            await asyncio.wait(list(tasks), return_when=asyncio.FIRST_COMPLETED)
            continue
        try:
            line = await channel.readline()
        except ValueError:
            channel.write(parse_error(f"Parse error: the line exceeds {jsonrpc.MAX_MESSAGE} bytes"))
            continue
        if line is None:
            return END_OF_INPUT
        if not line.strip():
            continue
        try:
            message = jsonrpc.decode(line)
        except JsonRpcDecodeError as exc:
            await channel.send(decode_error(exc))
            continue
        task = asyncio.create_task(handle(line, message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _attach(
    channel: StdioChannel, options: ServeOptions, ownership: Ownership, stop: asyncio.Event
) -> int:
    """Relay the stdio client to the owner; take over (or follow a new owner) when it exits."""
    from fsm_hub.serve.bridge import Bridge, OwnerGone

    owner = await _wait_for_owner(ownership)
    if owner is None:
        return await _take_over_or_fail(channel, options, ownership, stop, set())
    banner.attached(options, owner)
    tasks: set[asyncio.Task[Any]] = set()
    attachment = AttachMachine()
    owned: OwnedHub | None = None
    failover_lock = asyncio.Lock()

    def owner_lost(failed: Owner) -> None:
        task = asyncio.create_task(failover(failed), name="fsm-hub-failover")
        tasks.add(task)
        task.add_done_callback(_failover_done)
        task.add_done_callback(tasks.discard)

    timeout = options.timing.call_timeout
    bridge = Bridge(channel, owner, on_lost=owner_lost, call_timeout=timeout, instance=options.instance)

    async def failover(failed: Owner) -> None:
        nonlocal owned
        async with failover_lock:
            if attachment.owning.is_active or bridge.owner != failed:
                return  # someone already moved us on
            attachment.owner_lost()
            log.warning("fsm-hub: the owning hub (pid %s) is gone; taking over or re-attaching", failed.pid)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + TAKEOVER_WAIT
            retry_same = True
            try:
                while loop.time() < deadline:
                    if ownership.try_acquire():
                        owned = OwnedHub(options, ownership)
                        hub = await owned.start(settle=options.timing.connect_timeout)
                        session = _stdio_session(hub, channel, options)
                        # Bound again before any new message reaches the session: until then they
                        # queue on this lock (their relay fails, they ask for a failover).
                        await bridge.reattach(session.handle)
                        attachment.took_over(session=session)
                        await bridge.close(end_session=False)
                        return
                    successor = ownership.read()
                    if successor is not None and successor != failed:
                        with contextlib.suppress(OwnerGone):
                            await bridge.replay_remote(successor)
                            attachment.reattached()
                            return
                    elif successor is not None and retry_same and process_is_running(successor.pid):
                        # Still running, it may just have lost our session: try once to re-establish
                        # it there. If it is stopping (503), wait for its lock instead of pestering it.
                        retry_same = False
                        with contextlib.suppress(OwnerGone):
                            await bridge.replay_remote(successor)
                            attachment.reattached()
                            return
                    await asyncio.sleep(0.05)
            finally:
                if attachment.failing_over.is_active:
                    attachment.gave_up()  # the client's next call tries again
            raise FsmHubError("the owning hub is gone and no process could take over")

    async def handle(line: bytes, message: Any) -> None:
        for _ in range(2):
            session = attachment.model.session
            if session is not None:
                reply = await session.handle(message)
                if reply is not None:
                    await channel.send(reply)
                return
            current = bridge.owner
            try:
                await bridge.relay(line, message)
            except OwnerGone:
                try:
                    await failover(current)
                except Exception as exc:  # the client must get an answer, whatever failed
                    log.error("fsm-hub: %s", exc)
                    break
                continue
            except Exception as exc:  # unresponsive owner, an oversized event, anything: answer
                log.error("fsm-hub: %s", exc)
                if isinstance(message, dict) and "id" in message:
                    await channel.send(error_response(message["id"], INTERNAL_ERROR, f"fsm-hub: {exc}"))
                return
            # Remembered once delivered: a message that failed is retried on the new owner as
            # itself, so replaying it first would send it twice.
            bridge.remember(message)
            return
        if isinstance(message, dict) and "id" in message:
            await channel.send(error_response(message["id"], INTERNAL_ERROR, "fsm-hub: no hub is reachable"))

    reason = await _pump(channel, stop, tasks, handle)
    await _finish_answers(reason, tasks)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if attachment.model.session is not None:
        await attachment.model.session.close(reason)
    if owned is not None:
        await owned.stop(reason)
    await bridge.close(end_session=owned is None)  # again, if we took over: harmless
    await channel.drain()
    return 0


async def _finish_answers(reason: str, tasks: set[asyncio.Task[Any]]) -> None:
    """After end of input, let the requests already read be answered (for at most EOF_GRACE).

    A client that writes its last request and closes stdin still reads stdout: its answer
    must not be dropped. A signal stops at once.
    """
    if reason == END_OF_INPUT and tasks:
        await asyncio.wait(list(tasks), timeout=EOF_GRACE)


def _failover_done(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("fsm-hub: %s", task.exception())


async def _wait_for_owner(ownership: Ownership) -> Owner | None:
    """The advertised owner; None once we hold the lock ourselves (the owner is gone).

    A starting (or taking-over) owner holds the lock a moment before it advertises.
    """
    for _ in range(200):
        if ownership.try_acquire():
            return None
        owner = ownership.read()
        if owner is not None and process_is_running(owner.pid):
            return owner
        await asyncio.sleep(0.05)
    return ownership.read()


def _stdio_session(hub: Hub, channel: StdioChannel, options: ServeOptions) -> Session:
    """The in-process session of the stdio client: the hub's, or one instance's with --instance."""
    return Session(hub, secrets.token_hex(16), channel.write, instance=options.instance)


async def _take_over_or_fail(
    channel: StdioChannel,
    options: ServeOptions,
    ownership: Ownership,
    stop: asyncio.Event,
    tasks: set[asyncio.Task[Any]],
) -> int:
    if not ownership.try_acquire():
        raise FsmHubError(f"another fsm-hub holds {ownership.lock_path} but advertises no endpoint")
    owned = OwnedHub(options, ownership)
    hub = await owned.start()
    banner.owner(options, owned)
    hub.on_failure(lambda _: stop.set())
    code = await _serve_stdio(channel, owned, _stdio_session(hub, channel, options), stop, tasks)
    return _exit_code(hub) or code


def _advertised(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error("fsm-hub: the endpoint for attaching processes did not start: %s", error)


def _exit_code(hub: Hub) -> int:
    """0, unless the hub stopped because its log became unwritable: then that is the error."""
    if hub.failure is not None:
        raise hub.failure  # the CLI prints it as one line on stderr and exits non-zero
    return 0
