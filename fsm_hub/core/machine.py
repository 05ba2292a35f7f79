"""The life of one instance's connection, declared. No I/O: recording is a listener's job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from statemachine import State, StateMachine

DEFAULT_RETRY_ATTEMPTS = 8


@dataclass(slots=True)
class Connection:
    """The machine's model: the state plus the retry budget the guards read."""

    state: str | None = None
    attempt: int = 0
    """Connect attempts since the instance was last active (or rediscovered)."""
    max_attempts: int = DEFAULT_RETRY_ATTEMPTS


class InstanceMachine(StateMachine):  # type: ignore[misc]
    """discovered → connecting → active → retrying → dead, and back through rediscover."""

    discovered = State(initial=True)
    connecting = State()
    active = State()
    retrying = State()
    dead = State()  # not final: a re-announced instance comes back through rediscover

    connect = discovered.to(connecting) | retrying.to(connecting)
    connected = connecting.to(active)
    connect_failed = connecting.to(retrying, cond="has_retries_left") | connecting.to(dead)
    lost = active.to(retrying)
    give_up = retrying.to(dead)
    rediscover = (
        discovered.to.itself()  # type: ignore[no-untyped-call]
        | connecting.to(discovered)
        | active.to(discovered)
        | retrying.to(discovered)
        | dead.to(discovered)
    )
    remove = (
        discovered.to(dead)
        | connecting.to(dead)
        | active.to(dead)
        | retrying.to(dead)
        | dead.to.itself()  # type: ignore[no-untyped-call]
    )

    def __init__(self, model: Connection | None = None, **kwargs: Any) -> None:
        super().__init__(model if model is not None else Connection(), **kwargs)

    def has_retries_left(self) -> bool:
        return bool(self.model.attempt < self.model.max_attempts)

    # The model changes in `on_…` callbacks, which run after every `before_…` one: the recorder
    # commits in `before_transition`, and a refused append must leave the model as it was.
    def on_connect(self) -> None:
        self.model.attempt += 1

    def on_enter_active(self) -> None:
        self.model.attempt = 0

    def on_rediscover(self) -> None:
        self.model.attempt = 0


def attempt_after(event: str, target: str, attempt: int) -> int:
    """The retry budget once `event` has led to `target`: what the callbacks above will set.

    The recorder commits a transition before the machine runs them, so it needs this answer
    ahead of time.
    """
    if event == "connect":
        return attempt + 1
    if event == "rediscover" or target == "active":
        return 0
    return attempt


STATES: tuple[str, ...] = tuple(s.id for s in InstanceMachine.states)
EVENTS: tuple[str, ...] = tuple(e.id for e in InstanceMachine.events)  # type: ignore[attr-defined]


def legal_targets() -> dict[tuple[str, str], frozenset[str]]:
    """(event, source) → the states that event may lead to; what `replay --verify` checks against."""
    table: dict[tuple[str, str], set[str]] = {}
    for state in InstanceMachine.states:
        for transition in state.transitions:
            for event in transition.events:
                table.setdefault((str(event), state.id), set()).add(transition.target.id)
    return {key: frozenset(targets) for key, targets in table.items()}
