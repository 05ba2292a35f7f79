"""The life of an attached `serve --mcp`, declared: relaying to an owner, failing over, owning.

No I/O here (the bridge and `serve.process` do it); a reader sees every legal step of an
attached process in one screen. An attached process relays its client to the owning hub; when
the owner goes, it fails over — to a successor that took over (or the same owner, if it only
lost the session), or by taking the log over itself — and if nothing worked it goes back to
relaying, so the client's next call tries again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from statemachine import State, StateMachine

if TYPE_CHECKING:
    from fsm_hub.mcp.session import Session


@dataclass(slots=True)
class Attachment:
    """The machine's model: the state, and the in-process session once this process owns the log."""

    state: str | None = None
    session: Session | None = None
    """Set on takeover: from then on the client is a session of this process's own hub."""
    failovers: int = 0


class AttachMachine(StateMachine):  # type: ignore[misc]
    """relaying → failing_over → relaying (re-attached or gave up) | owning (took over)."""

    relaying = State(initial=True)
    failing_over = State()
    owning = State(final=True)  # the client is a session of this process's own hub from then on

    owner_lost = relaying.to(failing_over)
    reattached = failing_over.to(relaying)
    gave_up = failing_over.to(relaying)
    took_over = failing_over.to(owning)

    def __init__(self, model: Attachment | None = None, **kwargs: Any) -> None:
        super().__init__(model if model is not None else Attachment(), **kwargs)

    def before_owner_lost(self) -> None:
        self.model.failovers += 1

    def before_took_over(self, session: Session) -> None:
        self.model.session = session

    def __repr__(self) -> str:
        return f"<AttachMachine {self.model.state} failovers={self.model.failovers}>"
