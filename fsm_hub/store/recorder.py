"""The listener that commits a transition before the machine's state changes."""

from __future__ import annotations

from typing import Any, Protocol

from statemachine.exceptions import TransitionNotAllowed

from fsm_hub.core.events import EventType, StoredEvent, transition_data
from fsm_hub.core.machine import Connection, InstanceMachine, attempt_after
from fsm_hub.errors import IllegalTransition


class Appender(Protocol):
    def append(self, stream: str, type: str, data: dict[str, Any]) -> Any: ...


class TransitionRecorder:
    """Appends each transition of one instance's machine to its stream and awaits the commit.

    It records in `before_transition`, which the machine runs before its own callbacks and
    before it changes state: if the append fails, the exception leaves `send()` and the machine
    stays in its source state with its model untouched. Being an async listener, it switches
    the machine to the async engine: `send()` returns only once the transition is in the log.
    """

    def __init__(self, store: Appender, stream: str) -> None:
        self.store = store
        self.stream = stream
        self.last: StoredEvent | None = None

    async def before_transition(
        self,
        event: Any,
        source: Any,
        target: Any,
        machine: InstanceMachine,
        reason: str = "",
        error: str | None = None,
    ) -> None:
        name = str(event)
        data = transition_data(
            name,
            source.id,
            target.id,
            reason=reason,
            attempt=attempt_after(name, target.id, machine.model.attempt),
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
    """Send `event` (committed by the listener first) and return the new state.

    An illegal event raises IllegalTransition naming the event and the state, and nothing is
    recorded. A failed append raises the store's error and leaves the machine where it was.
    """
    before = machine.model.state
    try:
        await machine.send(event, **details)
    except TransitionNotAllowed:
        raise IllegalTransition(f"event {event!r} is not allowed in state {before!r}") from None
    return str(machine.model.state)
