"""The event store: a contract every backend must pass, run here against SQLite.

`EventStoreContract` uses only the store's public API. A new backend (PostgreSQL, say)
subclasses it with its own `open_store` fixture and gets every test; what is specific to a
SQLite file (modes, foreign files, raw SQL, crash recovery of the file) is in
`TestSqliteEventStore` alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from fsm_hub.core.audit import audit
from fsm_hub.core.events import NewEvent, StoredEvent, parse_time, transition_data
from fsm_hub.errors import (
    AmbiguousInstance,
    ConcurrencyError,
    NotAnEventLog,
    SchemaTooNew,
    StoreError,
    UnknownInstance,
)
from fsm_hub.store.schema import APPLICATION_ID, latest_version
from fsm_hub.store.sqlite import EventLog, EventStore
from tests.logs import LogBuilder, Sample, refuse_transitions_to

OpenStore = Callable[[], Awaitable[EventStore]]
CRASH_WRITER = Path(__file__).resolve().parents[1] / "servers" / "crash_writer.py"


def assert_well_formed(events: list[StoredEvent]) -> None:
    """seq strictly increasing; every stream's versions gapless from 1."""
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))
    versions: dict[str, int] = {}
    for event in events:
        versions[event.stream] = versions.get(event.stream, 0) + 1
        assert event.version == versions[event.stream], event


