"""The hub's MCP server side: one `Session` per client, whatever the transport.

A session negotiates the protocol, offers the hub tools, and — once bound to an instance with
`instances_connect` — forwards tools, resources and prompts to it. Forwarded payloads are passed
through untouched: the hot path parses each message once and validates nothing it merely relays.

Each instance the session talks to gets the client's own upstream session (`ClientUpstream`):
what the instance sends — notifications on any stream, and requests such as sampling,
elicitation and roots — reaches this client and no other; the client's answers go back upstream
under the instance's own request ids. A session made with ``instance=`` is a per-instance
endpoint: transparent, that instance only, no hub tools, nothing renamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from fsm_hub import __version__
from fsm_hub.errors import FsmHubError, InstanceUnavailable, McpError, TransportError
from fsm_hub.mcp.client_upstream import ClientUpstream, KeptState
from fsm_hub.mcp.hub_tools import HUB_TOOL_NAMES, HubTools, ToolFailure, tool_error
from fsm_hub.mcp.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    RpcError,
    error_response,
    valid_id,
)
from fsm_hub.mcp.protocol import (
    PROTOCOL_VERSIONS,
    REQUESTS_BEFORE_INITIALIZE,
    SERVER_CAPABILITIES,
    SERVER_INFO,
    as_call_tool_result,
    negotiate,
)
from fsm_hub.mcp.tool_names import NamedTools, name_tools
from fsm_hub.supervision.hub import Hub

log = logging.getLogger(__name__)

__all__ = ["PROTOCOL_VERSIONS", "RpcError", "Session", "request_emit"]

METHODS = frozenset(
    {
        "initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/read",
        "resources/templates/list", "resources/subscribe", "resources/unsubscribe",
        "prompts/list", "prompts/get", "completion/complete", "logging/setLevel",
        "tasks/get", "tasks/result", "tasks/list", "tasks/cancel",
    }
)  # fmt: skip
"""The requests a session answers; anything else (`server/discover` included) gets -32601."""

HUB_MODE_CAPABILITIES: dict[str, Any] = {
    **SERVER_CAPABILITIES,
    "resources": {**SERVER_CAPABILITIES["resources"], "subscribe": True},
    "logging": {},
    "completions": {},
}
"""Fixed at `initialize`, before any binding: what any bound instance may offer is declared, and
answered with the instance's own error (or `{}` for `logging/setLevel`) where it lacks it."""

TASK_METHODS = frozenset({"tasks/get", "tasks/result", "tasks/list", "tasks/cancel"})

CLIENT_CAPABILITY_OF = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}
"""Server→client requests a client can only answer if it declared the capability."""
FORWARDED_EVERYWHERE = frozenset({"notifications/progress", "notifications/message"})
"""Instance notifications that concern a request of this client, bound or not."""
GRACE_STATES = frozenset({"retrying", "connecting", "discovered"})
"""States in which a bound instance's last known tools stay listed (a short restart)."""

PAGE_SIZE = 200
_NO_TOOLS = NamedTools([])
Emit = Callable[[dict[str, Any]], None]

request_emit: ContextVar[Emit | None] = ContextVar("request_emit", default=None)
"""Where notifications about the request being handled go (an HTTP response stream), if not
to the session's own channel."""


