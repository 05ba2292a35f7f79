"""The attached process's lifecycle machine: every legal step, and the illegal ones refused."""

from __future__ import annotations

from typing import Any, cast

import pytest
from statemachine.exceptions import TransitionNotAllowed

from fsm_hub.serve.attach import AttachMachine


def test_a_failover_ends_relaying_again_or_owning() -> None:
    machine = AttachMachine()
    assert machine.relaying.is_active and machine.model.session is None
    machine.owner_lost()
    machine.reattached()
    machine.owner_lost()
    machine.gave_up()
    assert machine.relaying.is_active and machine.model.failovers == 2
    session = cast(Any, object())
    machine.owner_lost()
    machine.took_over(session=session)
    assert machine.owning.is_active and machine.model.session is session
    assert repr(machine) == "<AttachMachine owning failovers=3>"


@pytest.mark.parametrize("event", ["reattached", "gave_up", "took_over"])
def test_nothing_but_a_lost_owner_starts_a_failover(event: str) -> None:
    with pytest.raises(TransitionNotAllowed):
        AttachMachine().send(event, session=None)


def test_an_owning_process_never_fails_over_again() -> None:
    machine = AttachMachine()
    machine.owner_lost()
    machine.took_over(session=cast(Any, object()))
    with pytest.raises(TransitionNotAllowed):
        machine.owner_lost()
