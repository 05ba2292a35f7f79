"""The listener that makes every transition durable before the driver acts on it."""

from __future__ import annotations

from typing import Any, Protocol

from statemachine.exceptions import TransitionNotAllowed

from fsm_hub.core.events import EventType, StoredEvent, transition_data
from fsm_hub.core.machine import Connection, InstanceMachine
from fsm_hub.errors import IllegalTransition


class Appender(Protocol):
    def append(self, stream: str, type: str, data: dict[str, Any]) -> Any: ...


class TransitionRecorder:
    """Appends each transition of one instance's machine to its stream and awaits the commit.

    Being an async listener, it switches the machine to the async engine: `send()` then
    returns only once the transition is in the log.
    """

    def __init__(self, store: Appender, stream: str) -> None:
        self.store = store
        self.stream = stream
        self.last: StoredEvent | None = None

    async def after_transition(
        self,
        event: Any,
        source: Any,
        target: Any,
        machine: InstanceMachine,
        reason: str = "",
        error: str | None = None,
    ) -> None:
        data = transition_data(
            str(event),
            source.id,
            target.id,
            reason=reason,
            attempt=machine.model.attempt,
            error=error,
        )
        self.last = await self.store.append(self.stream, EventType.TRANSITION, data)


async def recorded_machine(
    store: Appender, stream: str, *, state: str | None = None, attempt: int = 0,
    max_attempts: int | None = None,
) -> InstanceMachine:
    """A machine for `stream` that records its transitions; `state` restores it from the fold."""
    model = Connection(state=state, attempt=attempt)
    if max_attempts is not None:
        model.max_attempts = max_attempts
    machine = InstanceMachine(model, listeners=[TransitionRecorder(store, stream)])
    if state is None:
        await machine.activate_initial_state()
    return machine


async def fire(machine: InstanceMachine, event: str, **details: Any) -> str:
    """Send `event` (recorded by the listener) and return the new state.

    An illegal event raises IllegalTransition naming the event and the state, and nothing is
    recorded.
    """
    before = machine.model.state
    try:
        await machine.send(event, **details)
    except TransitionNotAllowed:
        raise IllegalTransition(f"event {event!r} is not allowed in state {before!r}") from None
    return str(machine.model.state)
