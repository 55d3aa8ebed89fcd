"""The audit trail: hash chains under concurrent appends, tamper detection at the right row,
the batch writer's spool (exactly-once replay, order, torn lines) and ``muster audit verify``,
on SQLite and Postgres."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from muster import AsyncAdminClient, AsyncClient, TaskState
from muster.cli import main
from muster.server.app import ServerHandle, start_server
from muster.server.audit import AuditRecord, AuditWriter, record_in
from muster.server.audit.chain import COLUMNS, GENESIS, link, row_hash
from muster.server.audit.record import _tips as tips
from muster.server.audit.record import append_new
from muster.server.audit.spool import Segment, adopt_all, decode, encode
from muster.server.audit.verify import verify
from muster.server.clock import ManualClock
from muster.server.storage import migrate
from muster.server.storage.batch import GroupCommit
from muster.server.storage.database import Database
from muster.server.storage.models import AuditEvent, Base
from muster.server.storage.roles import apply_roles
from tests.conftest import client_config, server_config
from tests.pg import admin_execute, database_name, fresh_database, unique_name
from tests.pg import database_url as pg_database_url

pytestmark = pytest.mark.slow

BACKENDS = ["sqlite", "postgresql"]


async def open_db(url: str, chain: str = "r1", pool_size: int = 8) -> Database:
    db = Database(url, audit_chain=chain, pool_size=pool_size)
    if db.dialect == "sqlite":
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)  # no append-only trigger: tamperable
    return db


@pytest.fixture(params=BACKENDS)
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'muster.db'}"
    else:
        async with fresh_database() as url:
            yield url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_db(db_url)
    try:
        yield database
    finally:
        await database.close()


def event(n: int, **overrides: object) -> AuditRecord:
    values: dict[str, object] = {
        "actor": "tester",
        "action": "test.event",
        "target": f"t{n}",
        "details": {"n": n},
    }
    values.update(overrides)
    return AuditRecord(**values)  # type: ignore[arg-type]


async def tamper(db: Database, *statements: str) -> None:
    """Run statements as the owner would, past the append-only trigger (if there is one)."""
    async with db.engine.begin() as conn:
        if db.dialect == "postgresql":
            # Superuser only: triggers do not fire for this session (what an attacker with
            # the owner's keys could do, and what verify must catch).
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
        for statement in statements:
            await conn.execute(text(statement))


async def rows_by_seq(db: Database, chain: str = "r1") -> list[AuditEvent]:
    async with db.transaction() as session:
        query = select(AuditEvent).where(AuditEvent.chain == chain).order_by(AuditEvent.seq)
        return list((await session.execute(query)).scalars())


# Chains under concurrency


async def test_chain_verifies_after_concurrent_in_transaction_and_batch_appends(
    db: Database,
) -> None:
    writer = AuditWriter(db, batch_size=50, flush_interval=0.01)
    writer.start()

    async def in_transaction(worker: int) -> None:
        for i in range(10):
            async with db.transaction() as session:
                await record_in(session, event(i, actor=f"tx{worker}"), event(i, actor="pair"))

    async def batched(worker: int) -> None:
        for i in range(100):
            await writer.submit(event(i, actor=f"batch{worker}"))
            if i % 10 == 0:
                await asyncio.sleep(0)

    try:
        await asyncio.gather(
            *(in_transaction(w) for w in range(12)), *(batched(w) for w in range(6))
        )
        await writer.flush()
    finally:
        await writer.close()

    report = await verify(db)
    assert report.ok, report.breaks
    assert report.rows == 12 * 10 * 2 + 6 * 100
    assert [c.chain for c in report.chains] == ["r1"]
    rows = await rows_by_seq(db)
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    for worker in range(6):  # the batch writer keeps each producer's order
        mine = [r.details["n"] for r in rows if r.actor == f"batch{worker}"]
        assert mine == list(range(100))


# Transitions and their audit rows, committed together (the group commit)


async def probe_table(db: Database) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE probe (n integer NOT NULL)"))


async def probed(db: Database) -> list[int]:
    async with db.engine.connect() as conn:
        return sorted((await conn.execute(text("SELECT n FROM probe"))).scalars())


async def put(conn: AsyncConnection, items: Sequence[int]) -> list[int]:
    """A transition: rows into the probe table; ``-1`` fails after writing its row."""
    for n in items:
        await conn.execute(text("INSERT INTO probe (n) VALUES (:n)"), {"n": abs(n)})
        if n < 0:
            raise ZeroDivisionError(n)
    return list(items)


def audited(n: int) -> list[AuditRecord]:
    """The audit records of transition ``n``; none for 0, a record that cannot be stored
    (a naive time) for 13."""
    if n == 0:
        return []
    if n == 13:
        return [event(n, time=datetime(2026, 1, 1))]
    return [event(n)]


async def test_transitions_commit_with_their_audit_rows_and_fail_without_them(
    db: Database,
) -> None:
    await probe_table(db)
    # Gathered into one transaction: 13's record and -4's work fail it, so every item
    # runs again alone and only those two callers see an error.
    futures = [db.group.submit_many("probe", put, n, audit=audited) for n in (1, 0, 13, -4, 5, 6)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[:2] == [1, 0] and results[4:] == [5, 6]
    assert isinstance(results[2], ValueError)  # no audit, no change
    assert isinstance(results[3], ZeroDivisionError)
    assert await probed(db) == [0, 1, 5, 6]
    assert [r.target for r in await rows_by_seq(db)] == ["t1", "t5", "t6"]
    assert db.group.transactions >= 1

    await db.group.run(lambda conn: put(conn, [7]), audit=lambda _: [event(7)])
    await db.group.record([event(8), event(9)])
    assert await probed(db) == [0, 1, 5, 6, 7]
    assert [r.target for r in await rows_by_seq(db)] == ["t1", "t5", "t6", "t7", "t8", "t9"]
    assert (await verify(db)).ok


async def test_audited_transitions_interleave_with_other_appends_on_one_chain(
    db: Database,
) -> None:
    """The group commit, transactions of their own and the batch writer all append to the
    replica's chain at once: no gap, no fork, nothing lost."""
    await probe_table(db)
    writer = AuditWriter(db, batch_size=20, flush_interval=0.01)
    writer.start()

    async def grouped(worker: int) -> None:
        for i in range(30):
            await db.group.run_many(
                "probe", put, worker * 100 + i, audit=lambda n: [event(n, actor="group")]
            )

    async def own(worker: int) -> None:
        for i in range(10):
            async with db.transaction() as session:
                await session.execute(text("INSERT INTO probe (n) VALUES (:n)"), {"n": -i})
                await record_in(session, event(i, actor=f"own{worker}"))

    async def batched() -> None:
        for i in range(100):
            await writer.submit(event(i, actor="batch"))

    try:
        await asyncio.gather(
            *(grouped(w) for w in range(8)), *(own(w) for w in range(4)), batched()
        )
        await writer.flush()
    finally:
        await writer.close()
    report = await verify(db)
    assert report.ok, report.breaks
    assert report.rows == 8 * 30 + 4 * 10 + 100
    assert len(await probed(db)) == 8 * 30 + 4 * 10


