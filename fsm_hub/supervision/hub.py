"""The live hub: discovery feeds supervisors, supervisors drive machines, the store feeds the fold.

Data flows one way: discovery → supervisor → machine → store → fold → MCP / CLI. The hub's own
view is the same fold the CLI runs, kept current by subscribing to committed batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fsm_hub import __version__
from fsm_hub.core.events import HUB_STREAM, EventType, StoredEvent
from fsm_hub.core.view import Fold, InstanceView, View, resolve
from fsm_hub.discovery.config import (
    ConfigChange,
    ConfiguredServers,
    ServerChanged,
    ServerFound,
    ServerSpec,
    is_configured_id,
)
from fsm_hub.discovery.directory import (
    Announcement,
    Change,
    Changed,
    Discovery,
    Found,
    Gone,
    Updated,
    process_is_running,
)
from fsm_hub.errors import InstanceUnavailable, LogUnwritable, StoreError, TransportError
from fsm_hub.store.recorder import recorded_machine
from fsm_hub.store.snapshots import SNAPSHOT_EVERY
from fsm_hub.store.sqlite import EventStore
from fsm_hub.supervision.payloads import announced, config_changed, configured_payload, evidence, what_changed
from fsm_hub.supervision.supervisor import (
    DEFAULT_TIMING,
    CheckNow,
    Connector,
    Rediscover,
    RefreshTools,
    Remove,
    Sleep,
    Supervisor,
    Timing,
    backoff_delay,
    timer,
)

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

STOP_GRACE = 1.0
"""Seconds a stopping stdio server gets after stdin closes, then after SIGTERM, before SIGKILL:
short enough that the hub's own stop (a client gives it a few seconds) ends every child."""

DEFAULT_START_LIMIT = max(4, 2 * (os.cpu_count() or 1))
"""Configured stdio servers starting (spawn + handshake) at once; the others wait for a slot
before their start timeout (`Timing.start_timeout`) runs. Measured in
tools/bench_configured.py: see the README."""

InstanceListener = Callable[[str], None]
DISCOVERY_CHUNK = 100
"""New instances recorded per group commit before the hub lets other tasks run."""


