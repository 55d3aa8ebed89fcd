"""The task store's contract (server/storage/taskstore/base.py), one test per rule, run
against the configured backend: SQLite in the embedded pass, Postgres in the Postgres
pass (``MUSTER_TEST_BACKEND=postgres``). Races use two stores on one database, as two
replicas would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from muster import TaskState
from muster.server.storage import usage as usage_store
from muster.server.storage.database import Database
from muster.server.storage.models import Base, Task
from muster.server.storage.taskstore import (
    Acceptance,
    Claimed,
    ClaimRequest,
    Current,
    Ending,
    Finished,
    HoldBack,
    Retry,
    TimedOut,
)
from muster.server.storage.taskstore.postgres import PostgresTaskStore
from muster.server.storage.taskstore.sqlite import SqliteTaskStore
from muster.server.storage.types import utcnow
from muster.server.storage.usage import AttemptCost
from muster.states import State
from muster.v1 import common_pb2

LEASE = timedelta(seconds=30)

OpenDatabase = Callable[[], Awaitable[Database]]


@pytest.fixture
async def open_db(backend: dict[str, object], tmp_path: Path) -> AsyncIterator[OpenDatabase]:
    """Opens Databases on one shared database of the configured backend (closed after)."""
    url = str(backend.get("database_url") or f"sqlite+aiosqlite:///{tmp_path / 'muster.db'}")
    opened: list[Database] = []

    async def open_one() -> Database:
        database = Database(url, audit_chain=f"t{len(opened)}")
        if not opened and database.dialect == "sqlite":
            async with database.engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
        opened.append(database)
        return database

    try:
        yield open_one
    finally:
        for database in opened:
            await database.close()


@pytest.fixture
async def db(open_db: OpenDatabase) -> Database:
    return await open_db()


def task_values(n: int, **overrides: Any) -> dict[str, Any]:
    now = utcnow()
    values: dict[str, Any] = {
        "task_id": f"t_{n:04d}",
        "kind": "echo",
        "payload": b"",
        "pool": "default",
        "selector": {},
        "priority": 0,
        "state": State.QUEUED,
        "attempt": 1,
        "max_attempts": 1,
        "owner": "alice",
        "idempotency_key": None,
        "schedule_to_start_timeout": None,
        "start_to_close_timeout": None,
        "deadline": None,
        "created_at": now,
        "updated_at": now,
        "queued_at": now,
    }
    return values | overrides


async def insert(db: Database, n: int, **overrides: Any) -> None:
    await db.tasks.insert(task_values(n, **overrides))


async def count(db: Database, **where: Any) -> int:
    async with db.transaction() as session:
        query = select(func.count()).select_from(Task)
        for name, value in where.items():
            query = query.where(getattr(Task, name) == value)
        return int((await session.execute(query)).scalar_one())


async def row(db: Database, task_id: str) -> Task:
    async with db.transaction() as session:
        task = await db.tasks.get(session, task_id)
    assert task is not None
    return task


async def claim(
    db: Database,
    session_id: str,
    limit: int,
    labels: dict[str, str] | None = None,
    *,
    agent: str = "a1",
    now: datetime | None = None,
) -> list[Claimed]:
    request = ClaimRequest("default", labels or {}, ("echo",), agent, session_id, limit)
    return await db.tasks.claim(request, accept_timeout=LEASE, now=now or utcnow())


async def accept(db: Database, task_id: str, attempt: int = 1, session: str = "s1") -> bool:
    return await db.tasks.accept(Acceptance(task_id, attempt, session), lease=LEASE, now=utcnow())


def ending(task_id: str, *, agent: str = "a1", state: State = State.SUCCEEDED) -> Ending:
    usage = AttemptCost(model="m", input_tokens=1, output_tokens=2, cost_micros=3)
    return Ending(task_id, 1, agent, state, b"out", "", usage)


async def test_the_store_is_picked_once_for_the_backend(db: Database) -> None:
    expected = PostgresTaskStore if db.dialect == "postgresql" else SqliteTaskStore
    assert type(db.tasks) is expected


def test_one_list_of_states_for_storage_wire_and_sdk() -> None:
    wire = {n.removeprefix("TASK_STATE_") for n in common_pb2.TaskState.DESCRIPTOR.values_by_name}
    assert wire - {"UNSPECIFIED"} == {s.name for s in State}
    for state in State:
        assert common_pb2.TaskState.Value(f"TASK_STATE_{state}") == state.number
        assert TaskState[state.name] == state.number and TaskState[state.name].state is state
        assert TaskState[state.name].is_terminal == state.is_terminal


# Group commit, hidden inside the store.


async def test_concurrent_inserts_share_transactions(db: Database) -> None:
    await asyncio.gather(*(insert(db, n) for n in range(100)))
    assert await count(db) == 100
    assert db.group.items == 100
    # The first insert runs alone; the other 99 arrived while it ran and share one.
    assert db.group.transactions <= 3


async def test_inserts_of_different_shapes_sharing_a_transaction_keep_every_column(
    db: Database,
) -> None:
    # An eagerly dispatched task enters ASSIGNED with its agent, session and lease; it
    # may share a transaction with plain queued inserts, whichever comes first.
    lease = utcnow() + LEASE
    eager = {"state": State.ASSIGNED, "agent_id": "a1", "session_id": "s1"}
    await asyncio.gather(
        *(
            insert(db, n, **(eager | {"lease_expires_at": lease}) if n % 2 else {})
            for n in range(20)
        )
    )
    assert db.group.transactions < 20  # they did share
    for n in range(20):
        task = await row(db, f"t_{n:04d}")
        if n % 2:
            assert (task.state, task.agent_id, task.session_id) == ("ASSIGNED", "a1", "s1")
            assert task.lease_expires_at is not None
        else:
            assert (task.state, task.agent_id, task.session_id) == ("QUEUED", None, None)


async def test_a_duplicate_insert_fails_only_its_caller(db: Database) -> None:
    await insert(db, 0)
    results = await asyncio.gather(
        *(insert(db, n) for n in range(1, 6)),
        insert(db, 0),  # the same primary key again
        *(insert(db, n) for n in range(6, 11)),
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [type(None)] * 5 + [IntegrityError] + [type(None)] * 5
    assert await count(db) == 11


async def test_a_failing_unit_leaves_the_shared_transaction_to_the_others(db: Database) -> None:
    async def broken(_: object) -> None:
        raise ValueError("bug in one unit")

    results = await asyncio.gather(
        insert(db, 1), db.batched(broken), insert(db, 2), return_exceptions=True
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], ValueError)
    assert await count(db) == 2


async def test_insert_or_find_returns_the_task_an_idempotency_key_names(db: Database) -> None:
    async with db.transaction() as session:
        first, created = await db.tasks.insert_or_find(session, task_values(0, idempotency_key="k"))
    async with db.transaction() as session:
        again, again_created = await db.tasks.insert_or_find(
            session, task_values(1, idempotency_key="k")
        )
    assert (created, again_created) == (True, False)
    assert again.task_id == first.task_id == "t_0000"
    assert await count(db) == 1


# Claim: QUEUED -> ASSIGNED.


async def test_claim_takes_by_priority_then_age(db: Database) -> None:
    for n in range(4):
        await insert(db, n, priority=5 if n == 2 else 0)
    claimed = await claim(db, "s1", 3)
    assert [c.task_id for c in claimed] == ["t_0002", "t_0000", "t_0001"]
    assert await count(db, state=State.ASSIGNED, session_id="s1", agent_id="a1") == 3
    assert [c.task_id for c in await claim(db, "s2", 3)] == ["t_0003"]


async def test_claim_sets_the_accept_deadline(db: Database) -> None:
    await insert(db, 0)
    now = utcnow()
    await claim(db, "s1", 1, now=now)
    assert (await row(db, "t_0000")).lease_expires_at == now + LEASE


async def test_claim_returns_the_trace_context_stored_with_the_task(db: Database) -> None:
    """Its dispatch span (and so the Assignment) continues the task's trace."""
    stored = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 vendor=abc"
    await insert(db, 0, trace_context=stored)
    await insert(db, 1)
    claimed = {c.task_id: c.trace_context for c in await claim(db, "s1", 2)}
    assert claimed == {"t_0000": stored, "t_0001": None}
    assert (await row(db, "t_0000")).trace_context == stored


