"""The one exception hierarchy of fsm-hub; the CLI turns any of these into one line on stderr."""

from __future__ import annotations

import errno
from typing import Final


class FsmHubError(Exception):
    """Base of every error fsm-hub raises on purpose."""


class StoreError(FsmHubError):
    """The event log cannot be opened or written."""


class NotAnEventLog(StoreError):
    """The file is not an fsm-hub event log (garbage, or another program's SQLite db)."""


class SchemaTooNew(StoreError):
    """The event log was written by a newer fsm-hub."""


class ConcurrencyError(StoreError):
    """An append conflicted with an event already at that stream version."""


class LogUnwritable(StoreError):
    """The event log refused a transition's append even after retries: the hub must not go on."""


class SupervisorFailed(FsmHubError):
    """A supervisor's loop ended with an unexpected error (recorded, and the supervisor restarted)."""


class IllegalTransition(FsmHubError):
    """An event was sent that the instance's current state does not allow."""


class UnknownInstance(FsmHubError):
    """No instance matches the given id, prefix or name."""


class AmbiguousInstance(FsmHubError):
    """More than one instance matches the given prefix or name."""


class McpError(FsmHubError):
    """A JSON-RPC error answered by an MCP server."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(f"{message} (JSON-RPC error {code})")
        self.code = code
        self.message = message
        self.data = data


class TransportError(FsmHubError):
    """The MCP server could not be reached, timed out, or answered with something unusable."""


class LocalResourceError(TransportError):
    """The hub itself ran out of something (fds, memory, processes): no evidence about the server."""


LOCAL_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN})
"""Failures of the hub's own resources (creating a socket or a process), not of the server."""


class SessionExpired(TransportError):
    """The MCP server no longer knows our session (404, or a 400 about the session)."""


class InstanceUnavailable(FsmHubError):
    """The instance a request is routed to is not active."""

    def __init__(
        self, instance_id: str, state: str, last_error: str | None, attempt: int | None = None
    ) -> None:
        failed = "1 connect attempt failed" if attempt == 1 else f"{attempt} connect attempts failed"
        named = attempt is not None and state in ("retrying", "connecting", "dead")
        tried = f" ({failed})" if named else ""
        detail = f"; last error: {last_error}" if last_error else ""
        super().__init__(f"instance {instance_id} is {state}{tried}{detail}")
        self.attempt = attempt
        self.instance_id = instance_id
        self.state = state
        self.last_error = last_error


class DiscoveryError(FsmHubError):
    """An instance announcement file cannot be used."""


class InvalidAnnouncement(DiscoveryError):
    """The file is not a well-formed announcement (garbage, half-written, wrong types)."""


class RefusedAnnouncement(DiscoveryError):
    """Well-formed, but using it would be unsafe (foreign owner, symlink, size, remote host)."""


class NoEventLog(StoreError):
    """A reading command was pointed at a log that does not exist (only `serve` creates one)."""


class ConfigError(FsmHubError):
    """The configured-servers file (`servers.json`) cannot be used as it is."""


class RefusedConfig(ConfigError):
    """Using the config would be unsafe (owned by another user, writable by others)."""