async def test_audit_only_in_a_group_commit_that_has_a_trail() -> None:
    group = GroupCommit(create_async_engine("sqlite+aiosqlite://"))
    with pytest.raises(RuntimeError, match="no audit trail"):
        await group.record([event(1)])


async def test_keep_returns_once_the_event_is_spooled_while_the_database_is_away(
    pg_url: str, tmp_path: Path
) -> None:
    """What the stream events fall back on: durable on local disk before going on."""
    db = await open_db(pg_url, pool_size=2)
    writer = AuditWriter(db, spool_path=tmp_path / "spool", flush_interval=0.01, db_timeout=1.0)
    writer.start()
    try:
        await writer.keep(event(1))
        assert writer.spool_bytes == 0  # the database took it
        await cut(pg_url)
        await asyncio.wait_for(writer.keep(event(2)), 10)
        assert writer.spool_bytes > 0  # on disk (fsynced), not in memory
        segments = list((tmp_path / "spool").glob("*.jsonl"))
        assert [decode(line).target for s in segments for line in s.read_bytes().splitlines()] == [
            "t2"
        ]
        await restore(pg_url)
        await asyncio.wait_for(writer.flush(), 10)
    finally:
        await writer.close()
    assert [r.target for r in await rows_by_seq(db)] == ["t1", "t2"]
    await db.close()