async def test_claim_skips_what_labels_kinds_or_backoff_rule_out(db: Database) -> None:
    now = utcnow()
    await insert(db, 0, selector={"gpu": "yes"})
    await insert(db, 1, kind="other")
    await insert(db, 2, not_before=now + timedelta(seconds=5))
    await insert(db, 3, pool="elsewhere")
    await insert(db, 4, not_before=now - timedelta(seconds=1))
    assert [c.task_id for c in await claim(db, "s1", 5, now=now)] == ["t_0004"]
    assert [c.task_id for c in await claim(db, "s2", 5, {"gpu": "yes"}, now=now)] == ["t_0000"]


async def test_streams_claiming_together_share_the_queue(db: Database) -> None:
    for n in range(5):
        await insert(db, n)
    await insert(db, 5, selector={"gpu": "yes"})
    got = await asyncio.gather(
        claim(db, "s1", 3), claim(db, "s2", 1), claim(db, "s3", 3, labels={"gpu": "yes"})
    )
    ids = [sorted(c.task_id for c in claimed) for claimed in got]
    if db.dialect == "postgresql":
        # s1 and s2 share one statement and are dealt in turn.
        assert ids[:2] == [["t_0000", "t_0002", "t_0003"], ["t_0001"]]
    else:
        assert ids[:2] == [["t_0000", "t_0001", "t_0002"], ["t_0003"]]
    assert ids[2] == ["t_0004", "t_0005"]  # only s3 may take the gpu task
    assert await count(db, state=State.QUEUED) == 0


