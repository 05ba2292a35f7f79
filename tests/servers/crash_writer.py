"""Writes to an event log until killed, printing the seq of every acknowledged append.

    python tests/crash_writer.py EVENTS_DB

Used by test_store: it SIGKILLs this process mid-run and checks that every seq printed here
(acknowledged = committed) survived. Ten producers each drive a legal transition loop, so a
batch is almost always in flight when the kill lands.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from fsm_hub.core.events import StoredEvent, transition_data
from fsm_hub.store.sqlite import EventStore

PRODUCERS = 10
LOOP = (("connect", "connecting"), ("connected", "active"), ("lost", "retrying"))


def acknowledge(event: StoredEvent) -> None:
    sys.stdout.write(f"{event.seq}\n")
    sys.stdout.flush()


async def produce(store: EventStore, n: int) -> None:
    stream = f"crash-{n:02d}"
    acknowledge(await store.append(stream, "instance_discovered", {"name": stream, "port": 9000 + n}))
    state = "discovered"
    while True:
        for event, target in LOOP:
            data = transition_data(event, state, target, reason="crash test", attempt=1)
            acknowledge(await store.append(stream, "transition", data))
            state = target


async def main(path: Path) -> None:
    store = await EventStore.open(path)
    await asyncio.gather(*(produce(store, n) for n in range(PRODUCERS)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