class Hub:
    """Owns the supervisors of every instance and the live view folded from the log."""

    def __init__(
        self,
        store: EventStore,
        discovery: Discovery,
        *,
        timing: Timing = DEFAULT_TIMING,
        sleep: Sleep = timer,
        connector: Connector | None = None,
        rng: random.Random | None = None,
        snapshot_every: int = SNAPSHOT_EVERY,
        configured: ConfiguredServers | None = None,
        start_limit: int = DEFAULT_START_LIMIT,
    ) -> None:
        self.store = store
        self.configured = configured
        """The config file's servers (None: no configured servers)."""
        self._specs: dict[str, ServerSpec] = {}
        self._starts = asyncio.Semaphore(start_limit)
        self._config_task: asyncio.Task[None] | None = None
        self.snapshot_every = snapshot_every
        self.discovery = discovery
        self.timing = timing
        self._sleep = sleep
        self._connector = connector
        self._rng = rng or random.Random()
        self._http: aiohttp.ClientSession | None = None
        self._fold = Fold()
        self._snapshot_seq = 0
        self.started_from = (0, 0)
        """(seq of the snapshot start-up folded from, events folded after it)."""
        self._view: View | None = None
        self._supervisors: dict[str, Supervisor] = {}
        self._listeners: list[InstanceListener] = []
        self._discovery_task: asyncio.Task[None] | None = None
        self._missing_checked = False
        self.discovered = asyncio.Event()
        """Set once the first look at the instances directory has been reconciled with the log."""
        self._frozen = False
        self._stopping = False
        self._restarts: set[asyncio.Task[None]] = set()
        self._restart_counts: dict[str, int] = {}
        self._failure_listeners: list[Callable[[LogUnwritable], None]] = []
        self.failure: LogUnwritable | None = None
        """Set once the log refused a transition for good: the hub must stop serving."""
        self._started = time.monotonic()
        self.open_sessions: set[str] = set()
        """Ids of the MCP sessions connected to this hub now, bound to an instance or not."""

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, *, wait_for_discovery: bool = True) -> None:
        """Fold the log, record `hub_started`, bring live instances back, reconcile with files.

        With `wait_for_discovery=False` the first look at the directory (thousands of files can
        take seconds) goes on in the background and `discovered` tells when it is done: a
        server answers its clients meanwhile.
        """
        self._started = time.monotonic()
        if self._connector is None:
            self._connector = self._default_connector
        folded = await self.store.load_fold()
        self._fold = folded.fold
        self.started_from = (folded.snapshot_seq, folded.tail)
        # A snapshot that had to be ignored is rebuilt at the first commit.
        self._snapshot_seq = -self.snapshot_every if folded.ignored else folded.snapshot_seq
        self.store.subscribe(self._committed)
        await self.store.append(
            HUB_STREAM,
            EventType.HUB_STARTED,
            {
                "pid": os.getpid(),
                "version": __version__,
                "instances_dir": str(self.discovery.directory),
                "config": str(self.configured.path) if self.configured else None,
            },
        )
        await self._end_orphans()
        config_changes = self.configured.changes() if self.configured is not None else None
        first_config: list[ConfigChange] = []
        if config_changes is not None:
            first_config = await anext(config_changes)
            self._specs.update({c.server.id: c.server for c in first_config if isinstance(c, ServerFound)})
        for instance in self.view.instances.values():
            if instance.state != "dead" and (not is_configured_id(instance.id) or instance.id in self._specs):
                supervisor = await self._supervise(instance)
                await supervisor.deliver(Rediscover(instance.url or "", "hub restart"))
        # Configured servers do not wait for the instances directory's first look.
        await self._apply_config(first_config, initial=True)
        for instance_id in self._specs:
            configured = self._supervisors.get(instance_id)
            if configured is not None and not configured.running:
                self._start(configured)
        if config_changes is not None:
            self._config_task = asyncio.create_task(
                self._follow_config(config_changes), name="fsm-hub-config"
            )
        changes = self.discovery.changes()
        if wait_for_discovery:
            await self._discover_first(changes)
        self._discovery_task = asyncio.create_task(
            self._follow(changes, first=not wait_for_discovery), name="fsm-hub-discovery"
        )

    async def _discover_first(self, changes: AsyncIterator[Sequence[Change]]) -> None:
        first = await anext(changes)
        await self._reconcile(first, initial=True)
        for supervisor in self._supervisors.values():
            if not supervisor.running:
                self._start(supervisor)
        self._freeze_long_lived()
        self.discovered.set()

    async def settle(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until no instance is still discovered or connecting.

        A process taking over from a dead owner uses it so that its client's next call finds the
        instances reconnected instead of failing fast while they are.
        """
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.discovered.wait(), timeout)
        while time.monotonic() < deadline:
            if not any(s.state in ("discovered", "connecting") for s in self._supervisors.values()):
                return
            await asyncio.sleep(0.01)

    async def stop(self, reason: str = "stopped") -> None:
        """Cancel everything and record `hub_stopped` — and nothing else: no instance dies."""
        self._stopping = True
        for restart in self._restarts:
            restart.cancel()
        await asyncio.gather(*self._restarts, return_exceptions=True)
        for follower in (self._discovery_task, self._config_task):
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower
        await asyncio.gather(*(s.stop() for s in self._supervisors.values()))
        if self._http is not None:
            await self._http.close()
        if self._frozen:
            gc.unfreeze()  # what died meanwhile can be collected again
            self._frozen = False
        try:
            await self.store.append(HUB_STREAM, EventType.HUB_STOPPED, {"pid": os.getpid(), "reason": reason})
        except StoreError:
            if self.failure is None:
                raise
            return  # the log is what failed: stopping must not fail on it again
        self.store.save_snapshot(self._fold)  # written before the store closes

    def _freeze_long_lived(self) -> None:
        """Keep the cyclic collector off the supervisors' state machines.

        Each InstanceMachine holds some 340 GC-tracked objects for as long as the hub runs; with
        a thousand instances every full collection rescanned them all, which cost more CPU than
        the supervisors' own work (tools/bench_supervise.py). Frozen objects are still freed by
        reference counting; `stop` unfreezes.
        """
        gc.freeze()
        self._frozen = True

    def _default_connector(self, url: str) -> Any:
        from fsm_hub.mcp.upstream import McpClient

        return McpClient(url, session=self._http_session(), timeout=self.timing.call_timeout)

    def _http_session(self) -> aiohttp.ClientSession:
        """The HTTP clients' one connection pool, made when the first HTTP client is: a hub with
        only stdio servers (or none yet) never imports aiohttp before its first answer."""
        if self._http is None:
            import aiohttp

            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._http

    # -- discovery → supervisors ------------------------------------------------------------

    async def _follow(
        self, changes: AsyncIterator[Sequence[Found | Changed | Updated | Gone]], *, first: bool = False
    ) -> None:
        if first:
            try:
                await self._discover_first(changes)
            except Exception:
                log.exception("could not apply the first look at the instances directory")
                self.discovered.set()
        async for batch in changes:
            supervised = len(self._supervisors)
            try:
                await self._reconcile(batch, initial=False)
            except Exception:
                log.exception("could not apply discovery changes")
            if len(self._supervisors) > supervised:
                self._freeze_long_lived()

    async def _reconcile(self, batch: Sequence[Found | Changed | Updated | Gone], *, initial: bool) -> None:
        seen = await self._discover_new(batch, start=not initial)
        for change in batch:
            if isinstance(change, Gone):
                await self._gone(change.instance_id, change.reason)
            elif change.announcement.id in seen:
                continue
            else:
                seen.add(change.announcement.id)
                back = change.reason if isinstance(change, Found) else ""
                await self._announced(change.announcement, start=not initial, back=back)
        if not self._missing_checked and self.discovery.failure is None:
            await self._remove_missing()

    async def _remove_missing(self) -> None:
        """Remove what the log has alive but the first successful look did not find.

        Not while the directory cannot be read for a local reason (EMFILE, ...): that says
        nothing about the instances, so the check waits for the first look that succeeds.
        """
        self._missing_checked = True
        found = self.discovery.current.keys()
        for instance in list(self.view.instances.values()):
            if is_configured_id(instance.id):
                continue  # configured servers are the config's to keep or remove
            if instance.id not in found and instance.state != "dead":
                reason = self._why_missing(instance)
                await self._gone(instance.id, reason)
                if self.discovery.refused is not None:
                    self.discovery.withdraw(instance.id, reason)

    async def _discover_new(self, batch: Sequence[Change], *, start: bool) -> set[str]:
        """Record every instance the log has never seen in one group commit, then supervise them.

        Appending them one by one, each awaiting its own commit, made a directory of 1,000 files
        take seconds (tools/bench_discovery.py); the store commits whatever is queued together.
        """
        fresh = [
            change.announcement
            for change in batch
            if not isinstance(change, Gone) and self.instance(change.announcement.id) is None
        ]
        for first in range(0, len(fresh), DISCOVERY_CHUNK):
            chunk = fresh[first : first + DISCOVERY_CHUNK]
            await asyncio.gather(
                *(self.store.append(a.id, EventType.INSTANCE_DISCOVERED, self._payload(a)) for a in chunk)
            )
            for announcement in chunk:
                instance = self.instance(announcement.id)
                assert instance is not None
                supervisor = await self._supervise(instance)
                if start:
                    self._start(supervisor)
            await asyncio.sleep(0)  # a machine costs ~0.3 ms to build: let clients be answered
        return {a.id for a in fresh}

    # -- configured servers → supervisors ------------------------------------------------------

    async def _follow_config(self, changes: AsyncIterator[list[ConfigChange]]) -> None:
        async for batch in changes:
            supervised = len(self._supervisors)
            try:
                await self._apply_config(batch, initial=False)
            except LogUnwritable as exc:
                self._fail(exc)
                return
            except StoreError as exc:
                self._fail(LogUnwritable(str(exc)))
                return
            except Exception:
                log.exception("could not apply config changes")
            if len(self._supervisors) > supervised:
                self._freeze_long_lived()

    async def _apply_config(self, batch: Sequence[ConfigChange], *, initial: bool) -> None:
        for change in batch:
            if isinstance(change, Gone):
                self._specs.pop(change.instance_id, None)
                await self._gone(change.instance_id, change.reason)
            else:
                self._specs[change.server.id] = change.server
                await self._configured(change, start=not initial)
        if not initial:
            return
        assert self.configured is not None or not self._specs
        for instance in list(self.view.instances.values()):
            if is_configured_id(instance.id) and instance.id not in self._specs and instance.state != "dead":
                where = self.configured.path if self.configured is not None else "the config (none given)"
                supervisor = self._supervisors.get(instance.id) or await self._supervise(instance)
                await supervisor.deliver(Remove(f"no longer in {where}"))

    async def _configured(self, change: ServerFound | ServerChanged, *, start: bool) -> None:
        spec = change.server
        data = configured_payload(spec)
        known = self._fold.instance(spec.id)
        if known is None:
            await self.store.append(spec.id, EventType.INSTANCE_DISCOVERED, data)
            instance = self._fold.instance(spec.id)
            assert instance is not None
            supervisor = await self._supervise(instance)
            if start:
                self._start(supervisor)
            return
        if isinstance(change, ServerChanged) or (known.name, known.kind, known.source, known.url) != (
            spec.name, spec.kind, spec.source, data["url"],
        ):
            await self.store.append(spec.id, EventType.INSTANCE_UPDATED, data)
        existing = self._supervisors.get(spec.id)
        if existing is None:  # dead, or removed earlier: back in the config
            supervisor = await self._supervise(known)
            if start:
                self._start(supervisor)
        else:
            supervisor = existing
            if not isinstance(change, ServerChanged) and supervisor.state != "dead":
                return  # brought back at start already
        reason = config_changed(change.previous, spec) if isinstance(change, ServerChanged) else (
            f"in {spec.source}"
        )
        await supervisor.deliver(Rediscover(spec.url or "", reason))

    def _configured_client(self, instance_id: str) -> Any:
        """A client for the configured server's current settings (read at each connect)."""
        from fsm_hub.mcp.stdio_upstream import StdioClient
        from fsm_hub.mcp.upstream import McpClient

        spec = self._specs.get(instance_id)
        if spec is None:
            raise TransportError(f"{instance_id} is no longer configured")
        if spec.kind == "http":
            assert spec.url is not None
            return McpClient(
                spec.url,
                session=self._http_session(),
                timeout=self.timing.call_timeout,
                headers=spec.headers.reveal(),
            )
        assert spec.command is not None

        async def spawned(pid: int, identity: str | None) -> None:
            data = {"pid": pid, "identity": identity}
            await self.store.append(instance_id, EventType.PROCESS_SPAWNED, data)

        return StdioClient(
            spec.command,
            spec.args,
            env=spec.env.reveal(),
            cwd=spec.cwd,
            name=spec.name,
            timeout=self.timing.call_timeout,
            grace=STOP_GRACE,
            on_spawn=spawned,
        )

    async def _end_orphans(self) -> None:
        """End the children an earlier hub spawned and never stopped (it was SIGKILLed), and record it."""
        from fsm_hub.mcp.stdio_upstream import end_orphan

        async def one(instance: InstanceView) -> None:
            assert instance.child is not None
            pid, identity = instance.child
            if await end_orphan(pid, identity):
                log.warning("ended %s's server process %d, left running by an earlier hub", instance.id, pid)
                await self.store.append(
                    instance.id,
                    EventType.ORPHAN_ENDED,
                    {"pid": pid, "reason": "left running by an earlier hub; ended"},
                )

        await asyncio.gather(*(one(i) for i in self.view.instances.values() if i.child is not None))

    # -- announcements → supervisors ---------------------------------------------------------------

    async def _announced(self, announcement: Announcement, *, start: bool, back: str = "") -> None:
        """`back`: why discovery, having withdrawn it (a refused directory), offers it again."""
        known = self.instance(announcement.id)
        data = self._payload(announcement)
        if known is None:
            await self.store.append(announcement.id, EventType.INSTANCE_DISCOVERED, data)
            instance = self.instance(announcement.id)
            assert instance is not None
            supervisor = await self._supervise(instance)
            if start:
                self._start(supervisor)
            return
        if (known.name, known.directory, evidence(known)) != (
            announcement.name,
            announcement.directory,
            announcement.evidence(),
        ):
            changed = {k: v for k, v in data.items() if getattr(known, k) != v}  # fold keeps the rest
            await self.store.append(announcement.id, EventType.INSTANCE_UPDATED, changed)
        existing = self._supervisors.get(announcement.id)
        if evidence(known) == announcement.evidence():
            if back and existing is not None:  # removed for the refusal: unchanged, so back again
                await existing.deliver(Rediscover(announcement.url, back))
            return
        if existing is None:  # a dead instance from an earlier run, back with new evidence
            supervisor = await self._supervise(known)
            if start:
                self._start(supervisor)
        else:
            supervisor = existing
        await supervisor.deliver(Rediscover(announcement.url, what_changed(known, announcement)))

    def _payload(self, announcement: Announcement) -> dict[str, Any]:
        return {**announced(announcement), "source": str(self.discovery.directory)}

    def _why_missing(self, instance: InstanceView) -> str:
        """Why an instance the log knows is not among the announcements found at start."""
        if self.discovery.refused is not None:
            return f"instances directory refused: {self.discovery.refused}"
        if not (self.discovery.directory / f"{instance.id}.json").exists():
            return "instance file gone while the hub was stopped"
        if instance.pid is not None and not process_is_running(instance.pid):
            return f"process {instance.pid} is gone"
        return "instance file no longer usable"  # refused or unreadable; discovery said why

    async def _gone(self, instance_id: str, reason: str) -> None:
        supervisor = self._supervisors.get(instance_id)
        if supervisor is None:
            return  # dead already and never supervised in this run: nothing to remove
        await supervisor.deliver(Remove(reason))

    async def _supervise(self, instance: InstanceView) -> Supervisor:
        machine = await recorded_machine(
            self.store,
            instance.id,
            state=instance.state,
            attempt=instance.retry_count,
            max_attempts=self.timing.retry_attempts,
        )
        assert self._connector is not None
        connector: Connector = self._connector
        if is_configured_id(instance.id):
            def connector(_: str, instance_id: str = instance.id) -> Any:
                return self._configured_client(instance_id)
        spec = self._specs.get(instance.id)
        stdio = spec is not None and spec.kind == "stdio"
        supervisor = Supervisor(
            instance.id,
            instance.url or "",
            machine,
            connector=connector,
            timing=replace(self.timing, connect_timeout=self.timing.start_timeout) if stdio else self.timing,
            sleep=self._sleep,
            rng=self._rng,
            on_change=self._changed,
            admission=self._starts if stdio else None,
        )
        supervisor.last_error = instance.last_error
        self._supervisors[instance.id] = supervisor
        return supervisor

    # -- supervisors that fail ------------------------------------------------------------------

    def _start(self, supervisor: Supervisor) -> None:
        task = supervisor.start()
        task.add_done_callback(lambda done: self._ended(supervisor, done))

    def _ended(self, supervisor: Supervisor, task: asyncio.Task[None]) -> None:
        """A supervisor's loop never returns: if it ended with an error, nobody may miss it."""
        if task.cancelled() or self._stopping:
            return
        error = task.exception()
        if error is None or self._supervisors.get(supervisor.instance_id) is not supervisor:
            return
        if isinstance(error, LogUnwritable):
            self._fail(error)
            return
        restart = asyncio.create_task(
            self._restart(supervisor, error), name=f"restart-{supervisor.instance_id}"
        )
        self._restarts.add(restart)
        restart.add_done_callback(self._restarts.discard)

    async def _restart(self, failed: Supervisor, error: BaseException) -> None:
        """Record the failure on the hub stream, then supervise the instance again from the fold.

        Commit-then-change keeps the folded state equal to the failed machine's, so the new
        supervisor carries on where the old one stopped. Repeated failures back off.
        """
        instance_id = failed.instance_id
        count = self._restart_counts[instance_id] = self._restart_counts.get(instance_id, 0) + 1
        described = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        log.error("supervisor of %s failed (%s); restarting it", instance_id, described)
        try:
            await self.store.append(
                HUB_STREAM,
                EventType.SUPERVISOR_FAILED,
                {"instance": instance_id, "error": described, "restart": count},
            )
        except StoreError as exc:
            self._fail(LogUnwritable(str(exc)))
            return
        await failed.stop()
        if count > 1:
            await self._sleep(backoff_delay(count - 1, self.timing, self._rng))
        instance = self._fold.instance(instance_id)
        if instance is None or self._stopping:
            return
        supervisor = await self._supervise(instance)
        if instance.state != "dead":
            # Whatever session the failed loop held is closed: connect afresh, as on a restart.
            await supervisor.deliver(Rediscover(instance.url or "", "supervisor restarted"))
        self._start(supervisor)
        self._changed(supervisor)

    def on_failure(self, listener: Callable[[LogUnwritable], None]) -> None:
        """Call `listener` once if the log becomes unwritable (the hub must then stop)."""
        self._failure_listeners.append(listener)
        if self.failure is not None:
            listener(self.failure)

    def _fail(self, error: LogUnwritable) -> None:
        if self.failure is not None:
            return
        self.failure = error
        for listener in self._failure_listeners:
            listener(error)

    # -- the view ---------------------------------------------------------------------------

    def _committed(self, events: Sequence[StoredEvent]) -> None:
        fold = self._fold
        fold.apply(events)
        self._view = None
        if fold.last_seq - self._snapshot_seq >= self.snapshot_every:
            self.store.save_snapshot(fold)
            self._snapshot_seq = fold.last_seq

    @property
    def view(self) -> View:
        if self._view is None:
            self._view = self._fold.view()
        return self._view

    def on_instance_change(self, listener: InstanceListener) -> None:
        """Call `listener(instance_id)` whenever an instance's state or tools change."""
        self._listeners.append(listener)

    def forget_listener(self, listener: InstanceListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _changed(self, supervisor: Supervisor) -> None:
        for listener in self._listeners:
            listener(supervisor.instance_id)

    # -- what sessions use ------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        view = self.view
        return resolve(ref, view.instances.keys(), {i.id: i.name for i in view.instances.values()})

    def instance(self, instance_id: str) -> InstanceView | None:
        return self._fold.instance(instance_id)

    def state(self, instance_id: str) -> str:
        supervisor = self._supervisors.get(instance_id)
        if supervisor is not None:
            return supervisor.state
        instance = self.instance(instance_id)
        return instance.state if instance else "unknown"

    def tools(self, instance_id: str) -> list[dict[str, Any]] | None:
        """The instance's cached tool list while it is active, else None."""
        supervisor = self._supervisors.get(instance_id)
        if supervisor is None or supervisor.state != "active":
            return None
        return supervisor.tools

    def unavailable(self, instance_id: str) -> InstanceUnavailable:
        instance = self.instance(instance_id)
        supervisor = self._supervisors.get(instance_id)
        last_error = supervisor.last_error if supervisor else (instance.last_error if instance else None)
        if supervisor is not None:
            attempt = int(supervisor.machine.model.attempt)
        else:
            attempt = instance.retry_count if instance else 0
        return InstanceUnavailable(instance_id, self.state(instance_id), last_error, attempt)

    # -- per-client upstream sessions (mcp.client_upstream) ---------------------------------

    def client_for(
        self,
        instance_id: str,
        *,
        capabilities: dict[str, Any],
        client_info: dict[str, Any],
        on_message: Callable[[dict[str, Any]], Any],
    ) -> Any:
        """A new, unopened client of the instance's current URL for one downstream client.

        The supervisor's own client stays its own (health, tool cache). A stdio instance gives a
        session over its one process (`StdioSessions`), with the same interface.
        """
        supervisor = self._supervisors.get(instance_id)
        if supervisor is None or supervisor.state != "active":
            raise self.unavailable(instance_id)
        from fsm_hub.mcp.stdio_sessions import StdioSessions
        from fsm_hub.mcp.stdio_upstream import StdioClient
        from fsm_hub.mcp.upstream import McpClient

        spec = self._specs.get(instance_id)
        if spec is not None and spec.kind != "http":
            shared = supervisor.client
            if not isinstance(shared, StdioClient):
                raise self.unavailable(instance_id)
            handshake = {"protocolVersion": shared.protocol_version, **self.handshake(instance_id)}
            return StdioSessions.of(shared).open(handshake)
        return McpClient(
            spec.url if spec is not None and spec.url else supervisor.url,
            session=self._http_session(),
            timeout=self.timing.call_timeout,
            client_info=client_info,
            capabilities=capabilities,
            on_message=on_message,
            headers=spec.headers.reveal() if spec is not None else None,
        )

    def handshake(self, instance_id: str) -> dict[str, Any]:
        """What the instance said in the supervisor's handshake: capabilities, serverInfo, instructions."""
        supervisor = self._supervisors.get(instance_id)
        client = supervisor.client if supervisor is not None else None
        if client is None:
            return {}
        return {
            "capabilities": getattr(client, "capabilities", {}),
            "serverInfo": getattr(client, "server_info", {}),
            "instructions": getattr(client, "instructions", None),
        }

    def sleep(self, seconds: float) -> Any:
        """The injected sleeper, for timers of the layers above (GET stream backoff)."""
        return self._sleep(seconds)

    def instance_failed(self, instance_id: str) -> None:
        """A client's own session hit a transport error: have the supervisor ping now."""
        supervisor = self._supervisors.get(instance_id)
        if supervisor is not None and supervisor.running:
            supervisor.send(CheckNow())

    def instance_tools_changed(self, instance_id: str) -> None:
        """A client's own session saw tools/list_changed: refresh the shared tool cache."""
        supervisor = self._supervisors.get(instance_id)
        if supervisor is not None and supervisor.running:
            supervisor.send(RefreshTools())

    async def request(
        self,
        instance_id: str,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        on_message: Callable[[dict[str, Any]], Any] | None = None,
    ) -> dict[str, Any]:
        supervisor = self._supervisors.get(instance_id)
        if supervisor is None:
            raise self.unavailable(instance_id)
        return await supervisor.request(method, params, on_message=on_message)

    async def notify(self, instance_id: str, method: str, params: dict[str, Any] | None = None) -> None:
        supervisor = self._supervisors.get(instance_id)
        if supervisor is None:
            raise self.unavailable(instance_id)
        await supervisor.notify(method, params)

    async def history(self, ref: str, limit: int | None = None) -> list[StoredEvent]:
        stream = HUB_STREAM if ref == HUB_STREAM else self.resolve(ref)
        return await self.store.read(stream=stream, last=limit)

    async def session_connected(self, session_id: str, instance_id: str) -> None:
        await self.store.append(instance_id, EventType.SESSION_CONNECTED, {"session_id": session_id})

    async def session_disconnected(self, session_id: str, instance_id: str, reason: str) -> None:
        await self.store.append(
            instance_id, EventType.SESSION_DISCONNECTED, {"session_id": session_id, "reason": reason}
        )

    def status(self) -> dict[str, Any]:
        view = self.view
        return {
            "states": view.count_by_state(),
            "instances": len(view.instances),
            "sessions": len(view.sessions),
            "clients": len(self.open_sessions),
            "db": str(self.store.path),
            "events": self.store.last_seq,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "instances_dir": str(self.discovery.directory),
            "instances_dir_refused": self.discovery.refused,
            "discovering": not self.discovered.is_set(),
            "config": str(self.configured.path) if self.configured is not None else None,
            "config_problem": self.configured.problem if self.configured is not None else None,
            "version": __version__,
        }