async def test_two_claimers_never_take_the_same_task(open_db: OpenDatabase) -> None:
    one, two = await open_db(), await open_db()
    await asyncio.gather(*(insert(one, n) for n in range(40)))
    got = await asyncio.gather(
        *(claim(store, f"s{i}", 3, agent=f"a{i}") for i in range(8) for store in (one, two))
    )
    ids = [c.task_id for claimed in got for c in claimed]
    assert len(ids) == len(set(ids)) == 40
    assert await count(one, state=State.ASSIGNED) == 40


# Accept: ASSIGNED -> RUNNING.


async def test_accept_moves_only_the_streams_own_assigned_attempts(db: Database) -> None:
    for n in range(3):
        await insert(db, n)
    await claim(db, "s1", 3)
    assert list(
        await asyncio.gather(
            accept(db, "t_0000"),
            accept(db, "t_0001", session="s2"),  # not this stream's
            accept(db, "t_0002", attempt=2),  # not the current attempt
            accept(db, "t_9999"),  # no such task
        )
    ) == [True, False, False, False]
    assert await count(db, state=State.RUNNING) == 1
    assert not await accept(db, "t_0000")  # already running
    task = await row(db, "t_0000")
    assert task.started_at is not None and task.lease_expires_at is not None


async def test_an_accept_handed_in_without_waiting_is_written_before_the_result(
    db: Database,
) -> None:
    await insert(db, 0)
    await claim(db, "s1", 1)
    accepted = db.tasks.accept(Acceptance("t_0000", 1, "s1"), lease=LEASE, now=utcnow())
    answer = await db.tasks.finish(
        Ending("t_0000", 1, "a1", State.SUCCEEDED, b"", ""), now=utcnow()
    )
    assert await accepted
    assert isinstance(answer, tuple)
    state, finished = answer
    assert state == State.SUCCEEDED
    assert finished.started_at is not None  # the accept ran first: it sets started_at
    assert db.group.transactions == 3  # insert, claim, then accept and finish together


async def test_renew_leases_extends_only_this_streams_held_attempts(db: Database) -> None:
    for n in range(3):
        await insert(db, n)
    await claim(db, "s1", 2)
    await claim(db, "s2", 1)
    later = utcnow() + timedelta(hours=1)
    attempts = [("t_0000", 1), ("t_0001", 1), ("t_0002", 1)]
    assert await db.tasks.renew_leases("s1", attempts, lease=LEASE, now=later) == 2
    assert (await row(db, "t_0000")).lease_expires_at == later + LEASE
    assert (await row(db, "t_0002")).lease_expires_at != later + LEASE