async def test_a_task_the_reaper_times_out_has_its_finish_row(
    tmp_path: Path, backend: dict[str, object]
) -> None:
    clock = ManualClock()
    handle = await start_server(server_config(tmp_path / "data", **backend), clock=clock)
    try:
        async with AsyncClient(client_config(handle)) as client:
            await clock.wait_for_sleepers(2)  # the reaper and the certificate renewal
            task = await client.submit("echo", b"", pool="nobody", schedule_to_start_timeout=30)
            clock.advance(31)
            await clock.wait_for_sleepers(2)
            assert (await client.get(task.task_id)).state is TaskState.TIMED_OUT
        async with handle.db.transaction() as session:
            rows = (
                await session.execute(
                    select(AuditEvent.action, AuditEvent.details)
                    .where(AuditEvent.target == task.task_id)
                    .order_by(AuditEvent.seq)
                )
            ).all()
        assert [(action, details.get("state")) for action, details in rows] == [
            ("task.submit", None),
            ("task.finish", "TIMED_OUT"),
        ]
        assert rows[1][1]["reason"].startswith("schedule-to-start timeout exceeded")
    finally:
        await handle.stop(grace=1.0)


async def test_two_replicas_append_to_their_own_chains(db_url: str) -> None:
    a, b = await open_db(db_url, "replica-a"), await open_db(db_url, "replica-b")
    try:

        async def append(database: Database) -> None:
            for i in range(20):
                async with database.transaction() as session:
                    await record_in(session, event(i))

        await asyncio.gather(append(a), append(b))
        report = await verify(a)
        assert report.ok
        assert [(c.chain, c.rows) for c in report.chains] == [("replica-a", 20), ("replica-b", 20)]
        only_b = await verify(a, "replica-b")
        assert [(c.chain, c.rows) for c in only_b.chains] == [("replica-b", 20)]
    finally:
        await a.close()
        await b.close()


async def test_a_wrong_guess_of_the_tip_is_found_and_the_chain_stays_whole(db: Database) -> None:
    """On Postgres an append guesses the tip (this process's last append) instead of reading
    it; a rolled-back append, or another process on the same chain, makes the guess wrong."""

    async def append(*records: AuditRecord) -> None:
        async with db.transaction() as session:
            await session.execute(text("SELECT 1"))  # the transaction has begun, as usual
            await record_in(session, *records)

    await append(event(1))
    with pytest.raises(ZeroDivisionError):  # rolled back after its rows were linked
        async with db.transaction() as session:
            await record_in(session, event(2), event(3))
            _ = 1 / 0
    await append(event(4))
    tip = tips.get("r1")
    await append(event(5), event(6))  # as if by another process: the guess falls behind
    if tip is not None:
        tips["r1"] = tip
    await append(event(7))
    if tip is not None:
        tips["r1"] = (tip[0] + 1, tip[1])  # the right seq with the wrong hash
    await append(event(8))
    rows = await rows_by_seq(db)
    assert [(r.seq, r.target) for r in rows] == list(
        enumerate(["t1", "t4", "t5", "t6", "t7", "t8"], start=1)
    )
    assert (await verify(db)).ok


async def test_append_new_skips_events_already_stored(db: Database) -> None:
    """A batch whose commit went through but whose acknowledgement was lost is not doubled."""
    batch = [event(i) for i in range(5)]
    async with db.transaction() as session:
        assert await append_new(session, batch[:3]) == 3
    async with db.transaction() as session:
        assert await append_new(session, [*batch, batch[4]]) == 2
    rows = await rows_by_seq(db)
    assert [r.event_id for r in rows] == [e.event_id for e in batch]
    assert (await verify(db)).ok


def test_row_hash_covers_the_time_in_utc_whatever_its_zone() -> None:
    record = event(1, time=datetime(2024, 5, 1, 14, 0, tzinfo=UTC))
    row = as_stored(link([record.content()], "c", (0, GENESIS))[0])
    shifted = {**row, "time": row["time"].astimezone(timezone(timedelta(hours=2)))}
    assert row_hash(row) == row_hash(shifted)
    assert row_hash(row) != row_hash({**row, "time": row["time"] + timedelta(microseconds=1)})


def as_stored(row: tuple[object, ...]) -> dict[str, Any]:
    """A linked row as the database hands it back (details parsed)."""
    values = dict(zip(COLUMNS, row, strict=True))
    values["details"] = json.loads(str(values["details"]))
    return values


def tricky_events() -> list[AuditRecord]:
    """Records whose canonical encoding is easy to get wrong."""
    west = timezone(timedelta(hours=-3))
    return [
        event(1, actor='quote " backslash \\ tab \t nul \x00 é 😀 \u2028', target="x" * 500),
        event(2, details={10: "int keys", 9: ("a", "tuple"), "n": {"b": [1, 2.5, None], "a": {}}}),
        event(3, details={"f": 1e16, "neg": -0.0, "big": 10**30}, time=datetime.now(west)),
        event(4, actor="", action="", outcome="", details={}),
    ]


