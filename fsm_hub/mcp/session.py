"""The hub's MCP server side: one `Session` per client, whatever the transport.

A session negotiates the protocol, offers the hub tools, and — once bound to an instance with
`instances_connect` — forwards tools, resources and prompts to it. Forwarded payloads are passed
through untouched: the hot path parses each message once and validates nothing it merely relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from fsm_hub.errors import FsmHubError, InstanceUnavailable, McpError, TransportError
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
        "prompts/list", "prompts/get", "completion/complete",
    }
)  # fmt: skip
"""The requests a session answers; anything else (`server/discover` included) gets -32601."""

PAGE_SIZE = 200
_NO_TOOLS = NamedTools([])
Emit = Callable[[dict[str, Any]], None]

request_emit: ContextVar[Emit | None] = ContextVar("request_emit", default=None)
"""Where notifications about the request being handled go (an HTTP response stream), if not
to the session's own channel."""


class Session:
    """One MCP client of the hub. `emit` sends server-initiated messages to that client."""

    def __init__(self, hub: Hub, session_id: str, emit: Emit) -> None:
        self.hub = hub
        self.id = session_id
        self.emit = emit
        self.protocol_version: str | None = None
        self.client_info: dict[str, Any] = {}
        self.bound: str | None = None
        """The instance this session is connected to; stays bound while it is not active."""
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
            return None  # a client's answer to a server request; we send none that need one
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
        if method == "tools/call":
            return await self._call_tool(params)
        if method == "ping":
            return {}
        if method == "tools/list":
            return self._page(self.tool_list(), params, "tools")
        if method == "initialize":
            return self._initialize(params)
        if method in ("resources/list", "resources/templates/list", "prompts/list"):
            return await self._forward_list(method, params)
        if method in ("resources/read", "prompts/get", "completion/complete"):
            return await self._forward(method, params)
        if method in ("resources/subscribe", "resources/unsubscribe"):
            return await self._forward(method, params)
        raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}")

    def _initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        requested = params.get("protocolVersion")
        if not isinstance(requested, str):
            raise RpcError(INVALID_PARAMS, "Invalid params: protocolVersion must be a string")
        self.protocol_version = negotiate(requested)
        info = params.get("clientInfo")
        self.client_info = info if isinstance(info, dict) else {}
        return {
            "protocolVersion": self.protocol_version,
            "capabilities": SERVER_CAPABILITIES,
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
        # notifications/initialized, roots/list_changed, progress from the client: nothing to do

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

    def _instance_tools(self) -> NamedTools:
        """The bound instance's tools under client-safe names (hub names win a clash)."""
        tools = self.hub.tools(self.bound) if self.bound is not None else None
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
            return await self.hub.request(instance_id, method, params, on_message=self._relay)
        except asyncio.CancelledError:
            if task not in self._abandoned:
                raise
            task.uncancel()
            raise self.hub.unavailable(instance_id) from None
        finally:
            del self._routed[task]
            self._abandoned.discard(task)

    def _relay(self, message: dict[str, Any]) -> None:
        """Pass an instance's progress and log notifications through to the client unchanged."""
        method = message.get("method")
        if method in ("notifications/progress", "notifications/message") and "id" not in message:
            (request_emit.get() or self.emit)(message)

    # -- binding ----------------------------------------------------------------------------

    async def bind(self, instance_id: str | None, reason: str) -> None:
        previous = self.bound
        if previous == instance_id:
            return
        if previous is not None:
            await self.hub.session_disconnected(self.id, previous, reason)
        self.bound = instance_id
        if instance_id is not None:
            await self.hub.session_connected(self.id, instance_id)
        self.list_changed(force=True)

    def list_changed(self, *, force: bool = False) -> None:
        # The supervisor swaps in a new list object whenever the instance's tools are refetched,
        # so the list's identity tells a changed schema from an unchanged one, names alike.
        tools = self.hub.tools(self.bound) if self.bound is not None else None
        if force or tools is not self._listed_tools:
            self._listed_tools = tools
            self.emit({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            if force:
                self.emit({"jsonrpc": "2.0", "method": "notifications/resources/list_changed"})
                self.emit({"jsonrpc": "2.0", "method": "notifications/prompts/list_changed"})

    def _instance_changed(self, instance_id: str) -> None:
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
        self.hub.forget_listener(self._instance_changed)
        self.hub.open_sessions.discard(self.id)