async def test_read_is_a_detached_copy_equal_to_get(db: Database) -> None:
    await insert(db, 0, selector={"zone": "a"})
    await claim(db, "s1", 1, {"zone": "a"})
    await db.tasks.finish(ending("t_0000"), now=utcnow())
    stored = await row(db, "t_0000")
    async with db.reading() as conn:
        shown = await db.tasks.read(conn, "t_0000")
        missing = await db.tasks.read(conn, "t_9999")
    assert shown is not None and missing is None
    columns = [c.key for c in Task.__table__.columns]
    assert {c: getattr(shown, c) for c in columns} == {c: getattr(stored, c) for c in columns}
    assert shown.finished_at is not None and shown.finished_at.tzinfo is not None


# Finish: held -> an end state.


async def test_finish_ends_each_attempt_once(db: Database) -> None:
    for n in range(3):
        await insert(db, n)
    await claim(db, "s1", 3)
    first, resent, failed, foreign, missing = await asyncio.gather(
        db.tasks.finish(ending("t_0000"), now=utcnow()),
        db.tasks.finish(ending("t_0000"), now=utcnow()),  # the same Result twice in one batch
        db.tasks.finish(ending("t_0001", state=State.FAILED), now=utcnow()),
        db.tasks.finish(ending("t_0002", agent="a2"), now=utcnow()),  # held by a1
        db.tasks.finish(ending("t_9999"), now=utcnow()),
    )
    assert first == (State.SUCCEEDED, Finished("alice", "default", "echo", None, None, 0))
    assert resent == Current(1, "a1", State.SUCCEEDED)
    assert isinstance(failed, tuple) and failed[0] == State.FAILED
    assert foreign == Current(1, "a1", State.ASSIGNED)
    assert missing is None
    task = await row(db, "t_0000")
    assert (task.output, task.input_tokens, task.cost_micros) == (b"out", 1, 3)
    assert (task.session_id, task.lease_expires_at) == (None, None)
    assert task.finished_at is not None
    async with db.transaction() as session:
        used = await usage_store.of_tasks(session, ["t_0000", "t_0001"])
    # Each attempt that ended is recorded once (not the resent copy, not the refused ones).
    assert [(u.task_id, u.attempt, u.cost_micros) for rows in used.values() for u in rows] == [
        ("t_0000", 1, 3),
        ("t_0001", 1, 3),
    ]


async def test_finish_returns_the_ended_row_as_a_read_shows_it(db: Database) -> None:
    """What a watcher is sent instead of reading: every column but the payload, typed
    as a read types it (times in UTC, JSON as objects)."""
    await insert(db, 0, selector={"zone": "a"})
    await claim(db, "s1", 1, {"zone": "a"})
    plain = Ending("t_0000", 1, "a1", State.SUCCEEDED, b"out", "")
    answer = await db.tasks.finish(plain, now=utcnow())
    assert isinstance(answer, tuple)
    async with db.reading() as conn:
        shown = await db.tasks.read(conn, "t_0000")
    assert shown is not None
    columns = [c.key for c in Task.__table__.columns if c.key != "payload"]
    assert sorted(answer[1].row) == sorted(columns)
    assert dict(answer[1].row) == {c: getattr(shown, c) for c in columns}


async def test_an_unwritten_accept_is_the_start_of_the_attempt_it_ends(db: Database) -> None:
    """Ending.accepted_at (an Accepted folded into its Result) is the start of an attempt
    that never showed RUNNING; one that did keeps the start its Accepted wrote."""
    for n in range(2):
        await insert(db, n)
    await claim(db, "s1", 2)
    assert await accept(db, "t_0001")
    started = (await row(db, "t_0001")).started_at
    accepted_at = utcnow() - timedelta(milliseconds=5)
    for task_id in ("t_0000", "t_0001"):
        end = Ending(task_id, 1, "a1", State.SUCCEEDED, b"", "", accepted_at=accepted_at)
        answer = await db.tasks.finish(end, now=utcnow())
        assert isinstance(answer, tuple) and answer[0] == State.SUCCEEDED
    assert (await row(db, "t_0000")).started_at == accepted_at
    assert (await row(db, "t_0001")).started_at == started != accepted_at


