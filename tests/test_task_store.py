"""The task hot path's storage: group commit and the multi-row transitions, on SQLite and
on Postgres (where they are single statements over arrays)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from muster.server.storage import tasks as task_store
from muster.server.storage import usage as usage_store
from muster.server.storage.database import Database
from muster.server.storage.models import Base, Task
from muster.server.storage.types import utcnow
from muster.server.storage.usage import AttemptCost
from tests.pg import fresh_database

LEASE = timedelta(seconds=30)


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'muster.db'}", audit_chain="t")
        async with database.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        try:
            yield database
        finally:
            await database.close()
        return
    async with fresh_database() as url:
        database = Database(url, audit_chain="t")
        try:
            yield database
        finally:
            await database.close()


def task_values(n: int, **overrides: Any) -> dict[str, Any]:
    now = utcnow()
    values: dict[str, Any] = {
        "task_id": f"t_{n:04d}",
        "kind": "echo",
        "payload": b"",
        "pool": "default",
        "selector": {},
        "priority": 0,
        "state": task_store.QUEUED,
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


async def insert(db: Database, values: dict[str, Any]) -> None:
    await db.group.run_many("insert", task_store.insert_many, values)


async def count(db: Database, **where: Any) -> int:
    async with db.transaction() as session:
        query = select(func.count()).select_from(Task)
        for name, value in where.items():
            query = query.where(getattr(Task, name) == value)
        return int((await session.execute(query)).scalar_one())


async def test_concurrent_writes_share_transactions(db: Database) -> None:
    await asyncio.gather(*(insert(db, task_values(n)) for n in range(100)))
    assert await count(db) == 100
    assert db.group.items == 100
    # The first insert runs alone; the other 99 arrived while it ran and share one.
    assert db.group.transactions <= 3


async def test_a_failing_item_fails_only_its_caller(db: Database) -> None:
    await insert(db, task_values(0))
    results = await asyncio.gather(
        *(insert(db, task_values(n)) for n in range(1, 6)),
        insert(db, task_values(0)),  # the same primary key again
        *(insert(db, task_values(n)) for n in range(6, 11)),
        return_exceptions=True,
    )
    assert [type(r) for r in results] == [type(None)] * 5 + [IntegrityError] + [type(None)] * 5
    assert await count(db) == 11


async def test_a_failing_unit_leaves_the_shared_transaction_to_the_others(db: Database) -> None:
    async def broken(_: object) -> None:
        raise ValueError("bug in one unit")

    results = await asyncio.gather(
        insert(db, task_values(1)),
        db.batched(broken),
        insert(db, task_values(2)),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], ValueError)
    assert await count(db) == 2


async def claim(
    db: Database, session_id: str, limit: int, labels: dict[str, str] | None = None
) -> list[task_store.Claimed]:
    request = task_store.ClaimRequest("default", labels or {}, ("echo",), "a1", session_id, limit)
    return await db.group.run_many(
        request.key,
        lambda conn, requests: task_store.claim_many(
            conn, requests, accept_timeout=LEASE, now=utcnow()
        ),
        request,
    )


async def test_claim_takes_by_priority_then_age(db: Database) -> None:
    for n in range(4):
        await insert(db, task_values(n, priority=5 if n == 2 else 0))
    claimed = await claim(db, "s1", 3)
    assert [c.task_id for c in claimed] == ["t_0002", "t_0000", "t_0001"]
    assert await count(db, state=task_store.ASSIGNED, session_id="s1") == 3
    assert [c.task_id for c in await claim(db, "s2", 3)] == ["t_0003"]


async def test_streams_claiming_together_share_the_queue_round_robin(db: Database) -> None:
    for n in range(5):
        await insert(db, task_values(n))
    await insert(db, task_values(5, selector={"gpu": "yes"}))
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
    assert await count(db, state=task_store.QUEUED) == 0


async def test_accept_many_moves_only_the_streams_own_assigned_attempts(db: Database) -> None:
    for n in range(3):
        await insert(db, task_values(n))
    await claim(db, "s1", 3)

    def acceptance(task_id: str, attempt: int = 1, session: str = "s1") -> Any:
        return db.group.run_many(
            "accept",
            lambda conn, items: task_store.accept_many(conn, items, lease=LEASE, now=utcnow()),
            task_store.Acceptance(task_id, attempt, session),
        )

    assert await asyncio.gather(
        acceptance("t_0000"),
        acceptance("t_0001", session="s2"),  # not this stream's
        acceptance("t_0002", attempt=2),  # not the current attempt
        acceptance("t_9999"),  # no such task
    ) == [True, False, False, False]
    assert await count(db, state=task_store.RUNNING) == 1
    assert not await acceptance("t_0000")  # already running


async def test_finish_many_ends_each_attempt_once(db: Database) -> None:
    for n in range(3):
        await insert(db, task_values(n))
    await claim(db, "s1", 3)

    def end(task_id: str, agent: str = "a1", state: str = task_store.SUCCEEDED) -> Any:
        usage = AttemptCost(model="m", input_tokens=1, output_tokens=2, cost_micros=3)
        ending = task_store.Ending(task_id, 1, agent, state, b"out", "", usage)
        return db.group.run_many("finish", partial(task_store.finish_many, now=utcnow()), ending)

    first, resent, failed, foreign, missing = await asyncio.gather(
        end("t_0000"),
        end("t_0000"),  # the same Result twice in one batch
        end("t_0001", state=task_store.FAILED),
        end("t_0002", agent="a2"),  # held by a1
        end("t_9999"),
    )
    assert first == (
        task_store.SUCCEEDED,
        task_store.Finished("alice", "default", "echo", None, None, 0),
    )
    assert resent == task_store.Current(1, "a1", task_store.SUCCEEDED)
    assert failed[0] == task_store.FAILED
    assert foreign == task_store.Current(1, "a1", task_store.ASSIGNED)
    assert missing is None
    async with db.transaction() as session:
        row = await session.get(Task, "t_0000")
        assert row is not None
        assert (row.output, row.input_tokens, row.cost_micros, row.session_id) == (
            b"out",
            1,
            3,
            None,
        )
        used = await usage_store.of_tasks(session, ["t_0000", "t_0001"])
    # Each attempt that ended is recorded once (not the resent copy, not the refused ones).
    assert [(u.task_id, u.attempt, u.cost_micros) for rows in used.values() for u in rows] == [
        ("t_0000", 1, 3),
        ("t_0001", 1, 3),
    ]


async def test_an_accepted_handed_in_without_waiting_is_written_before_the_result(
    db: Database,
) -> None:
    await insert(db, task_values(0))
    await claim(db, "s1", 1)
    accepted = db.group.submit_many(
        "accept",
        lambda conn, items: task_store.accept_many(conn, items, lease=LEASE, now=utcnow()),
        task_store.Acceptance("t_0000", 1, "s1"),
    )
    ending = task_store.Ending("t_0000", 1, "a1", task_store.SUCCEEDED, b"", "")
    state, finished = await db.group.run_many(
        "finish", partial(task_store.finish_many, now=utcnow()), ending
    )
    assert await accepted
    assert state == task_store.SUCCEEDED
    assert finished.started_at is not None  # the accept ran first: it sets started_at
    assert db.group.transactions == 3  # insert, claim, then accept and finish together