class EventStoreContract:
    """What every event store must do. Subclasses provide `open_store`."""

    @pytest.fixture
    def open_store(self) -> OpenStore:
        """`await open_store()` opens a store on this test's log; calling it again reopens it."""
        raise NotImplementedError

    async def test_many_concurrent_producers_all_commit_in_order(self, open_store: OpenStore) -> None:
        store = await open_store()
        producers, each = 100, 20
        acked: dict[int, list[StoredEvent]] = {}

        async def produce(n: int) -> None:
            mine = acked.setdefault(n, [])
            for i in range(each):
                mine.append(await store.append(f"p{n:03d}", "instance_updated", {"n": n, "i": i}))
                if i % 5 == 0:  # a stream every producer shares
                    mine.append(await store.append("shared", "instance_updated", {"n": n, "i": i}))

        await asyncio.gather(*(produce(n) for n in range(producers)))
        events = await store.read()
        assert len(events) == producers * (each + each // 5)
        assert_well_formed(events)
        assert sorted(e.seq for mine in acked.values() for e in mine) == [e.seq for e in events]
        by_seq = {e.seq: e for e in events}
        for n, mine in acked.items():
            assert [by_seq[e.seq] for e in mine] == mine  # acknowledged = what is stored
            assert [e.seq for e in mine] == sorted(e.seq for e in mine)  # producer order kept
            own = [e for e in events if e.stream == f"p{n:03d}"]
            assert [e.data["i"] for e in own] == list(range(each))
            assert [e.version for e in own] == list(range(1, each + 1))
        assert store.last_seq == events[-1].seq

    async def test_group_commit_batches_and_notifies_before_acknowledging(
        self, open_store: OpenStore
    ) -> None:
        store = await open_store()
        batches: list[list[int]] = []
        store.subscribe(lambda batch: batches.append([e.seq for e in batch]))
        notified: set[int] = set()
        store.subscribe(lambda batch: notified.update(e.seq for e in batch))

        async def produce(n: int) -> None:
            for i in range(10):
                event = await store.append(f"p{n}", "instance_updated", {"i": i})
                assert event.seq in notified  # subscribers saw it before the ack

        await asyncio.gather(*(produce(n) for n in range(50)))
        flat = [seq for batch in batches for seq in batch]
        assert flat == [e.seq for e in await store.read()]  # every batch, in log order
        assert len(batches) < len(flat) / 10  # one transaction per batch, not per event
        assert max(len(batch) for batch in batches) == 50

    async def test_stale_expected_version_fails_alone_in_its_batch(self, open_store: OpenStore) -> None:
        store = await open_store()
        await store.append("s", "instance_updated", {"v": 1})
        await store.append("s", "instance_updated", {"v": 2})
        # Queued together, so written in one batch.
        blind = store.append("other", "instance_updated", {})
        stale = store.append("s", "instance_updated", {"stale": True}, expected_version=1)
        fresh = store.append("s", "instance_updated", {"v": 3}, expected_version=2)
        late = store.append("s", "instance_updated", {"late": True}, expected_version=2)
        new = store.append("new", "instance_updated", {}, expected_version=0)
        results = await asyncio.gather(blind, stale, fresh, late, new, return_exceptions=True)
        assert isinstance(results[1], ConcurrencyError)
        assert isinstance(results[3], ConcurrencyError)
        assert "version 3, not 2" in str(results[3])
        committed = [r for r in results if isinstance(r, StoredEvent)]
        assert [(e.stream, e.version) for e in committed] == [("other", 1), ("s", 3), ("new", 1)]
        assert [e.data for e in await store.read(stream="s")] == [{"v": 1}, {"v": 2}, {"v": 3}]
        assert_well_formed(await store.read())

    async def test_reopen_keeps_everything_and_continues(self, open_store: OpenStore) -> None:
        store = await open_store()
        before = await store.append_all(
            [NewEvent(f"s{n % 3}", "instance_updated", {"n": n}) for n in range(10)]  # type: ignore[arg-type]
        )
        await store.close()
        store = await open_store()
        assert await store.read() == before
        assert store.last_seq == 10
        after = await store.append("s1", "instance_updated", {"n": 10})
        assert (after.seq, after.version) == (11, 4)
        fresh = await store.append("s9", "instance_updated", {}, expected_version=0)
        assert (fresh.seq, fresh.version) == (12, 1)
        with pytest.raises(ConcurrencyError):
            await store.append("s0", "instance_updated", {}, expected_version=3)
        assert_well_formed(await store.read())

    async def test_close_writes_everything_already_queued(self, open_store: OpenStore) -> None:
        store = await open_store()
        await store.append("s", "instance_updated", {"first": True})
        queued = [store.append("s", "instance_updated", {"i": i}) for i in range(100)]
        await store.close()
        assert all(f.done() and f.exception() is None for f in queued)
        with pytest.raises(StoreError, match="closed"):
            store.append("s", "instance_updated", {})
        await store.close()  # closing twice is fine
        store = await open_store()
        assert len(await store.read(stream="s")) == 101

    async def test_a_waiter_giving_up_does_not_stop_the_writer(self, open_store: OpenStore) -> None:
        store = await open_store()
        abandoned = store.append("s", "instance_updated", {"i": 0})
        abandoned.cancel()
        kept = await store.append("s", "instance_updated", {"i": 1})
        assert kept.data == {"i": 1}
        assert_well_formed(await store.read())

    async def test_two_stores_on_one_log_do_not_fork_a_stream(self, open_store: OpenStore) -> None:
        first, second = await open_store(), await open_store()
        await first.append("s", "instance_updated", {"by": "first"})
        await second.append("s", "instance_updated", {"by": "second"})
        # `first` still believes "s" is at version 1: a blind append is renumbered and retried...
        retried = await first.append("s", "instance_updated", {"by": "first again"})
        assert retried.version == 3
        await second.append("s", "instance_updated", {"by": "second again"})  # retried likewise
        # ...but an append that expected version 3 is refused: someone else wrote meanwhile.
        with pytest.raises(ConcurrencyError):
            await first.append("s", "instance_updated", {}, expected_version=3)
        events = await first.read()
        assert_well_formed(events)
        assert [e.data["by"] for e in events if e.stream == "s"] == [
            "first", "second", "first again", "second again"
        ]

    async def test_read_filters(self, open_store: OpenStore) -> None:
        times = iter(f"2026-03-14T00:00:0{n}+00:00" for n in range(10))
        store = await open_store()
        store._clock = lambda: parse_time(next(times))
        for n in range(10):
            await store.append(f"s{n % 2}", "instance_updated", {"n": n})
        assert [e.data["n"] for e in await store.read(stream="s1")] == [1, 3, 5, 7, 9]
        assert [e.data["n"] for e in await store.read(stream="s1", last=2)] == [7, 9]
        assert [e.data["n"] for e in await store.read(last=3)] == [7, 8, 9]
        until = "2026-03-14T00:00:04.000000+00:00"
        assert [e.data["n"] for e in await store.read(until=until)] == [0, 1, 2, 3, 4]
        assert await store.read(stream="nobody") == []

    async def test_payloads_round_trip(self, open_store: OpenStore) -> None:
        store = await open_store()
        data = {"name": "wéb ✓", "port": 8000, "pid": None, "nested": {"list": [1, 2.5, True]}}
        stored = await store.append("s", "instance_discovered", data)
        assert stored.data == data
        assert stored.to_json() == {"seq": 1, "stream": "s", "version": 1,
                                    "type": "instance_discovered", "at": stored.at, "data": data}
        assert parse_time(stored.at).tzinfo is not None
        [read] = await store.read()
        assert read == stored


    async def test_a_lone_surrogate_is_replaced_and_its_batch_commits(self, open_store: OpenStore) -> None:
        store = await open_store()
        batches: list[int] = []
        store.subscribe(lambda batch: batches.append(len(batch)))
        reason = "bad \udc80 bytes from an instance"
        ok = transition_data("connect", "discovered", "connecting", reason="ok")
        odd = transition_data("connect", "discovered", "connecting", reason=reason)
        appended = [
            store.append("s1", "transition", ok),
            store.append("s2", "transition", odd),
            store.append("s\ud800", "instance_updated", {"name": "n\udfff"}),
            store.append("s3", "instance_updated", {"name": "fine"}),
        ]
        stored = await asyncio.gather(*appended)
        assert batches == [4]  # one batch, all committed
        events = await store.read()
        assert [e.seq for e in events] == [e.seq for e in stored]
        assert events[1].data["reason"] == "bad \ufffd bytes from an instance"
        assert (events[2].stream, events[2].data["name"]) == ("s\ufffd", "n\ufffd")
        assert events[3].data == {"name": "fine"}
        assert audit(events).violation_count == 0

class TestSqliteEventStore(EventStoreContract):
    @pytest.fixture
    async def open_store(self, db_path: Path) -> AsyncIterator[OpenStore]:
        opened: list[EventStore] = []

        async def open_store() -> EventStore:
            opened.append(await EventStore.open(db_path))
            return opened[-1]

        yield open_store
        for store in opened:
            await store.close()

    async def test_an_append_the_file_refuses_fails_only_its_producer(
        self, store: EventStore, db_path: Path
    ) -> None:
        refuse_transitions_to(db_path, "active")
        ok = transition_data("connect", "discovered", "connecting", reason="")
        bad = transition_data("connected", "connecting", "active", reason="")
        results = await asyncio.gather(
            store.append("a", "transition", ok),
            store.append("b", "transition", bad),
            store.append("c", "transition", ok),
            return_exceptions=True,
        )
        assert isinstance(results[1], StoreError) and "disk says no" in str(results[1])
        assert str(db_path) in str(results[1])
        assert [type(r) for r in (results[0], results[2])] == [StoredEvent, StoredEvent]
        assert [(e.seq, e.stream) for e in await store.read()] == [(1, "a"), (2, "c")]
        assert (await store.append("b", "transition", ok)).version == 1  # the writer goes on

    async def test_unique_stream_version_is_enforced_by_sqlite(self, store: EventStore) -> None:
        await store.append("s", "instance_updated", {})
        with sqlite3.connect(store.path) as raw, pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            raw.execute(
                "INSERT INTO events (seq, stream, version, type, at, data) VALUES (99, 's', 1, 't', '', '{}')"
            )

    async def test_files_are_owner_only(self, db_path: Path) -> None:
        old = os.umask(0o022)
        try:
            store = await EventStore.open(db_path)
            await store.append("s", "instance_updated", {})
            wal = db_path.with_name(db_path.name + "-wal")
            assert wal.exists()
            for path in (db_path, wal):
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
            await store.close()
        finally:
            os.umask(old)

    def test_the_schema_is_marked_and_migrated(self, sample_log: Sample) -> None:
        path = sample_log.path
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
            assert raw.execute("PRAGMA user_version").fetchone()[0] == latest_version()
            names = [row[0] for row in raw.execute("SELECT name FROM schema_migrations ORDER BY version")]
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert names == ["0001_events.sql", "0002_hash_chain.sql", "0003_snapshots.sql"]

    async def test_an_empty_file_becomes_a_log(self, tmp_path: Path) -> None:
        path = tmp_path / "empty.db"
        path.touch()
        store = await EventStore.open(path)
        await store.append("s", "instance_updated", {})
        await store.close()
        with EventLog.open(path) as log:
            assert log.count() == 1

    @pytest.mark.parametrize(
        "content",
        [b"\x00\xffnot a database" * 100, b"SQLite format 3\x00" + b"\x13" * 4000, b"x"],
        ids=["garbage", "bad-sqlite-header", "one-byte"],
    )
    async def test_a_corrupt_file_is_refused_and_untouched(self, tmp_path: Path, content: bytes) -> None:
        path = tmp_path / "events.db"
        path.write_bytes(content)
        with pytest.raises(NotAnEventLog, match="not an fsm-hub event log"):
            await EventStore.open(path)
        with pytest.raises(NotAnEventLog):
            EventLog.open(path)
        assert path.read_bytes() == content

    @pytest.mark.parametrize(
        "setup",
        [
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes VALUES (1, 'hi');",
            "PRAGMA application_id = 1234; CREATE TABLE events (x);",
            "PRAGMA user_version = 7;",
        ],
        ids=["other-tables", "other-application-id", "other-user-version"],
    )
    async def test_another_programs_database_is_left_byte_for_byte(
        self, tmp_path: Path, setup: str
    ) -> None:
        path = tmp_path / "other.db"
        with sqlite3.connect(path) as other:
            other.executescript(setup)
        other.close()
        before = path.read_bytes()
        with pytest.raises(NotAnEventLog, match="another program"):
            await EventStore.open(path)
        with pytest.raises(NotAnEventLog):
            EventLog.open(path)
        assert path.read_bytes() == before
        assert await asyncio.to_thread(os.listdir, tmp_path) == ["other.db"]  # no -wal, no -shm

    async def test_a_newer_schema_is_refused(self, db_path: Path) -> None:
        store = await EventStore.open(db_path)
        await store.append("s", "instance_updated", {})
        await store.close()
        with sqlite3.connect(db_path) as raw:
            raw.execute("PRAGMA user_version = 99")
        raw.close()
        with pytest.raises(SchemaTooNew, match=r"schema version 99, newer .* upgrade fsm-hub"):
            await EventStore.open(db_path)
        with pytest.raises(SchemaTooNew):
            EventLog.open(db_path)

    @pytest.mark.e2e  # spawns a subprocess
    async def test_a_crash_mid_batch_loses_only_unacknowledged_events(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True)
        writer = await asyncio.create_subprocess_exec(
            sys.executable, str(CRASH_WRITER), str(db_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert writer.stdout is not None and writer.stderr is not None
        acknowledged: list[int] = []
        try:
            while len(acknowledged) < 1500:
                line = await asyncio.wait_for(writer.stdout.readline(), 20)
                if not line:
                    pytest.fail(f"the writer stopped: {(await writer.stderr.read()).decode()}")
                acknowledged.append(int(line))
        finally:
            writer.send_signal(signal.SIGKILL)
            rest, _ = await writer.communicate()
        assert writer.returncode == -signal.SIGKILL
        acknowledged += [int(line) for line in rest.split(b"\n")[:-1]]  # a cut last line is no ack

        store = await EventStore.open(db_path)  # recovers the WAL
        stored = [e.seq for e in await store.read()]
        assert set(acknowledged) <= set(stored)
        assert stored == list(range(1, len(stored) + 1))
        more = await store.append("crash-00", "instance_updated", {})
        assert more.seq == len(stored) + 1
        await store.close()
        with EventLog.open(db_path) as log:
            result = audit(log.events())
        assert result.violations == []
        assert result.events == len(stored) + 1


class TestEventLog:
    """The synchronous reader the CLI uses."""

    def test_a_missing_file_reads_as_empty_and_is_not_created(self, db_path: Path) -> None:
        with EventLog.open(db_path) as log:
            assert list(log.events()) == []
            assert log.count() == 0
        assert not db_path.parent.exists()

    def test_events_match_what_the_store_wrote(self, sample_log: Sample) -> None:
        built = sample_log.log.events
        with EventLog.open(sample_log.path) as log:
            assert list(log.events()) == built
            assert log.count() == len(built)
            web = built[1].stream
            assert list(log.events(stream=web, last=2)) == [e for e in built if e.stream == web][-2:]
            until = parse_time(built[4].at)
            assert list(log.events(until=until)) == built[:5]

    @pytest.mark.parametrize(
        ("ref", "expected"),
        [
            ("a1b2c3d4e5f60001", "a1b2c3d4e5f60001"),
            ("a1b2c3d4e5f60002", "a1b2c3d4e5f60002"),
            ("web", "a1b2c3d4e5f60001"),
            ("api", "a1b2c3d4e5f60002"),
            ("b7e8f9000000a", "b7e8f9000000aaaa"),
            ("hub", "hub"),
        ],
    )
    def test_resolve(self, sample_log: Sample, ref: str, expected: str) -> None:
        with EventLog.open(sample_log.path) as log:
            assert log.resolve(ref) == expected

    @pytest.mark.parametrize(
        ("ref", "message"),
        [
            ("a1b2", "'a1b2' matches 2 instances: a1b2c3d4e5f60001, a1b2c3d4e5f60002"),
            ("docs", "2 instances are named 'docs': b7e8f9000000aaaa, b7e8f9000000bbbb"),
            ("zzz", "no instance matches 'zzz'"),
            ("h", "no instance matches 'h'"),
            ("", "no instance matches ''"),
        ],
    )
    def test_resolve_refuses(self, sample_log: Sample, ref: str, message: str) -> None:
        with EventLog.open(sample_log.path) as log, pytest.raises(
            (AmbiguousInstance, UnknownInstance)
        ) as caught:
            log.resolve(ref)
        assert str(caught.value) == message

    def test_a_renamed_instance_resolves_by_its_latest_name(
        self, tmp_path: Path, log_builder: LogBuilder
    ) -> None:
        log_builder.discover("abc", "old")
        log_builder.add("abc", "instance_updated", {"name": "new"})
        path = log_builder.write(tmp_path / "renamed.db")
        with EventLog.open(path) as reader:
            assert reader.resolve("new") == "abc"
            with pytest.raises(UnknownInstance):
                reader.resolve("old")


async def test_each_stored_hash_is_the_chain_link_of_its_row(tmp_path: Path) -> None:
    """The writer builds the chain's canonical bytes itself (inlined); they must be `link`'s."""
    from fsm_hub.core.chain import GENESIS, link

    store = await EventStore.open(tmp_path / "chain.db")
    try:
        await asyncio.gather(
            *(store.append(f"s{n % 7}", "transition", {"n": n, "text": "ünïcode ☃"}) for n in range(50))
        )
    finally:
        await store.close()
    previous = GENESIS
    with sqlite3.connect(tmp_path / "chain.db") as db:
        rows = db.execute("SELECT seq, stream, version, type, at, data, hash FROM events ORDER BY seq")
        for seq, stream, version, kind, at, data, stored in rows:
            previous = link(previous, seq, stream, version, kind, at, data)
            assert stored == previous, seq
    db.close()