async def test_end_attempt_in_a_transaction_ends_it_the_same_way(db: Database) -> None:
    await insert(db, 0)
    await claim(db, "s1", 1)
    async with db.transaction() as session:
        done = await db.tasks.end_attempt(session, ending("t_0000"), now=utcnow())
        again = await db.tasks.end_attempt(session, ending("t_0000"), now=utcnow())
    assert done == Finished("alice", "default", "echo", None, None, 0)
    assert again is None
    task = await row(db, "t_0000")
    assert (task.state, task.session_id, task.lease_expires_at) == (State.SUCCEEDED, None, None)
    assert (task.cost_micros, task.finished_at is not None) == (3, True)


async def test_finish_against_the_reaper_one_wins(open_db: OpenDatabase) -> None:
    """An agent's Result and a reaper (another replica) that saw the lease run out race
    for the same attempt: exactly one of them moves it."""
    agent_side, reaper_side = await open_db(), await open_db()
    for n in range(20):
        await insert(agent_side, n, max_attempts=2)
    await claim(agent_side, "s1", 20)
    ids = [f"t_{n:04d}" for n in range(20)]
    await asyncio.gather(*(accept(agent_side, t) for t in ids))
    expired = utcnow() + LEASE * 3

    async def reap(task_id: str) -> State | None:
        async with reaper_side.transaction() as session:
            retry = Retry(task_id, 1, "lease expired", lease_expired_before=expired)
            return await reaper_side.tasks.retry_or_fail(session, retry, now=expired)

    answers = await asyncio.gather(
        *(agent_side.tasks.finish(ending(t), now=utcnow()) for t in ids),
        *(reap(t) for t in ids),
    )
    finished, reaped = answers[:20], answers[20:]
    for task_id, done, requeued in zip(ids, finished, reaped, strict=True):
        task = await row(agent_side, task_id)
        if isinstance(done, tuple):
            assert requeued is None
            assert (task.state, task.attempt) == (State.SUCCEEDED, 1)
        else:
            assert requeued == State.QUEUED
            assert done == Current(2, None, State.QUEUED)
            assert (task.state, task.attempt) == (State.QUEUED, 2)


# Taking attempts back without a Result.


async def test_unclaim_requeues_the_same_attempt_until_retry_at(db: Database) -> None:
    await insert(db, 0)
    await insert(db, 1)
    await claim(db, "s1", 2)
    retry_at = utcnow() + timedelta(seconds=30)
    async with db.transaction() as session:
        await db.tasks.unclaim(
            session,
            [HoldBack("t_0000", 1, retry_at, "budget"), HoldBack("t_0001", 1, retry_at)],
            "s2",  # not the stream that holds them: nothing changes
            now=utcnow(),
        )
    assert await count(db, state=State.ASSIGNED) == 2
    async with db.transaction() as session:
        await db.tasks.unclaim(
            session, [HoldBack("t_0000", 1, retry_at, "budget")], "s1", now=utcnow()
        )
    task = await row(db, "t_0000")
    assert (task.state, task.attempt, task.session_id, task.agent_id) == (
        State.QUEUED,
        1,
        None,
        None,
    )
    assert (task.not_before, task.waiting_reason) == (retry_at, "budget")
    assert await claim(db, "s3", 1) == []  # held back until retry_at
    assert [c.task_id for c in await claim(db, "s3", 1, now=retry_at)] == ["t_0000"]


async def test_fail_claimed_ends_an_unsent_attempt(db: Database) -> None:
    await insert(db, 0)
    (claimed,) = await claim(db, "s1", 1)
    async with db.transaction() as session:
        assert not await db.tasks.fail_claimed(session, claimed, "s2", "cap", now=utcnow())
        assert await db.tasks.fail_claimed(session, claimed, "s1", "cap", now=utcnow())
    task = await row(db, "t_0000")
    assert (task.state, task.error, task.session_id) == (State.FAILED, "cap", None)