class Session:
    """One MCP client of the hub. `emit` sends server-initiated messages to that client."""

    def __init__(self, hub: Hub, session_id: str, emit: Emit, *, instance: str | None = None) -> None:
        self.hub = hub
        self.id = session_id
        self.emit = emit
        self.protocol_version: str | None = None
        self.client_info: dict[str, Any] = {}
        self.client_capabilities: dict[str, Any] = {}
        """What the client declared in `initialize`; its upstream sessions declare the same."""
        self.bound: str | None = None
        """The instance this session is connected to; stays bound while it is not active."""
        self.instance_ref = instance
        """Set on a per-instance endpoint: the id or name of its one instance."""
        self._upstreams: dict[str, ClientUpstream] = {}
        """This client's own upstream session with each instance it talks to."""
        self._kept: dict[str, KeptState] = {}
        """Per instance: this client's subscriptions and level, outliving an upstream session
        that ended with its instance (replayed into the next one)."""
        self._server_requests: dict[str, tuple[ClientUpstream, Any]] = {}
        """Hub id of a relayed instance request → (the upstream that asked, its own id)."""
        self._next_server_request = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._own_tools: tuple[object, list[dict[str, Any]]] | None = None
        """(the supervisor's list it was fetched beside, the bound instance's tools as this
        client's own session lists them): servers offer some tools only to clients with
        sampling, elicitation or roots, which the supervisor's session does not declare."""
        self._grace_tools: list[dict[str, Any]] | None = None
        """The bound instance's last known tools, listed while it is retrying."""
        self._inflight: dict[Any, asyncio.Task[Any]] = {}
        self._routed: dict[asyncio.Task[Any], str] = {}
        """Tasks waiting for an instance's answer → that instance."""
        self._abandoned: set[asyncio.Task[Any]] = set()
        """Routed tasks cancelled because their instance left active (not by the client)."""
        self._listed_tools: object = object()
        """The instance tool list the client was last told about (compared by identity)."""
        self._tools = HubTools(self)
        self._named: tuple[list[dict[str, Any]], NamedTools] | None = None
        hub.on_instance_change(self._instance_changed)
        hub.open_sessions.add(session_id)
        self.closed = False

    # -- entry point ----------------------------------------------------------------------

    async def handle(self, message: Any) -> dict[str, Any] | list[dict[str, Any]] | None:
        """Answer one decoded JSON-RPC message (or batch); None when nothing is to be answered."""
        if isinstance(message, list):
            if not message:
                return error_response(None, INVALID_REQUEST, "Invalid Request: empty batch")
            answers = await asyncio.gather(*(self.handle_one(m) for m in message))
            replies = [a for a in answers if a is not None]
            return replies or None
        return await self.handle_one(message)

    async def handle_one(self, message: Any) -> dict[str, Any] | None:
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            request_id = message.get("id") if isinstance(message, dict) else None
            return error_response(
                request_id if valid_id(request_id) else None,
                INVALID_REQUEST,
                "Invalid Request: not a JSON-RPC 2.0 message",
            )
        method = message.get("method")
        has_id = "id" in message
        request_id = message.get("id")
        if method is None and has_id and ("result" in message or "error" in message):
            self._answered(message)  # a client's answer to a request an instance sent
            return None
        if not isinstance(method, str) or (has_id and not valid_id(request_id)):
            return error_response(
                request_id if valid_id(request_id) else None,
                INVALID_REQUEST,
                "Invalid Request: method must be a string and id a string or integer",
            )
        params = message.get("params")
        if params is not None and not isinstance(params, dict):
            if not has_id:
                return None
            return error_response(request_id, INVALID_PARAMS, "Invalid params: params must be an object")
        if not has_id:
            await self._notification(method, params or {})
            return None
        if (
            self.protocol_version is None
            and method not in REQUESTS_BEFORE_INITIALIZE
            and method in METHODS  # an unknown one (a `server/discover` probe) gets -32601
        ):
            return error_response(
                request_id, INVALID_REQUEST, f"Invalid Request: {method} before initialize"
            )
        task = asyncio.current_task()
        if task is not None:
            self._inflight[request_id] = task
        try:
            result = await self._request(method, params or {})
        except RpcError as exc:
            return error_response(request_id, exc.code, exc.message, exc.data)
        except McpError as exc:
            return error_response(request_id, exc.code, exc.message, exc.data)
        except InstanceUnavailable as exc:
            return error_response(request_id, INTERNAL_ERROR, str(exc))
        except TransportError as exc:
            return error_response(request_id, INTERNAL_ERROR, f"instance unreachable: {exc}")
        except asyncio.CancelledError:
            if self.closed or task is None:
                raise
            task.uncancel()  # the transport's task carries on (an HTTP handler answers 202)
            return None  # the client cancelled it: no response is sent
        except Exception as exc:
            # One line, never a traceback on the protocol's stderr; the client gets a clean error.
            log.error("fsm-hub: internal error answering %s: %s: %s", method, type(exc).__name__, exc)
            return error_response(request_id, INTERNAL_ERROR, f"Internal error: {type(exc).__name__}")
        finally:
            self._inflight.pop(request_id, None)
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    # -- methods ----------------------------------------------------------------------------

    async def _request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if self.instance_ref is not None:
            return await self._transparent(method, params)
        if method == "tools/call":
            return await self._call_tool(params)
        if method == "ping":
            return {}
        if method == "tools/list":
            await self._fetch_own_tools()
            return self._page(self.tool_list(), params, "tools")
        if method == "initialize":
            return self._initialize(params)
        if method in ("resources/list", "resources/templates/list", "prompts/list"):
            return await self._forward_list(method, params)
        if method in ("resources/read", "prompts/get", "completion/complete"):
            return await self._forward(method, params)
        if method in ("resources/subscribe", "resources/unsubscribe") or method in TASK_METHODS:
            return await self._forward(method, params)
        if method == "logging/setLevel":
            return await self._set_level(params)
        raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}")

    async def _set_level(self, params: dict[str, Any]) -> dict[str, Any]:
        """Forward to the bound instance; the hub itself has nothing to log to a client."""
        if self.bound is None or self.hub.state(self.bound) != "active":
            return {}
        try:
            return await self.route(self.bound, "logging/setLevel", params)
        except McpError as exc:
            if exc.code == METHOD_NOT_FOUND:
                return {}
            raise

    def _client_hello(self, params: dict[str, Any]) -> None:
        requested = params.get("protocolVersion")
        if not isinstance(requested, str):
            raise RpcError(INVALID_PARAMS, "Invalid params: protocolVersion must be a string")
        info = params.get("clientInfo")
        self.client_info = info if isinstance(info, dict) else {}
        capabilities = params.get("capabilities")
        self.client_capabilities = capabilities if isinstance(capabilities, dict) else {}
        self.protocol_version = negotiate(requested)

    def _initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        self._client_hello(params)
        return {
            "protocolVersion": self.protocol_version,
            "capabilities": HUB_MODE_CAPABILITIES,
            "serverInfo": SERVER_INFO,
            "instructions": (
                "fsm-hub routes you to local dev-server instances. Call instances_list to see "
                "them, instances_connect to use one's tools directly, or instances_call to call "
                "a tool of any active instance without switching."
            ),
        }

    async def _notification(self, method: str, params: dict[str, Any]) -> None:
        if method == "notifications/cancelled":
            request_id = params.get("requestId")
            if not valid_id(request_id):
                return  # a notification gets no error: an id that cannot be ours is ignored
            task = self._inflight.get(request_id)
            if task is not None and task is not asyncio.current_task():
                task.cancel()  # the instance client forwards the cancellation upstream
        elif method == "notifications/roots/list_changed":
            for upstream in list(self._upstreams.values()):
                self._spawn(upstream.notify(method, params or None))
        # notifications/initialized, progress from the client: nothing to do

    # -- per-instance endpoint --------------------------------------------------------------

    async def _transparent(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """A per-instance endpoint: everything but `initialize` and `ping` goes to the instance."""
        if method == "ping":
            return {}
        if method == "initialize":
            return await self._initialize_transparent(params)
        instance_id = self._current_instance()
        if method == "tools/call":
            try:
                return await self.route(instance_id, method, params)
            except InstanceUnavailable as exc:
                return tool_error(str(exc))
            except TransportError as exc:
                return tool_error(f"instance {instance_id} did not answer: {exc}")
        return await self.route(instance_id, method, params)

    async def _initialize_transparent(self, params: dict[str, Any]) -> dict[str, Any]:
        assert self.instance_ref is not None
        try:
            instance_id = self.hub.resolve(self.instance_ref)
        except FsmHubError as exc:
            raise RpcError(INVALID_PARAMS, str(exc)) from None
        if self.hub.state(instance_id) != "active":
            raise self.hub.unavailable(instance_id)
        self._client_hello(params)
        await self.bind(instance_id, "per-instance endpoint")
        upstream = self._upstream(instance_id)
        try:
            await upstream.client()
        except TransportError:
            self.hub.instance_failed(instance_id)
            raise
        result = upstream.initialize_result
        capabilities = dict(result.get("capabilities") or {})
        if "tools" in capabilities:  # Claude Code refreshes only when it is advertised
            capabilities["tools"] = {**(capabilities.get("tools") or {}), "listChanged": True}
        answer: dict[str, Any] = {
            "protocolVersion": self.protocol_version,
            "capabilities": capabilities,
            "serverInfo": result.get("serverInfo") or SERVER_INFO,
        }
        if isinstance(result.get("instructions"), str):
            answer["instructions"] = result["instructions"]
        return answer

    def _current_instance(self) -> str:
        """The endpoint's instance; re-resolved by name while the one it had is not active."""
        bound = self.bound
        if bound is None:
            raise RpcError(INVALID_REQUEST, "Invalid Request: not initialized")
        if self.hub.state(bound) != "active" and self.instance_ref is not None:
            with contextlib.suppress(FsmHubError):
                again = self.hub.resolve(self.instance_ref)
                if again != bound and self.hub.state(again) == "active":
                    self.bound = again
                    return again
        return bound

    def _page(self, items: list[dict[str, Any]], params: dict[str, Any], key: str) -> dict[str, Any]:
        cursor = params.get("cursor")
        start = 0
        if cursor is not None:
            if not isinstance(cursor, str) or not cursor.isdigit() or int(cursor) > len(items):
                raise RpcError(INVALID_PARAMS, "Invalid params: unknown cursor")
            start = int(cursor)
        end = start + PAGE_SIZE
        page: dict[str, Any] = {key: items[start:end]}
        if end < len(items):
            page["nextCursor"] = str(end)
        return page

    def tool_list(self) -> list[dict[str, Any]]:
        return [*self._tools.definitions, *self._instance_tools().tools]

    def _bound_tools(self) -> list[dict[str, Any]] | None:
        """The bound instance's tools: live while active, the last known ones while retrying."""
        if self.bound is None:
            return None
        tools = self.hub.tools(self.bound)
        if tools is not None:
            own = self._own_tools
            if own is not None and own[0] is tools:
                tools = own[1]
            self._grace_tools = tools
            return tools
        if self.hub.state(self.bound) in GRACE_STATES:
            return self._grace_tools
        self._grace_tools = None
        return None

    async def _fetch_own_tools(self) -> None:
        """List the bound instance's tools over this client's own session, once per change.

        Only for a client that declared capabilities: for one that declared none, the
        supervisor's list (fetched without any) is the same, and costs nothing.
        """
        bound = self.bound
        if bound is None or not self.client_capabilities:
            return
        shared = self.hub.tools(bound)
        if shared is None or (self._own_tools is not None and self._own_tools[0] is shared):
            return
        try:
            client = await self._upstream(bound).client()
            tools = await client.list_tools()
        except (FsmHubError, McpError) as exc:
            log.debug("listing %s's tools for %s failed: %s", bound, self.id, exc)
            return  # the supervisor's list stands in
        if self.bound == bound:
            self._own_tools = (shared, tools)

    def _instance_tools(self) -> NamedTools:
        """The bound instance's tools under client-safe names (hub names win a clash)."""
        tools = self._bound_tools()
        if not tools:
            return _NO_TOOLS
        cached = self._named
        if cached is None or cached[0] is not tools:  # the supervisor swaps the list on refresh
            cached = self._named = (tools, name_tools(tools, HUB_TOOL_NAMES))
        return cached[1]

    async def _call_tool(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        if not isinstance(name, str):
            raise RpcError(INVALID_PARAMS, "Invalid params: tools/call needs a tool name")
        arguments = params.get("arguments")
        if arguments is not None and not isinstance(arguments, dict):
            raise RpcError(INVALID_PARAMS, "Invalid params: arguments must be an object")
        if name in HUB_TOOL_NAMES:
            try:
                return await self._tools.call(name, arguments or {})
            except ToolFailure as exc:
                return tool_error(str(exc))
        if self.bound is None:
            raise RpcError(
                INVALID_PARAMS,
                f"Unknown tool: {name} (connect to an instance with instances_connect first)",
            )
        original = self._instance_tools().originals.get(name)
        if original is not None:
            params = {**params, "name": original}
        instance_id = self.bound
        try:
            return await self.route(instance_id, "tools/call", params)
        except InstanceUnavailable as exc:
            return tool_error(str(exc))
        except TransportError as exc:
            return tool_error(f"instance {instance_id} did not answer: {exc}")

    async def _forward_list(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        key = method.split("/")[0] if method != "resources/templates/list" else "resourceTemplates"
        if self.bound is None or self.hub.tools(self.bound) is None:
            return {key: []}
        try:
            return await self.route(self.bound, method, params)
        except McpError as exc:
            if exc.code == METHOD_NOT_FOUND:
                return {key: []}
            raise

    async def _forward(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if self.bound is None:
            raise RpcError(INVALID_PARAMS, f"{method}: no instance connected (use instances_connect)")
        return await self.route(self.bound, method, params)

    async def route(self, instance_id: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Forward a request to an instance, relaying its notifications to this client.

        Raises InstanceUnavailable at once if the instance is not active — and also if it stops
        being active while the request waits: a wedged instance's answer would otherwise be
        awaited for the whole call timeout after the hub has declared it lost.
        """
        task = asyncio.current_task()
        assert task is not None
        self._routed[task] = instance_id
        try:
            if self.hub.state(instance_id) != "active":
                raise self.hub.unavailable(instance_id)
            upstream = self._upstream(instance_id)
            try:
                result = await upstream.request(
                    method,
                    params,
                    timeout=self.hub.timing.call_timeout,
                    on_message=functools.partial(self._relay, upstream, True),
                )
            except TransportError:
                self.hub.instance_failed(instance_id)
                raise
            if method == "tools/call":
                return as_call_tool_result(result)
            if not isinstance(result, dict):
                raise TransportError(f"instance {instance_id} answered {method} with a non-object")
            return result
        except asyncio.CancelledError:
            if task not in self._abandoned:
                raise
            task.uncancel()
            raise self.hub.unavailable(instance_id) from None
        finally:
            del self._routed[task]
            self._abandoned.discard(task)

    # -- this client's upstream sessions -----------------------------------------------------

    def _upstream(self, instance_id: str) -> ClientUpstream:
        upstream = self._upstreams.get(instance_id)
        if upstream is None or upstream.closed:
            name = str(self.client_info.get("name") or "client")
            upstream = ClientUpstream(
                self.hub,
                instance_id,
                capabilities=self.client_capabilities,
                client_info={
                    "name": f"fsm-hub/{name}",
                    "title": f"fsm-hub for {self.client_info.get('title') or name}",
                    "version": __version__,
                },
                on_message=lambda message: None,
                on_lost=self._upstream_lost,
                kept=self._kept.setdefault(instance_id, KeptState()),
            )
            upstream.on_message = functools.partial(self._relay, upstream, False)
            self._upstreams[instance_id] = upstream
        return upstream

    def _upstream_lost(self, upstream: ClientUpstream) -> None:
        """Its session is gone upstream (404): the kept state goes into a new one at once."""
        if self._upstreams.get(upstream.instance_id) is upstream:
            self._drop_upstream(upstream.instance_id)
        self._spawn(upstream.close())
        self._restore(upstream.instance_id)

    def _drop_upstream(self, instance_id: str) -> ClientUpstream | None:
        """Forget the upstream session (now, so a change right after sees none) and what it asked."""
        upstream = self._upstreams.pop(instance_id, None)
        if upstream is not None:
            for hub_id, (asker, _) in list(self._server_requests.items()):
                if asker is upstream:
                    del self._server_requests[hub_id]
        return upstream

    async def _close_upstream(self, instance_id: str) -> None:
        """End this client's session with the instance for good: its kept state goes too."""
        self._kept.pop(instance_id, None)
        upstream = self._drop_upstream(instance_id)
        if upstream is not None:
            await upstream.close()

    def _restore(self, instance_id: str) -> None:
        """Open a new upstream session now if there is state to set up in it (see KeptState)."""
        if self.closed or not self._kept.get(instance_id) or self.hub.state(instance_id) != "active":
            return
        self._spawn(self._upstream(instance_id).client())  # one handshake, however many ask

    def _relay(self, upstream: ClientUpstream, in_request: bool, message: dict[str, Any]) -> None:
        """Pass what an instance sends to this client: notifications unchanged, requests renumbered.

        `in_request`: it came on the stream of one of this client's requests (else the GET stream).
        """
        method = message.get("method")
        if not isinstance(method, str):
            return
        emit = request_emit.get() or self.emit
        if "id" in message:
            self._server_request(upstream, message, emit)
            return
        instance_id = upstream.instance_id
        transparent = self.instance_ref is not None
        if method == "notifications/tools/list_changed":
            self.hub.instance_tools_changed(instance_id)  # the hub's own list_changed follows
            if not transparent:
                if instance_id == self.bound and self._own_tools is not None:
                    self._own_tools = None  # this client's own list is stale: refetch it
                    emit(message)
                return
        if not (transparent or in_request or instance_id == self.bound or method in FORWARDED_EVERYWHERE):
            return  # e.g. resources/list_changed of an instance only reached through instances_call
        if method == "notifications/cancelled":
            message = self._cancelled_by_instance(upstream, message)
        emit(message)

    def _server_request(self, upstream: ClientUpstream, message: dict[str, Any], emit: Emit) -> None:
        """An instance asks the client something: relay it, or refuse at once if it cannot answer."""
        method = message["method"]
        needed = CLIENT_CAPABILITY_OF.get(method)
        if method == "ping":
            self._spawn(upstream.respond(message.get("id"), result={}))
            return
        if needed is not None and needed not in self.client_capabilities:
            name = self.client_info.get("name") or "the client"
            error = {"code": METHOD_NOT_FOUND, "message": f"{name} does not support {needed} ({method})"}
            self._spawn(upstream.respond(message.get("id"), error=error))
            return
        self._next_server_request += 1
        hub_id = f"fsm-{self._next_server_request}"
        self._server_requests[hub_id] = (upstream, message.get("id"))
        emit({**message, "id": hub_id})

    def _answered(self, message: dict[str, Any]) -> None:
        """The client answered a relayed request: send it upstream with the instance's own id."""
        answer_id = message.get("id")
        entry = self._server_requests.pop(answer_id, None) if isinstance(answer_id, str) else None
        if entry is None:
            log.debug("an answer to no request of ours: %s", message.get("id"))
            return
        upstream, original = entry
        if "error" in message:
            self._spawn(upstream.respond(original, error=message["error"]))
        else:
            self._spawn(upstream.respond(original, result=message.get("result")))

    def _cancelled_by_instance(self, upstream: ClientUpstream, message: dict[str, Any]) -> dict[str, Any]:
        params = message.get("params")
        if not isinstance(params, dict):
            return message
        for hub_id, (asker, original) in list(self._server_requests.items()):
            if asker is upstream and original == params.get("requestId"):
                del self._server_requests[hub_id]
                return {**message, "params": {**params, "requestId": hub_id}}
        return message

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("relaying to an instance failed: %s", task.exception())

    # -- binding ----------------------------------------------------------------------------

    async def bind(self, instance_id: str | None, reason: str) -> None:
        previous = self.bound
        if previous == instance_id:
            return
        if previous is not None:
            await self._close_upstream(previous)
            await self.hub.session_disconnected(self.id, previous, reason)
        self._grace_tools = None
        self._own_tools = None
        self.bound = instance_id
        if instance_id is not None:
            await self.hub.session_connected(self.id, instance_id)
        self.list_changed(force=True)

    def list_changed(self, *, force: bool = False) -> None:
        # The supervisor swaps in a new list object whenever the instance's tools are refetched,
        # so the list's identity tells a changed schema from an unchanged one, names alike.
        tools = self._bound_tools()
        if not force and tools is not self._listed_tools and tools == self._listed_tools:
            self._listed_tools = tools  # refetched after a restart, but the same tools: no churn
            return
        if force or tools is not self._listed_tools:
            self._listed_tools = tools
            self.emit({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            if force:
                self.emit({"jsonrpc": "2.0", "method": "notifications/resources/list_changed"})
                self.emit({"jsonrpc": "2.0", "method": "notifications/prompts/list_changed"})

    def _instance_changed(self, instance_id: str) -> None:
        if instance_id in self._upstreams and self.hub.state(instance_id) != "active":
            # Its session died with it, and a new URL needs a new client anyway; what the client
            # set up in it is kept and replayed once the instance is active again.
            dropped = self._drop_upstream(instance_id)
            if dropped is not None:
                self._spawn(dropped.close())
        elif instance_id not in self._upstreams:
            self._restore(instance_id)
        if self._routed and self.hub.state(instance_id) != "active":
            for task, routed_to in self._routed.items():
                if routed_to == instance_id and task not in self._abandoned:
                    self._abandoned.add(task)
                    task.cancel()
        if instance_id == self.bound and not self.closed:
            self.list_changed()

    async def close(self, reason: str) -> None:
        """End the session: cancel what is in flight and record the disconnect."""
        self.closed = True
        for task in list(self._inflight.values()):
            if task is not asyncio.current_task():
                task.cancel()
        if self.bound is not None:
            with contextlib.suppress(FsmHubError):
                await self.hub.session_disconnected(self.id, self.bound, reason)
            self.bound = None
        # Recorded first: the end is the fact; the DELETEs upstream are courtesy.
        await asyncio.gather(*(self._close_upstream(i) for i in list(self._upstreams)))
        self.hub.forget_listener(self._instance_changed)
        self.hub.open_sessions.discard(self.id)