def test_linked_hashes_are_the_row_hash_of_what_the_database_returns() -> None:
    rows = [
        as_stored(row) for row in link([r.content() for r in tricky_events()], "ü", (7, "a" * 64))
    ]
    assert [r["seq"] for r in rows] == [8, 9, 10, 11]
    assert [r["prev_hash"] for r in rows] == ["a" * 64] + [r["hash"] for r in rows[:-1]]
    assert all(row_hash(r) == r["hash"] for r in rows)
    assert rows[0]["actor"].endswith("\ufffd é 😀 \u2028") and len(rows[0]["target"]) == 200
    assert rows[1]["details"] == {
        "10": "int keys",
        "9": ["a", "tuple"],
        "n": {"a": {}, "b": [1, 2.5, None]},
    }


async def test_tricky_records_are_stored_as_hashed(db: Database) -> None:
    async with db.transaction() as session:
        assert await append_new(session, tricky_events()) == 4  # COPY on Postgres
    async with db.transaction() as session:
        await record_in(session, *tricky_events())  # INSERT
    assert (await verify(db)).rows == 8
    assert (await verify(db)).ok


def test_records_that_could_never_be_stored_are_refused_at_once() -> None:
    circular: dict[str, object] = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        event(1, details={"x": float("nan")}).check()
    with pytest.raises(ValueError):
        event(1, details={"x": [circular]}).check()
    with pytest.raises(TypeError):
        event(1, details={"x": object()}).check()
    with pytest.raises(TypeError):
        event(1, actor=None).check()
    with pytest.raises(ValueError):
        event(1, target="lone \ud800 surrogate").check()
    with pytest.raises(ValueError):
        event(1, details={"lone": "\udfff"}).check()
    with pytest.raises(ValueError):
        event(1, time=datetime(2024, 1, 1)).check()
    event(1).check()


# Tampering


async def chain_of(db: Database, count: int = 10) -> list[AuditEvent]:
    for i in range(count):
        async with db.transaction() as session:
            await record_in(session, event(i + 1))
    return await rows_by_seq(db, db.audit_chain)


async def test_verify_reports_a_changed_row_at_that_row(db: Database) -> None:
    rows = await chain_of(db)
    await tamper(db, f"UPDATE audit_events SET details = '{{\"n\": 99}}' WHERE id = {rows[4].id}")
    report = await verify(db)
    assert not report.ok
    assert [str(b) for b in report.breaks] == [
        f"chain r1: row seq 5 (id {rows[4].id}): hash mismatch"
    ]
    assert report.rows == 10


async def test_verify_reports_a_rehashed_row_at_the_next_link(db: Database) -> None:
    rows = await chain_of(db)
    forged = {**rows[4].__dict__, "actor": "someone-else"}
    await tamper(
        db,
        f"UPDATE audit_events SET actor = 'someone-else', hash = '{row_hash(forged)}' "
        f"WHERE id = {rows[4].id}",
    )
    (broken,) = (await verify(db)).breaks
    assert str(broken) == f"chain r1: row seq 6 (id {rows[5].id}): prev_hash does not match seq 5"


async def test_verify_reports_a_deleted_row_as_a_gap(db: Database) -> None:
    rows = await chain_of(db)
    await tamper(db, f"DELETE FROM audit_events WHERE id = {rows[6].id}")
    (broken,) = (await verify(db)).breaks
    assert (broken.seq, broken.id, broken.problem) == (8, rows[7].id, "gap after seq 6")


async def test_verify_reports_a_deleted_first_row(db: Database) -> None:
    rows = await chain_of(db, 3)
    await tamper(db, f"DELETE FROM audit_events WHERE id = {rows[0].id}")
    (broken,) = (await verify(db)).breaks
    assert (broken.seq, broken.problem) == (2, "gap after seq 0")


async def test_verify_reports_swapped_rows_at_the_first_of_them(db: Database) -> None:
    rows = await chain_of(db)
    a, b = rows[3].id, rows[4].id
    await tamper(
        db,
        f"UPDATE audit_events SET seq = -1 WHERE id = {a}",
        f"UPDATE audit_events SET seq = 4 WHERE id = {b}",
        f"UPDATE audit_events SET seq = 5 WHERE id = {a}",
    )
    (broken,) = (await verify(db)).breaks
    assert (broken.seq, broken.id, broken.problem) == (4, b, "hash mismatch")


