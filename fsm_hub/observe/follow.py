"""The live tail: events as they are committed, read from the log file by a plain reader.

The writer commits in WAL mode, so a reader sees each transaction once it is durable; asking
for `seq > last` every `interval` seconds costs one indexed query and shows an event well
within a second of its commit.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fsm_hub.core.events import StoredEvent

_COLUMNS = "seq, stream, version, type, at, data"


def follow(
    db: Path,
    *,
    after: int,
    stream: str | None = None,
    interval: float = 0.1,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[StoredEvent]:
    """Every event with seq > `after` (of one stream, or all), forever, in log order."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    try:
        where = "seq > ?" + (" AND stream = ?" if stream is not None else "")
        sql = f"SELECT {_COLUMNS} FROM events WHERE {where} ORDER BY seq"
        while True:
            params: tuple[object, ...] = (after, stream) if stream is not None else (after,)
            rows = connection.execute(sql, params).fetchall()
            for row in rows:
                event = StoredEvent(*row)
                after = event.seq
                yield event
            if not rows:
                sleep(interval)
    finally:
        connection.close()
