"""One client's own upstream MCP session with one instance: nothing instance-side crosses clients.

A downstream session opens one `ClientUpstream` per instance it talks to (bound, through
``instances_call``, or on a per-instance endpoint). It is initialized with that client's
declared capabilities and a ``clientInfo`` naming the hub and the client, made lazily on the
first routed request (a bind that never calls costs no handshake), and DELETEd when the binding
or the session ends, or when the instance leaves ``active`` (its session state died with it;
the next request makes a new one). The supervisor keeps its own client for health and tools.

What the client set up in its session — resource subscriptions and its log level — is kept
(`KeptState`) and replayed into the new session after the instance restarts, so a subscribed
client keeps receiving `notifications/resources/updated` without asking again.

Transport-agnostic: the client comes from `Hub.client_for`, which returns anything with the
`InstanceClient` interface (an HTTP `McpClient` today, a stdio client tomorrow).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from fsm_hub.errors import McpError, TransportError
from fsm_hub.supervision.hub import Hub
from fsm_hub.supervision.supervisor import InstanceClient, OnMessage, backoff_delay

log = logging.getLogger(__name__)

LISTEN_BACKOFF_CAP: Final = 5.0
"""Longest pause (seconds) before the GET stream is reopened while the instance is active."""


@dataclass(slots=True)
class KeptState:
    """What one client set up in its session with one instance: replayed into the next session."""

    subscriptions: dict[str, None] = field(default_factory=dict)
    """URIs subscribed (`resources/subscribe` that succeeded, not unsubscribed), in order."""
    level: str | None = None
    """The last `logging/setLevel` that succeeded."""

    def __bool__(self) -> bool:
        return bool(self.subscriptions) or self.level is not None

    def record(self, method: str, params: dict[str, Any]) -> None:
        """A request that succeeded: keep what it set up."""
        if method == "resources/subscribe" and isinstance(params.get("uri"), str):
            self.subscriptions[params["uri"]] = None
        elif method == "resources/unsubscribe" and isinstance(params.get("uri"), str):
            self.subscriptions.pop(params["uri"], None)
        elif method == "logging/setLevel" and isinstance(params.get("level"), str):
            self.level = params["level"]

    def requests(self) -> list[tuple[str, dict[str, Any]]]:
        """The requests that set it up again in a new session."""
        made: list[tuple[str, dict[str, Any]]] = []
        if self.level is not None:
            made.append(("logging/setLevel", {"level": self.level}))
        made += [("resources/subscribe", {"uri": uri}) for uri in self.subscriptions]
        return made


KEPT_METHODS: Final = frozenset({"resources/subscribe", "resources/unsubscribe", "logging/setLevel"})


class ClientUpstream:
    """One downstream session × one instance → one upstream client, opened once, closed once."""

    def __init__(
        self,
        hub: Hub,
        instance_id: str,
        *,
        capabilities: dict[str, Any],
        client_info: dict[str, Any],
        on_message: OnMessage,
        on_lost: Callable[[ClientUpstream], None] = lambda _: None,
        kept: KeptState | None = None,
    ) -> None:
        self.hub = hub
        self.instance_id = instance_id
        self.capabilities = capabilities
        self.client_info = client_info
        self.on_message = on_message
        """Receives what the instance sends outside any request (its GET stream)."""
        self._on_lost = on_lost
        self.kept = kept if kept is not None else KeptState()
        """This client's subscriptions and level, shared with the session's next upstream."""
        self._opening: asyncio.Future[InstanceClient] | None = None
        self._client: InstanceClient | None = None
        self._listener: asyncio.Task[None] | None = None
        self.handshakes = 0
        """Upstream ``initialize`` exchanges made (the bench checks a bind costs at most one)."""
        self.closed = False
        self.initialize_result: dict[str, Any] = {}

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("open" if self._client is not None else "unopened")
        session = getattr(self._client, "session_id", None)
        return f"<ClientUpstream {self.instance_id} {state} session={session} handshakes={self.handshakes}>"

    @property
    def session_id(self) -> str | None:
        return self._client.session_id if self._client is not None else None

    async def client(self) -> InstanceClient:
        """The open upstream client, making it (one handshake, however many callers) if needed."""
        if self._client is not None:
            return self._client
        if self.closed:
            raise TransportError(f"the session with instance {self.instance_id} is closed")
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, future: asyncio.Future[InstanceClient]) -> None:
        self._opening = None
        if not future.cancelled():
            future.exception()  # each waiter got it through shield

    async def _open(self) -> InstanceClient:
        client: InstanceClient = self.hub.client_for(
            self.instance_id,
            capabilities=self.capabilities,
            client_info=self.client_info,
            on_message=self.on_message,
        )
        try:
            self.handshakes += 1
            self.initialize_result = await client.initialize()
        except BaseException:
            await _close_quietly(client)
            raise
        if self.closed:  # closed while the handshake ran: leave no session behind
            await _close_quietly(client)
            raise TransportError(f"the session with instance {self.instance_id} is closed")
        await self._replay(client)
        self._client = client
        # A fresh context: the stream must not inherit the request (and its response stream)
        # that happened to open this session.
        self._listener = asyncio.create_task(
            self._listen(client), name=f"listen {self.instance_id}", context=contextvars.Context()
        )
        return client

    async def _replay(self, client: InstanceClient) -> None:
        """Set up again what the client had set up in its previous session with the instance.

        One that the new session refuses (the resource is gone, say) is forgotten: the client
        would get that answer asking now.
        """
        for method, params in self.kept.requests():
            try:
                await client.request(method, params, timeout=self.hub.timing.connect_timeout)
            except (McpError, TransportError) as exc:
                log.info("%s: %s %s not set up again: %s", self.instance_id, method, params, exc)
                if method == "resources/subscribe":
                    self.kept.subscriptions.pop(params["uri"], None)
                else:
                    self.kept.level = None

    async def request(
        self, method: str, params: dict[str, Any], *, timeout: float, on_message: OnMessage
    ) -> Any:
        """The instance's ``result``; for ``tools/call`` any JSON value (the caller shapes it)."""
        client = await self.client()
        raw = getattr(client, "call", None) if method == "tools/call" else None
        if raw is not None:
            return await raw(method, params, timeout=timeout, on_message=on_message)
        result = await client.request(method, params, timeout=timeout, on_message=on_message)
        if method in KEPT_METHODS:
            self.kept.record(method, params)
        return result

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        if self._client is None:
            return  # no upstream session yet: nothing there to tell
        await self._client.notify(method, params)

    async def respond(self, request_id: Any, *, result: Any = None, error: Any = None) -> None:
        """Answer a request the instance sent (sampling, elicitation, roots...) with its own id."""
        client = self._client
        if client is None:
            return  # the session that asked is gone; so is the question
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id}
        if error is not None:
            message["error"] = error
        else:
            message["result"] = result if result is not None else {}
        respond = getattr(client, "respond", None)
        if respond is None:
            log.debug("client of %s cannot answer server requests", self.instance_id)
            return
        await respond(message)

    async def _listen(self, client: InstanceClient) -> None:
        """Follow the GET stream while the instance is active; reopen it with backoff."""
        rng = random.Random()
        timing = self.hub.timing
        failures = 0
        while not self.closed and self.hub.state(self.instance_id) == "active":
            task = client.listen(self.on_message)
            try:
                await asyncio.shield(task)
                if not getattr(client, "listen_offered", True):
                    return  # 405: the server offers no such stream
                failures = 1  # it was open and the server ended it: come back soon
            except asyncio.CancelledError:
                task.cancel()
                raise
            except McpError:
                return
            except TransportError as exc:
                failures += 1
                if "HTTP 404" in str(exc):
                    self._on_lost(self)  # our session is gone upstream: the next call makes one
                    return
            delay = min(LISTEN_BACKOFF_CAP, backoff_delay(failures, timing, rng) + 0.05)
            await self.hub.sleep(delay)

    async def close(self) -> None:
        """DELETE the upstream session (best effort); later requests fail."""
        if self.closed:
            return
        self.closed = True
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        opening = self._opening
        if opening is not None:
            await asyncio.gather(opening, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await _close_quietly(client)


async def _close_quietly(client: InstanceClient) -> None:
    try:
        await client.close()
    except Exception as exc:  # a server that is gone needs no DELETE
        log.debug("closing an upstream session failed: %s", exc)