async def retry(db: Database, retry: Retry, now: datetime | None = None) -> State | None:
    async with db.transaction() as session:
        return await db.tasks.retry_or_fail(session, retry, now=now or utcnow())


async def test_retry_requeues_the_next_attempt_after_its_backoff(db: Database) -> None:
    await insert(db, 0, max_attempts=2)
    await claim(db, "s1", 1)
    await accept(db, "t_0000")
    now = utcnow()
    state = await retry(db, Retry("t_0000", 1, "boom", timedelta(seconds=4)), now)
    assert state == State.QUEUED
    task = await row(db, "t_0000")
    assert (task.attempt, task.error, task.agent_id, task.started_at) == (2, "boom", None, None)
    assert (task.not_before, task.queued_at) == (now + timedelta(seconds=4), now)
    assert await retry(db, Retry("t_0000", 1, "again")) is None  # no longer current


async def test_retry_ends_the_task_once_attempts_run_out(db: Database) -> None:
    await insert(db, 0, max_attempts=1)
    await insert(db, 1, max_attempts=1)
    await claim(db, "s1", 2)
    assert await retry(db, Retry("t_0000", 1, "boom")) == State.FAILED
    overran = Retry("t_0001", 1, "too slow", exhausted_state=State.TIMED_OUT)
    assert await retry(db, overran) == State.TIMED_OUT
    task = await row(db, "t_0000")
    assert (task.error, task.session_id, task.finished_at is not None) == (
        "boom (attempt 1 of 1)",
        None,
        True,
    )


async def test_a_rate_limited_attempt_is_not_counted(db: Database) -> None:
    await insert(db, 0, max_attempts=1)
    await claim(db, "s1", 1)
    assert await retry(db, Retry("t_0000", 1, "429", rate_limited=True)) == State.QUEUED
    assert (await row(db, "t_0000")).rate_limited == 1


async def test_retry_of_a_task_whose_cancel_was_requested_cancels_it(db: Database) -> None:
    await insert(db, 0, max_attempts=3)
    await claim(db, "s1", 1)
    async with db.transaction() as session:
        await db.tasks.request_cancel(session, "t_0000", "stop", now=utcnow())
    assert await retry(db, Retry("t_0000", 1, "boom")) == State.CANCELLED
    assert (await row(db, "t_0000")).error == "stop"


async def test_retry_conditions_must_hold(db: Database) -> None:
    await insert(db, 0, max_attempts=2)
    await claim(db, "s1", 1)
    assert await retry(db, Retry("t_0000", 1, "x", agent_id="a2")) is None
    assert await retry(db, Retry("t_0000", 1, "x", session_id="s2")) is None
    assert await retry(db, Retry("t_0000", 1, "x", lease_expired_before=utcnow())) is None
    assert await retry(db, Retry("t_0000", 1, "x", agent_id="a1", session_id="s1")) == (
        State.QUEUED
    )


# Streams that end, drain or reconnect.


async def test_adopt_moves_this_agents_attempts_to_its_new_stream(db: Database) -> None:
    await insert(db, 0)
    await insert(db, 1)
    await claim(db, "s1", 1, agent="a1")
    await claim(db, "s9", 1, agent="a9")
    async with db.transaction() as session:
        adopted, lost = await db.tasks.adopt(
            session, "a1", "s2", [("t_0000", 1), ("t_0001", 1)], lease=LEASE, now=utcnow()
        )
        held = await db.tasks.held_by_session(session, "s2")
    assert (adopted, lost) == ([("t_0000", 1)], [("t_0001", 1)])
    assert [h.task_id for h in held] == ["t_0000"]


async def test_hand_over_keeps_the_attempts_held_until_the_grace_ends(db: Database) -> None:
    await insert(db, 0)
    await claim(db, "s1", 1)
    until = utcnow() + timedelta(minutes=5)
    async with db.transaction() as session:
        assert await db.tasks.hand_over(session, "s1", until, now=utcnow()) == 1
    task = await row(db, "t_0000")
    assert (task.state, task.session_id, task.lease_expires_at) == (State.ASSIGNED, "s1", until)