async def test_verify_reports_each_broken_chain_once_and_passes_the_others(db_url: str) -> None:
    a, b = await open_db(db_url, "a"), await open_db(db_url, "b")
    try:
        rows_a = await chain_of(a)
        await chain_of(b)
        await tamper(
            a,
            "UPDATE audit_events SET outcome = 'denied' "
            f"WHERE id IN ({rows_a[2].id}, {rows_a[7].id})",
        )
        report = await verify(a)
        assert [(x.chain, x.seq) for x in report.breaks] == [("a", 3)]
        assert [(c.chain, c.rows, c.broken is None) for c in report.chains] == [
            ("a", 10, False),
            ("b", 10, True),
        ]
        assert report.summary() == "FAILED: 1 of 2 chains broken (20 rows read)"
    finally:
        await a.close()
        await b.close()


async def test_verify_streams_pages(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("muster.server.audit.verify.PAGE_ROWS", 7)
    async with db.transaction() as session:
        await record_in(session, *(event(i) for i in range(50)))
    rows = await rows_by_seq(db)
    await tamper(db, f"UPDATE audit_events SET target = 'x' WHERE id = {rows[31].id}")
    report = await verify(db)
    assert [(b.seq, b.problem) for b in report.breaks] == [(32, "hash mismatch")]
    assert report.rows == 50


# The spool


def test_spool_lines_round_trip_and_detect_damage() -> None:
    record = event(7, details={"nested": {"k": [1, 2.5, "ü", None]}}, peer="::1")
    line = encode(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == record
    with pytest.raises(ValueError, match="CRC"):
        decode(line.replace(b"t7", b"t8"))
    with pytest.raises(ValueError, match="JSON"):
        decode(line[:-10])


def test_a_torn_last_line_is_cut_off_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    segment = Segment.create(tmp_path)
    records = [event(i) for i in range(3)]
    segment.append(records)
    segment.close()
    with segment.path.open("ab") as f:  # a crash in the middle of the next append
        f.write(encode(event(99))[:-20])
    caplog.set_level(logging.WARNING)
    (adopted,) = adopt_all(tmp_path)
    assert "torn last line" in caplog.text
    assert adopted.read(0, 100) == (records, adopted.size)
    assert adopted.size == segment.path.stat().st_size
    adopted.append([event(4)])  # appends after the cut are whole lines again
    assert len(adopted.read(0, 100)[0]) == 4
    adopted.close()


def test_a_damaged_line_is_skipped_with_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    segment = Segment.create(tmp_path)
    records = [event(i) for i in range(3)]
    segment.append(records)
    segment.close()
    data = segment.path.read_bytes()
    segment.path.write_bytes(data.replace(b'"t1"', b'"tX"'))
    (adopted,) = adopt_all(tmp_path)
    got, end = adopted.read(0, 100)
    assert got == [records[0], records[2]] and end == adopted.size
    assert "damaged line" in caplog.text
    adopted.close()


def test_a_segment_held_by_a_writer_is_not_adopted_by_another(tmp_path: Path) -> None:
    held = Segment.create(tmp_path)
    held.append([event(1)])
    assert adopt_all(tmp_path) == []
    held.close()
    (adopted,) = adopt_all(tmp_path)
    assert adopted.path == held.path
    adopted.remove()
    assert list(tmp_path.iterdir()) == []


def test_reading_pages_through_a_segment(tmp_path: Path) -> None:
    segment = Segment.create(tmp_path)
    records = [event(i, details={"pad": "x" * 5000}) for i in range(40)]
    segment.append(records)
    got: list[AuditRecord] = []
    offset = 0
    while offset < segment.size:
        page, offset = segment.read(offset, 7)
        assert len(page) <= 7
        got += page
    assert got == records
    segment.close()


# The writer and its spool, against a real outage


async def cut(url: str) -> None:
    """Refuse new connections to the database and end the open ones."""
    name = database_name(url)
    await admin_execute(
        f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
    )


async def restore(url: str) -> None:
    await admin_execute(f'ALTER DATABASE "{database_name(url)}" ALLOW_CONNECTIONS true')


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        try:
            yield url
        finally:
            await restore(url)


async def stored_ids(db: Database) -> list[str]:
    async with db.transaction() as session:
        query = select(AuditEvent.event_id).order_by(AuditEvent.chain, AuditEvent.seq)
        return list((await session.execute(query)).scalars())


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_writer_spools_during_an_outage_and_replays_in_order(
    pg_url: str, tmp_path: Path
) -> None:
    db = await open_db(pg_url, pool_size=2)
    writer = AuditWriter(
        db,
        spool_path=tmp_path / "spool",
        max_queue=50,
        batch_size=20,
        flush_interval=0.01,
        db_timeout=2.0,
    )
    writer.start()
    produced = [event(i) for i in range(2000)]
    deepest = 0

    async def submit(records: list[AuditRecord]) -> None:
        nonlocal deepest
        for record in records:
            await writer.submit(record)
            deepest = max(deepest, writer.depth)

    try:
        await submit(produced[:100])
        await writer.flush()
        await cut(pg_url)
        # Far more than the buffer holds: accepted all the same, because they go to disk.
        await asyncio.wait_for(submit(produced[100:1000]), 10)
        await wait_until(lambda: writer.depth == 0)
        assert writer.spool_bytes > 0
        await restore(pg_url)
        # Events keep coming while the spool is replayed: they go behind it, not around it.
        await asyncio.wait_for(submit(produced[1000:]), 10)
        await asyncio.wait_for(writer.flush(), 10)
        await wait_until(lambda: writer.spool_bytes == 0)
        assert list((tmp_path / "spool").glob("*.jsonl")) == []
    finally:
        await writer.close()
    assert deepest <= 2 * 50  # the buffer, and as much again on its way to the spool
    assert await stored_ids(db) == [r.event_id for r in produced]
    assert (await verify(db)).ok
    await db.close()


async def test_close_during_an_outage_spools_and_the_next_start_replays(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    db = await open_db(pg_url, pool_size=2)
    first = AuditWriter(db, spool_path=spool, flush_interval=0.01, db_timeout=2.0)
    first.start()
    before = [event(i) for i in range(50)]
    await cut(pg_url)
    for record in before:
        await first.submit(record)
    await first.close()  # never drops: the database is away, so the spool keeps them
    await db.close()
    (segment,) = spool.glob("*.jsonl")
    assert segment.stat().st_size > 0
    with segment.open("ab") as f:
        f.write(b'{"v":1,"event_id":"torn')  # and the process died mid-append

    await restore(pg_url)
    db = await open_db(pg_url, pool_size=2)
    caplog.set_level(logging.WARNING)
    second = AuditWriter(db, spool_path=spool, flush_interval=0.01)
    second.start()
    assert second.spool_bytes > 0
    after = [event(i) for i in range(50, 60)]
    try:
        for record in after:
            await second.submit(record)
        await asyncio.wait_for(second.flush(), 10)
    finally:
        await second.close()
    assert "torn last line" in caplog.text
    assert await stored_ids(db) == [r.event_id for r in before + after]
    assert list(spool.glob("*.jsonl")) == []
    assert (await verify(db)).ok
    await db.close()


async def test_replay_after_a_lost_commit_acknowledgement_inserts_nothing_twice(
    db: Database, tmp_path: Path
) -> None:
    """The batch was committed, but the writer saw an error and spooled it too."""
    batch = [event(i) for i in range(20)]
    async with db.transaction() as session:
        await record_in(session, *batch[:10])
    segment = Segment.create(tmp_path)
    segment.append(batch)
    segment.close()
    writer = AuditWriter(db, spool_path=tmp_path, flush_interval=0.01)
    writer.start()
    try:
        await wait_until(lambda: writer.spool_bytes == 0)
        await writer.flush()
    finally:
        await writer.close()
    assert await stored_ids(db) == [r.event_id for r in batch]
    assert not (tmp_path / "rejected.jsonl").exists()  # skipped, not refused as duplicates
    assert (await verify(db)).ok


async def test_an_event_the_database_refuses_is_set_aside_not_blocking(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = await open_db(pg_url)
    await tamper(db, "ALTER TABLE audit_events ADD CONSTRAINT no_poison CHECK (action <> 'poison')")
    writer = AuditWriter(db, spool_path=tmp_path, flush_interval=0.01)
    writer.start()
    good = [event(i) for i in range(6)]
    poison = event(99, action="poison")
    try:
        for record in [*good[:3], poison, *good[3:]]:
            await writer.submit(record)
        await asyncio.wait_for(writer.flush(), 10)
    finally:
        await writer.close()
    assert await stored_ids(db) == [r.event_id for r in good]
    assert f"audit event {poison.event_id} (poison) refused by the database" in caplog.text
    assert [decode(line) for line in (tmp_path / "rejected.jsonl").read_bytes().splitlines()] == [
        poison
    ]
    assert (await verify(db)).ok
    await db.close()


async def test_the_verify_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    assert await asyncio.to_thread(main, ["audit", "verify", "--data-dir", str(data)]) == 1
    assert "no database at" in capsys.readouterr().err
    data.mkdir()
    db = await open_db(f"sqlite+aiosqlite:///{data / 'muster.db'}")
    try:
        rows = await chain_of(db, 5)
        args = ["audit", "verify", "--data-dir", str(data)]
        assert await asyncio.to_thread(main, args) == 0
        assert capsys.readouterr().out == "OK: 5 rows in 1 chains\n"
        assert await asyncio.to_thread(main, [*args, "--chain", "nope"]) == 1
        assert capsys.readouterr().out == "chain nope: no rows\n"
        await tamper(db, f"UPDATE audit_events SET action = 'x' WHERE id = {rows[1].id}")
        assert await asyncio.to_thread(main, args) == 1
        assert capsys.readouterr().out.splitlines() == [
            f"chain r1: row seq 2 (id {rows[1].id}): hash mismatch",
            "FAILED: 1 of 1 chains broken (5 rows read)",
        ]
    finally:
        await db.close()


async def test_the_verify_command_on_postgres(
    pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await open_db(pg_url)
    try:
        await chain_of(db, 4)
    finally:
        await db.close()
    monkeypatch.setenv("MUSTER_DATABASE_URL", pg_url)
    assert await asyncio.to_thread(main, ["audit", "verify"]) == 0
    assert capsys.readouterr().out == "OK: 4 rows in 1 chains\n"
    bad = pg_url.rsplit("/", 1)[0] + "/no_such_database_here"
    assert await asyncio.to_thread(main, ["audit", "verify", "--database-url", bad]) == 1
    err = capsys.readouterr().err
    assert "cannot read the audit trail" in err and "Traceback" not in err


# muster audit query, against a real server


async def test_query_filters_by_actor_action_and_time_newest_first(
    server: ServerHandle, admin: AsyncAdminClient, capsys: pytest.CaptureFixture[str]
) -> None:
    base = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    # Inserted out of time order (a replayed spool does that): newest first means by time.
    times = {"t3": 3, "t1": 1, "t5": 5, "t2": 2, "t4": 4}
    async with server.db.transaction() as session:
        for target, minutes in times.items():
            actor = "alice" if minutes % 2 else "bob"
            at = base + timedelta(minutes=minutes)
            await record_in(
                session, event(minutes, actor=actor, action="test.q", target=target, time=at)
            )
        await record_in(session, event(9, action="other", target="x", time=base))

    async def targets(**filters: object) -> list[str]:
        found = await admin.query_audit(**filters)  # type: ignore[arg-type]
        return [e.target for e in found]

    assert await targets(action="test.q") == ["t5", "t4", "t3", "t2", "t1"]
    assert await targets(action="test.q", actor="alice") == ["t5", "t3", "t1"]
    # since is inclusive, until exclusive, both to the microsecond.
    since, until = base + timedelta(minutes=2), base + timedelta(minutes=4)
    assert await targets(action="test.q", since=since, until=until) == ["t3", "t2"]
    assert await targets(action="test.q", since=since - timedelta(microseconds=1)) == [
        "t5",
        "t4",
        "t3",
        "t2",
    ]
    assert await targets(action="test.q", until=until + timedelta(microseconds=1)) == [
        "t4",
        "t3",
        "t2",
        "t1",
    ]
    assert await targets(action="test.q", limit=2) == ["t5", "t4"]
    got = await admin.query_audit(action="test.q", since=since, until=until)
    assert [e.time for e in got] == [base + timedelta(minutes=3), since]

    config = server.config
    conn = [
        "--addr",
        server.api_address,
        "--token-file",
        str(config.admin_token_file),
        "--ca-file",
        str(config.ca_dir / "bundle.pem"),
    ]
    args = ["audit", "query", "--action", "test.q", "--json", *conn]
    window = ["--since", "2024-05-01T12:02:00Z", "--until", "2024-05-01T14:04:00+02:00"]
    capsys.readouterr()
    assert await asyncio.to_thread(main, [*args, *window]) == 0
    assert [e["target"] for e in json.loads(capsys.readouterr().out)] == ["t3", "t2"]
    assert await asyncio.to_thread(main, [*args, "--actor", "bob", "--since", "-100000d"]) == 0
    assert [e["target"] for e in json.loads(capsys.readouterr().out)] == ["t4", "t2"]
    assert await asyncio.to_thread(main, [*args, "--since", "1h"]) == 0  # an hour ago: none
    assert json.loads(capsys.readouterr().out) == []


async def test_a_hanging_database_does_not_stop_events_being_accepted(
    pg_url: str, tmp_path: Path
) -> None:
    """Not refused but stuck (a lock, a black-holed network): events go to disk meanwhile."""
    db = await open_db(pg_url, pool_size=2)
    writer = AuditWriter(
        db,
        spool_path=tmp_path / "spool",
        max_queue=40,
        batch_size=10,
        flush_interval=0.01,
        db_timeout=30.0,
    )
    writer.start()
    produced = [event(i) for i in range(600)]
    blocker = db.engine.connect()
    conn = await blocker.start()
    try:
        await conn.begin()
        await conn.execute(text("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE"))
        for record in produced[:300]:
            await asyncio.wait_for(writer.submit(record), 5)
        await wait_until(lambda: writer.depth == 0)
        assert writer.spool_bytes > 0
        await conn.rollback()
        for record in produced[300:]:
            await asyncio.wait_for(writer.submit(record), 5)
        await asyncio.wait_for(writer.flush(), 10)
    finally:
        await conn.close()
        await writer.close()
    assert await stored_ids(db) == [r.event_id for r in produced]
    assert (await verify(db)).ok
    await db.close()


async def test_a_slow_database_gets_back_pressure_not_the_spool(
    pg_url: str, tmp_path: Path
) -> None:
    """Slower than the producers but answering: they wait, and nothing is spooled."""
    db = await open_db(pg_url, pool_size=2)
    writer = AuditWriter(
        db, spool_path=tmp_path / "spool", max_queue=40, batch_size=10, flush_interval=0.01
    )
    writer.start()
    produced = [event(i) for i in range(200)]
    blocker = db.engine.connect()
    conn = await blocker.start()
    try:
        await conn.begin()
        await conn.execute(text("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE"))
        submitting = asyncio.ensure_future(submit_all(writer, produced))
        await wait_until(lambda: writer.depth >= 40)
        await asyncio.sleep(0.5)  # a slow write, well within stall_timeout
        assert not submitting.done()  # the full buffer holds the producer back
        await conn.rollback()
        await asyncio.wait_for(submitting, 10)
        await asyncio.wait_for(writer.flush(), 10)
    finally:
        await conn.close()
        await writer.close()
    assert not (tmp_path / "spool").exists()
    assert await stored_ids(db) == [r.event_id for r in produced]
    assert (await verify(db)).ok
    await db.close()


async def submit_all(writer: AuditWriter, records: list[AuditRecord]) -> None:
    for record in records:
        await writer.submit(record)


async def test_a_backlog_is_written_in_bigger_batches(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []

    async def counted(session: Any, records: list[AuditRecord], *, unseen: bool = False) -> int:
        sizes.append(len(records))
        return await append_new(session, records, unseen=unseen)

    monkeypatch.setattr("muster.server.audit.writer.append_new", counted)
    writer = AuditWriter(db, max_queue=300, batch_size=10, max_batch=100, flush_interval=0.01)
    writer.start()
    produced = [event(i) for i in range(600)]
    try:
        await submit_all(writer, produced)  # yields only when the buffer is full
        await writer.flush()
    finally:
        await writer.close()
    assert sum(sizes) == 600 and max(sizes) == 100
    assert await stored_ids(db) == [r.event_id for r in produced]
    assert (await verify(db)).ok


async def test_the_application_role_appends_with_copy() -> None:
    """COPY needs no more than the INSERT the least-privileged role has on the trail."""
    owner, app = unique_name("muster_o"), unique_name("muster_a")
    try:
        async with fresh_database(migrated=False) as url:
            await apply_roles(url, owner=owner, app=app)
            name = database_name(url)
            await migrate.upgrade(pg_database_url(name, user=owner))
            db = await open_db(pg_database_url(name, user=app))
            writer = AuditWriter(db, flush_interval=0.01)
            writer.start()
            produced = [event(i) for i in range(50)]
            try:
                await submit_all(writer, produced)
                await writer.flush()
            finally:
                await writer.close()
            assert await stored_ids(db) == [r.event_id for r in produced]
            assert (await verify(db)).ok
            await db.close()
    finally:
        await admin_execute(f'DROP ROLE IF EXISTS "{app}"', f'DROP ROLE IF EXISTS "{owner}"')
