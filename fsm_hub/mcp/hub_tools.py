"""The tools the hub itself offers every session: list, connect, disconnect, history, call, status."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fsm_hub.core.display import redact
from fsm_hub.errors import FsmHubError, InstanceUnavailable, TransportError

if TYPE_CHECKING:
    from fsm_hub.mcp.session import Session

_INSTANCE_ID = {
    "type": "string",
    "description": "Instance id, a unique prefix of it, or the instance's unique name.",
}

DEFINITIONS: tuple[dict[str, Any], ...] = (
    {
        "name": "instances_list",
        "title": "List instances",
        "description": "Every instance the hub knows, dead ones too, with its state and last error.",
        "inputSchema": {"type": "object", "properties": {}, "additionalProperties": False},
        "annotations": {"readOnlyHint": True},
    },
    {
        "name": "instances_connect",
        "title": "Connect to an instance",
        "description": "Bind this session to an instance: its tools, resources and prompts "
        "appear here. Switching from another instance is allowed.",
        "inputSchema": {
            "type": "object",
            "properties": {"instance_id": _INSTANCE_ID},
            "required": ["instance_id"],
            "additionalProperties": False,
        },
    },
    {
        "name": "instances_disconnect",
        "title": "Disconnect",
        "description": "Unbind this session from its instance; only the hub tools remain.",
        "inputSchema": {"type": "object", "properties": {}, "additionalProperties": False},
    },
    {
        "name": "instances_history",
        "title": "Instance history",
        "description": "The instance's recorded events in order: every transition with its "
        "reason and error. Use instance_id 'hub' for the hub's own events.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "instance_id": _INSTANCE_ID,
                "limit": {"type": "integer", "minimum": 1, "description": "Most recent N events."},
            },
            "required": ["instance_id"],
            "additionalProperties": False,
        },
        "annotations": {"readOnlyHint": True},
    },
    {
        "name": "instances_call",
        "title": "Call an instance tool",
        "description": "Call a tool of any active instance without switching this session.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "instance_id": _INSTANCE_ID,
                "tool": {"type": "string", "description": "The instance's tool name."},
                "arguments": {"type": "object", "description": "The tool's arguments."},
            },
            "required": ["instance_id", "tool"],
            "additionalProperties": False,
        },
    },
    {
        "name": "hub_status",
        "title": "Hub status",
        "description": "Instances per state, sessions, event log path and size, uptime.",
        "inputSchema": {"type": "object", "properties": {}, "additionalProperties": False},
        "annotations": {"readOnlyHint": True},
    },
)
HUB_TOOL_NAMES = frozenset(tool["name"] for tool in DEFINITIONS)
MAX_HISTORY_LIMIT = 1_000_000
"""The largest `limit` instances_history takes (SQLite integers end at 2^63)."""


class ToolFailure(FsmHubError):
    """A hub tool could not do what was asked; shown to the model as an `isError` result."""


def _text(arguments: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = arguments.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ToolFailure(f"argument {key!r} must be a non-empty string")
    return value


def _unexpected(arguments: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(arguments) - allowed)
    if extra:
        raise ToolFailure(f"unexpected argument(s): {', '.join(extra)}")


class HubTools:
    definitions = DEFINITIONS

    def __init__(self, session: Session) -> None:
        self.session = session

    async def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        handler = getattr(self, name)
        try:
            result: dict[str, Any] = await handler(arguments)
        except ToolFailure:
            raise
        except FsmHubError as exc:
            raise ToolFailure(str(exc)) from None
        return result

    async def instances_list(self, arguments: dict[str, Any]) -> dict[str, Any]:

        _unexpected(arguments, set())
        view = self.session.hub.view
        listed = sorted(view.instances.values(), key=lambda i: (i.name, i.id))
        return tool_result({"instances": [i.to_json() for i in listed]})

    async def instances_connect(self, arguments: dict[str, Any]) -> dict[str, Any]:

        _unexpected(arguments, {"instance_id"})
        hub = self.session.hub
        instance_id = hub.resolve(_text(arguments, "instance_id") or "")
        previous = self.session.bound
        reason = f"switched to {instance_id}" if previous else "connected"
        await self.session.bind(instance_id, reason)
        instance = hub.view.instances[instance_id]
        tools = hub.tools(instance_id)
        payload: dict[str, Any] = {
            "instance": instance.to_json(),
            "tools": [t.get("name") for t in tools or ()],
        }
        instructions = hub.handshake(instance_id).get("instructions")
        if instructions:
            payload["instructions"] = instructions  # what the instance tells its clients
        if previous and previous != instance_id:
            payload["previous"] = previous
        if tools is None:
            payload["note"] = (
                f"instance is {hub.state(instance_id)}; its tools appear when it is active again"
            )
        return tool_result(payload)

    async def instances_disconnect(self, arguments: dict[str, Any]) -> dict[str, Any]:

        _unexpected(arguments, set())
        previous = self.session.bound
        await self.session.bind(None, "disconnected by client")
        return tool_result({"disconnected": previous})

    async def instances_history(self, arguments: dict[str, Any]) -> dict[str, Any]:

        _unexpected(arguments, {"instance_id", "limit"})
        limit = arguments.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ToolFailure("argument 'limit' must be a positive integer")
        if limit is not None and limit > MAX_HISTORY_LIMIT:
            raise ToolFailure(f"argument 'limit' must be at most {MAX_HISTORY_LIMIT}")
        events = await self.session.hub.history(_text(arguments, "instance_id") or "", limit)
        return tool_result({"events": [e.to_json() for e in events]})

    async def instances_call(self, arguments: dict[str, Any]) -> dict[str, Any]:

        _unexpected(arguments, {"instance_id", "tool", "arguments"})
        hub = self.session.hub
        instance_id = hub.resolve(_text(arguments, "instance_id") or "")
        tool = _text(arguments, "tool")
        tool_arguments = arguments.get("arguments") or {}
        if not isinstance(tool_arguments, dict):
            raise ToolFailure("argument 'arguments' must be an object")
        params = {"name": tool, "arguments": tool_arguments}
        try:
            return await self.session.route(instance_id, "tools/call", params)
        except InstanceUnavailable as exc:
            return tool_error(str(exc))
        except TransportError as exc:
            return tool_error(f"instance {instance_id} did not answer: {exc}")

    async def hub_status(self, arguments: dict[str, Any]) -> dict[str, Any]:

        _unexpected(arguments, set())
        return tool_result(self.session.hub.status())


def tool_error(message: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": message}], "isError": True}


def tool_result(payload: dict[str, Any]) -> dict[str, Any]:
    """Structured content plus the same JSON as text, for clients that read only text."""
    payload = redact(payload)  # URL credentials are never shown to the model
    return {
        "content": [{"type": "text", "text": json.dumps(payload, ensure_ascii=False)}],
        "structuredContent": payload,
        "isError": False,
    }