async def test_held_reads(db: Database) -> None:
    await insert(db, 0)
    await insert(db, 1, reserve_micros=7)
    await insert(db, 2)
    await claim(db, "s1", 2)
    now = utcnow()
    async with db.transaction() as session:
        assert {h.task_id for h in await db.tasks.held_by_sessions(session, {"s1"})} == {
            "t_0000",
            "t_0001",
        }
        assert await db.tasks.held_by_sessions(session, set()) == []
        assert await db.tasks.held_attempts(session, [("t_0000", 1), ("t_0002", 1)]) == {
            ("t_0000", 1)
        }
        reserved = await db.tasks.held_with_reservations(session)
        assert [(c.task_id, c.reserve_micros) for c in reserved] == [("t_0001", 7)]
        assert await db.tasks.expired_leases(session, now) == []
        assert len(await db.tasks.expired_leases(session, now + LEASE * 2)) == 2
        assert await db.tasks.claimable(session, {"default"}, now=now) == [("default", "echo", 1)]
        stats = await db.tasks.queue_stats(session)
        assert [(p, k, n) for p, k, n, _ in stats] == [("default", "echo", 1)]
        assert await db.tasks.attempt_of(session, "t_0000") == Current(1, "a1", State.ASSIGNED)
        assert await db.tasks.kind_and_model(session, "t_0000") == ("echo", None)
        assert await db.tasks.signature_of(session, "t_0000") is None


# Cancellation and timeouts.


async def test_cancel_ends_a_queued_task_and_flags_a_held_one(db: Database) -> None:
    await insert(db, 0)
    await insert(db, 1, priority=1)
    await claim(db, "s1", 1)  # t_0001
    async with db.transaction() as session:
        queued = await db.tasks.request_cancel(session, "t_0000", "", now=utcnow())
        running = await db.tasks.request_cancel(session, "t_0001", "stop", now=utcnow())
        flagged = await db.tasks.cancel_requested(session, {"s1"})
        none = await db.tasks.cancel_requested(session, {"s2"})
        missing = await db.tasks.request_cancel(session, "t_9999", "", now=utcnow())
    assert queued is not None and running is not None and missing is None
    assert (queued.state, queued.error) == (State.CANCELLED, "cancelled by request")
    assert (running.state, running.cancel_requested) == (State.ASSIGNED, True)
    assert flagged == [("t_0001", 1, "s1", "stop")]
    assert none == []


async def test_time_out_expired_ends_late_tasks(db: Database) -> None:
    now = utcnow()
    await insert(db, 0, deadline=now + timedelta(seconds=5), priority=1)
    await insert(db, 1, schedule_to_start_timeout=5.0, waiting_reason="budget")
    await insert(db, 2, deadline=now + timedelta(seconds=60))
    await claim(db, "s1", 1, now=now)  # t_0000
    async with db.transaction() as session:
        assert await db.tasks.time_out_expired(session, now) == ([], [])
        stopped, ended = await db.tasks.time_out_expired(session, now + timedelta(seconds=10))
    assert [(h.task_id, h.session_id) for h in stopped] == [("t_0000", "s1")]
    assert sorted(ended, key=lambda e: e.task_id) == [
        TimedOut("t_0000", 1, "deadline exceeded"),
        TimedOut("t_0001", 1, "schedule-to-start timeout exceeded (budget)"),
    ]
    task = await row(db, "t_0000")
    assert (task.state, task.session_id, task.lease_expires_at) == (State.TIMED_OUT, None, None)


async def test_overrun_attempts_are_found_by_the_database(db: Database) -> None:
    now = utcnow()
    for n in range(3):
        await insert(db, n, start_to_close_timeout=float(10 + n))
    await claim(db, "s1", 3, now=now)
    async with db.engine.begin() as conn:
        await conn.execute(update(Task).values(state=State.RUNNING, started_at=now))
    async with db.transaction() as session:
        first = await db.tasks.overrun_attempts(session, now + timedelta(seconds=100), limit=2)
        none_yet = await db.tasks.overrun_attempts(session, now + timedelta(seconds=10))
    assert [h.task_id for h in first] == ["t_0000", "t_0001"]
    assert none_yet == []  # exactly at its timeout is not yet past it
