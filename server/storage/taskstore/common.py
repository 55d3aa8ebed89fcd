"""What both backends' stores share: SQLAlchemy Core statements every dialect runs the
same, the group commit plumbing of the hot path, and the one definition of the columns
that end an attempt or requeue it. A backend supplies the three gathered statements
(claim, accept, finish of many items at once)."""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Table, and_, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from muster.server.storage import usage as usage_store
from muster.server.storage.batch import Audit, GroupCommit
from muster.server.storage.models import Task
from muster.server.storage.taskstore.base import (
    MAX_RATE_LIMITED,
    OVERDUE_BATCH,
    Acceptance,
    Claimed,
    ClaimRequest,
    Current,
    Ended,
    Ending,
    Executor,
    Finished,
    Held,
    HoldBack,
    Retry,
    TaskStore,
    TimedOut,
)
from muster.server.storage.timing import instant, plus_seconds
from muster.server.storage.types import UTCDateTime
from muster.server.storage.usage import Used
from muster.states import HELD, TERMINAL, State

TASKS: Table = Task.__table__  # type: ignore[assignment]
"""The hot path runs Core statements on this table: no ORM objects, no session."""
_c = TASKS.c

HELD_NAMES = tuple(Held.__slots__)
CLAIMED_NAMES = tuple(name for name in Claimed.__slots__ if name != "ceiling_micros")
FINISHED_NAMES = tuple(name for name in Finished.__slots__ if name != "row")
HELD_COLUMNS = tuple(_c[name] for name in HELD_NAMES)
CLAIMED_COLUMNS = tuple(_c[name] for name in CLAIMED_NAMES)
ENDED_COLUMNS = tuple(column for column in TASKS.c if column.name != "payload")
"""What the end of an attempt returns: Finished, and its ``row``."""

_INSERT = ("tasks", "insert")
_ACCEPT = ("tasks", "accept")
_FINISH = ("tasks", "finish")
"""Group commit keys: items of one key share one statement."""


def held(row: Any) -> Held:
    """A row (with at least :data:`HELD_COLUMNS`) as a Held, by column name."""
    mapping = row._mapping
    return Held(**{name: mapping[name] for name in HELD_NAMES})


def claimed(row: Any) -> Claimed:
    mapping = row._mapping
    return Claimed(**{name: mapping[name] for name in CLAIMED_NAMES})


def finished(row: Any) -> Finished:
    """A row with :data:`ENDED_COLUMNS` as a Finished, by column name."""
    mapping = row._mapping
    return Finished(**{name: mapping[name] for name in FINISHED_NAMES}, row=dict(mapping))


def ended_values(state: State, now: datetime, **values: Any) -> dict[str, Any]:
    """THE end of an attempt: the task is in ``state`` for good, nobody holds it any more.
    Every transition that ends an attempt sets these columns (and Postgres's gathered
    ``finish_many`` in sql/tasks.sql sets the same)."""
    return {
        "state": state,
        "finished_at": now,
        "updated_at": now,
        "session_id": None,
        "lease_expires_at": None,
        **values,
    }


def requeued_values(now: datetime, **values: Any) -> dict[str, Any]:
    """An attempt that goes back to the queue: QUEUED, nobody holds it."""
    return {
        "state": State.QUEUED,
        "agent_id": None,
        "session_id": None,
        "lease_expires_at": None,
        "updated_at": now,
        **values,
    }


def ready(now: datetime) -> Any:
    """A queued task may be claimed now: it has no retry backoff left to wait out."""
    return or_(_c.not_before.is_(None), _c.not_before <= now)


def rowcount(result: Any) -> int:
    return int(result.rowcount)


class SqlTaskStore(TaskStore):
    """The statements every backend runs the same; see :class:`TaskStore` for the contract."""

    def __init__(self, group: GroupCommit) -> None:
        self.group = group

    # The gathered statements, one per backend.

    @abstractmethod
    async def _claim_many(
        self,
        conn: AsyncConnection,
        requests: Sequence[ClaimRequest],
        *,
        accept_timeout: timedelta,
        now: datetime,
    ) -> list[list[Claimed]]:
        """Claims for streams sharing a :attr:`ClaimRequest.key`: per request, its tasks."""

    @abstractmethod
    async def _accept_many(
        self, conn: AsyncConnection, items: Sequence[Acceptance], *, lease: timedelta, now: datetime
    ) -> list[bool]:
        """Accepts; per item, whether it moved."""

    @abstractmethod
    async def _end_many(
        self, conn: AsyncConnection, items: Sequence[Ending], *, now: datetime
    ) -> dict[tuple[str, int], Finished]:
        """End the attempts of ``items`` that are current and held by their agent (each
        once, however often it is listed); the ones ended, by (task id, attempt)."""

    # The hot path.

    async def insert(self, values: dict[str, Any], *, audit: Audit[None] | None = None) -> None:
        await self.group.run_many(_INSERT, self._insert_many, values, audit=audit)

    @staticmethod
    async def _insert_many(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> list[None]:
        # One statement per set of columns: an executemany takes its columns from the
        # first row, so an eager (ASSIGNED) row batched after a queued one would lose its
        # agent, session and lease.
        shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            shapes.setdefault(tuple(sorted(row)), []).append(row)
        for same in shapes.values():
            await conn.execute(insert(TASKS), same)
        return [None] * len(rows)

    async def claim(
        self,
        request: ClaimRequest,
        *,
        accept_timeout: timedelta,
        now: datetime,
        audit: Audit[list[Claimed]] | None = None,
    ) -> list[Claimed]:
        work = partial(self._claim_many, accept_timeout=accept_timeout, now=now)
        return await self.group.run_many(request.key, work, request, audit=audit)

    def accept(
        self, acceptance: Acceptance, *, lease: timedelta, now: datetime
    ) -> asyncio.Future[bool]:
        work = partial(self._accept_many, lease=lease, now=now)
        return self.group.submit_many(_ACCEPT, work, acceptance)

    async def renew_leases(
        self,
        session_id: str,
        attempts: Sequence[tuple[str, int]],
        *,
        lease: timedelta,
        now: datetime,
    ) -> int:
        if not attempts:
            return 0
        ids = [task_id for task_id, _ in attempts]
        statement = (
            update(TASKS)
            .where(_c.session_id == session_id, _c.state.in_(HELD), _c.task_id.in_(ids))
            .values(lease_expires_at=now + lease)
        )

        async def renew(conn: AsyncConnection) -> int:
            return rowcount(await conn.execute(statement))

        return await self.group.run(renew)

    async def finish(
        self, ending: Ending, *, now: datetime, audit: Audit[Ended] | None = None
    ) -> Ended:
        work = partial(self._finish_many, now=now)
        return await self.group.run_many(_FINISH, work, ending, audit=audit)

    async def _finish_many(
        self, conn: AsyncConnection, items: Sequence[Ending], *, now: datetime
    ) -> list[Ended]:
        ended = await self._end_many(conn, items, now=now)
        # The usage of the copy that ended the attempt (a resent Result is not counted).
        used = {
            (e.task_id, e.attempt): Used(e.task_id, e.attempt, e.agent_id, e.usage)
            for e in reversed(items)
            if e.usage is not None and (e.task_id, e.attempt) in ended
        }
        await usage_store.record(conn, used.values())
        answers: list[Ended] = []
        for e in items:
            # A Result handed in twice ends the attempt once: the second copy is told why not.
            done = ended.pop((e.task_id, e.attempt), None)
            answers.append(
                (e.state, done) if done is not None else await self.attempt_of(conn, e.task_id)
            )
        return answers

    # In the caller's transaction.

    def _end_one(self, ending: Ending, now: datetime) -> Any:
        """The UPDATE that ends one attempt held by its agent, returning what Finished shows."""
        values = ended_values(ending.state, now, output=ending.output, error=ending.error)
        if ending.accepted_at is not None:
            accepted = literal(ending.accepted_at, UTCDateTime)
            values["started_at"] = func.coalesce(_c.started_at, accepted)
        return (
            update(TASKS)
            .where(
                _c.task_id == ending.task_id,
                _c.attempt == ending.attempt,
                _c.agent_id == ending.agent_id,
                _c.state.in_(HELD),
            )
            .values(values)
            .returning(*ENDED_COLUMNS)
        )

    async def end_attempt(
        self, conn: Executor, ending: Ending, *, now: datetime
    ) -> Finished | None:
        row = (await conn.execute(self._end_one(ending, now))).first()
        if row is None:
            return None
        if ending.usage is not None:
            connection = await conn.connection() if isinstance(conn, AsyncSession) else conn
            used = Used(ending.task_id, ending.attempt, ending.agent_id, ending.usage)
            await usage_store.record(connection, [used])
        return finished(row)

    async def insert_or_find(
        self, session: AsyncSession, values: dict[str, Any]
    ) -> tuple[Task, bool]:
        existing = await self._earlier(session, values)
        if existing is not None:
            return existing, False
        task = Task(**values)
        try:
            async with session.begin_nested():
                session.add(task)
                await session.flush()
        except IntegrityError:
            existing = await self._earlier(session, values)
            if existing is None:
                raise
            return existing, False
        return task, True

    async def _earlier(self, session: AsyncSession, values: dict[str, Any]) -> Task | None:
        """The task a submission repeats: same owner and idempotency key, or same signed id."""
        key = values.get("idempotency_key")
        if key:
            result = await session.execute(
                select(Task).where(Task.owner == values["owner"], Task.idempotency_key == key)
            )
            existing = result.scalar_one_or_none()
            if existing is not None:
                return existing
        if values.get("signature") is not None:
            return await self.get(session, values["task_id"])
        return None

    async def get(self, session: AsyncSession, task_id: str) -> Task | None:
        return await session.get(Task, task_id, populate_existing=True)

    async def read(self, conn: Executor, task_id: str) -> Task | None:
        query = select(TASKS).where(TASKS.c.task_id == task_id)
        found = (await conn.execute(query)).mappings().first()
        return None if found is None else Task(**found)

    async def list_tasks(
        self,
        session: AsyncSession,
        *,
        states: Sequence[State],
        pool: str,
        kind: str,
        owner: str | None,
        limit: int,
        before: tuple[datetime, str] | None,
    ) -> list[Task]:
        query = select(Task)
        if states:
            query = query.where(Task.state.in_(states))
        if pool:
            query = query.where(Task.pool == pool)
        if kind:
            query = query.where(Task.kind == kind)
        if owner is not None:
            query = query.where(Task.owner == owner)
        if before is not None:
            created, task_id = before
            query = query.where(
                or_(
                    Task.created_at < created,
                    and_(Task.created_at == created, Task.task_id < task_id),
                )
            )
        query = query.order_by(Task.created_at.desc(), Task.task_id.desc()).limit(limit)
        return list((await session.execute(query)).scalars())

    async def unclaim(
        self, conn: Executor, items: Sequence[HoldBack], session_id: str, *, now: datetime
    ) -> None:
        for item in items:
            await conn.execute(
                update(TASKS)
                .where(
                    _c.task_id == item.task_id,
                    _c.attempt == item.attempt,
                    _c.session_id == session_id,
                    _c.state == State.ASSIGNED,
                )
                .values(requeued_values(now, not_before=item.retry_at, waiting_reason=item.reason))
            )

    async def fail_claimed(
        self, conn: Executor, claimed: Claimed, session_id: str, error: str, *, now: datetime
    ) -> bool:
        result = await conn.execute(
            update(TASKS)
            .where(
                _c.task_id == claimed.task_id,
                _c.attempt == claimed.attempt,
                _c.session_id == session_id,
                _c.state == State.ASSIGNED,
            )
            .values(ended_values(State.FAILED, now, error=error))
        )
        return rowcount(result) == 1

    async def retry_or_fail(self, conn: Executor, retry: Retry, *, now: datetime) -> State | None:
        row = (
            await conn.execute(
                select(
                    _c.state,
                    _c.attempt,
                    _c.max_attempts,
                    _c.rate_limited,
                    _c.cancel_requested,
                    _c.error,
                ).where(_c.task_id == retry.task_id)
            )
        ).first()
        if row is None or row.attempt != retry.attempt or row.state not in HELD:
            return None
        free = retry.rate_limited and row.rate_limited < MAX_RATE_LIMITED
        counted = row.attempt - row.rate_limited - (1 if free else 0)
        values: dict[str, Any]
        if row.cancel_requested:
            new_state = State.CANCELLED
            values = ended_values(new_state, now, error=row.error or "cancelled")
        elif counted >= row.max_attempts:
            new_state = retry.exhausted_state
            error = f"{retry.error} (attempt {retry.attempt} of {row.max_attempts})"
            values = ended_values(new_state, now, error=error)
        else:
            new_state = State.QUEUED
            values = requeued_values(
                now,
                attempt=retry.attempt + 1,
                error=retry.error,
                queued_at=now,
                not_before=now + retry.backoff if retry.backoff > timedelta(0) else None,
                started_at=None,
                waiting_reason="",
                rate_limited=row.rate_limited + (1 if free else 0),
            )
        conditions = [_c.task_id == retry.task_id, _c.attempt == retry.attempt, _c.state.in_(HELD)]
        if retry.agent_id is not None:
            conditions.append(_c.agent_id == retry.agent_id)
        if retry.session_id is not None:
            conditions.append(_c.session_id == retry.session_id)
        if retry.lease_expired_before is not None:
            conditions.append(_c.lease_expires_at < retry.lease_expired_before)
        result = await conn.execute(update(TASKS).where(*conditions).values(values))
        return new_state if rowcount(result) == 1 else None

    async def adopt(
        self,
        conn: Executor,
        agent_id: str,
        session_id: str,
        attempts: Sequence[tuple[str, int]],
        *,
        lease: timedelta,
        now: datetime,
    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        adopted: list[tuple[str, int]] = []
        lost: list[tuple[str, int]] = []
        for task_id, attempt in attempts:
            result = await conn.execute(
                update(TASKS)
                .where(
                    _c.task_id == task_id,
                    _c.attempt == attempt,
                    _c.agent_id == agent_id,
                    _c.state.in_(HELD),
                )
                .values(session_id=session_id, lease_expires_at=now + lease, updated_at=now)
            )
            (adopted if rowcount(result) == 1 else lost).append((task_id, attempt))
        return adopted, lost

    async def hand_over(
        self, conn: Executor, session_id: str, until: datetime, *, now: datetime
    ) -> int:
        result = await conn.execute(
            update(TASKS)
            .where(_c.session_id == session_id, _c.state.in_(HELD))
            .values(lease_expires_at=until, updated_at=now)
        )
        return rowcount(result)

    async def request_cancel(
        self, session: AsyncSession, task_id: str, reason: str, *, now: datetime
    ) -> Task | None:
        task = await self.get(session, task_id)
        if task is None or task.state in TERMINAL:
            return task
        message = reason or "cancelled by request"
        if task.state == State.QUEUED:
            await session.execute(
                update(TASKS)
                .where(_c.task_id == task_id, _c.state == State.QUEUED, _c.attempt == task.attempt)
                .values(ended_values(State.CANCELLED, now, error=message, cancel_requested=True))
            )
        else:
            await session.execute(
                update(TASKS)
                .where(_c.task_id == task_id, _c.attempt == task.attempt)
                .values(cancel_requested=True, error=message, updated_at=now)
            )
        return await self.get(session, task_id)

    async def time_out_expired(
        self, conn: Executor, now: datetime, *, limit: int = OVERDUE_BATCH
    ) -> tuple[list[Held], list[TimedOut]]:
        past_deadline = and_(_c.deadline.is_not(None), _c.deadline < now)
        waited_too_long = and_(
            _c.state == State.QUEUED,
            _c.schedule_to_start_timeout.is_not(None),
            plus_seconds(_c.queued_at, _c.schedule_to_start_timeout) < instant(now),
        )
        rows = await conn.execute(
            select(*HELD_COLUMNS, _c.state, past_deadline.label("past_deadline"), _c.waiting_reason)
            .where(_c.state.in_((State.QUEUED, *HELD)), or_(past_deadline, waited_too_long))
            .limit(limit)
        )
        stopped: list[Held] = []
        ended: list[TimedOut] = []
        for row in rows.all():
            state = row.state
            reason = (
                "deadline exceeded" if row.past_deadline else "schedule-to-start timeout exceeded"
            )
            if state == State.QUEUED and row.waiting_reason:
                reason = f"{reason} ({row.waiting_reason})"
            result = await conn.execute(
                update(TASKS)
                .where(_c.task_id == row.task_id, _c.attempt == row.attempt, _c.state == state)
                .values(ended_values(State.TIMED_OUT, now, error=reason))
            )
            if rowcount(result) == 1:
                ended.append(TimedOut(row.task_id, row.attempt, reason))
                if state in HELD:
                    stopped.append(held(row))
        return stopped, ended

    # Reads.

    async def attempt_of(self, conn: Executor, task_id: str) -> Current | None:
        row = (
            await conn.execute(
                select(_c.attempt, _c.agent_id, _c.state).where(_c.task_id == task_id)
            )
        ).first()
        return Current(row.attempt, row.agent_id, State(row.state)) if row is not None else None

    async def signature_of(self, conn: Executor, task_id: str) -> bytes | None:
        row = (await conn.execute(select(_c.signature).where(_c.task_id == task_id))).first()
        return row.signature if row is not None else None

    async def kind_and_model(self, conn: Executor, task_id: str) -> tuple[str, str | None] | None:
        row = (await conn.execute(select(_c.kind, _c.model).where(_c.task_id == task_id))).first()
        return (row.kind, row.model) if row is not None else None

    async def held_by_session(self, conn: Executor, session_id: str) -> list[Held]:
        rows = await conn.execute(
            select(*HELD_COLUMNS).where(_c.session_id == session_id, _c.state.in_(HELD))
        )
        return [held(row) for row in rows]

    async def held_by_sessions(self, conn: Executor, session_ids: set[str]) -> list[Held]:
        # Reads every held attempt and keeps this replica's here: sending thousands of
        # stream ids as parameters cost more than the rows.
        if not session_ids:
            return []
        rows = await conn.execute(select(*HELD_COLUMNS).where(_c.state.in_(HELD)))
        return [held(row) for row in rows if row.session_id in session_ids]

    async def held_attempts(
        self, conn: Executor, attempts: Sequence[tuple[str, int]]
    ) -> set[tuple[str, int]]:
        if not attempts:
            return set()
        rows = await conn.execute(
            select(_c.task_id, _c.attempt).where(
                _c.task_id.in_({task_id for task_id, _ in attempts}), _c.state.in_(HELD)
            )
        )
        wanted = set(attempts)
        return {(row.task_id, row.attempt) for row in rows} & wanted

    async def held_with_reservations(self, conn: Executor) -> list[Claimed]:
        rows = await conn.execute(
            select(*CLAIMED_COLUMNS).where(_c.state.in_(HELD), _c.reserve_micros > 0)
        )
        return [claimed(row) for row in rows]

    async def expired_leases(self, conn: Executor, now: datetime, limit: int = 500) -> list[Held]:
        rows = await conn.execute(
            select(*HELD_COLUMNS).where(_c.state.in_(HELD), _c.lease_expires_at < now).limit(limit)
        )
        return [held(row) for row in rows]

    async def overrun_attempts(
        self, conn: Executor, now: datetime, limit: int = OVERDUE_BATCH
    ) -> list[Held]:
        due = plus_seconds(_c.started_at, _c.start_to_close_timeout)
        rows = await conn.execute(
            select(*HELD_COLUMNS)
            .where(
                _c.state == State.RUNNING,
                _c.start_to_close_timeout.is_not(None),
                _c.started_at.is_not(None),
                due < instant(now),
            )
            .order_by(due)
            .limit(limit)
        )
        return [held(row) for row in rows]

    async def cancel_requested(
        self, conn: Executor, session_ids: set[str]
    ) -> list[tuple[str, int, str, str]]:
        # Few rows: filtered here rather than by sending thousands of stream ids.
        if not session_ids:
            return []
        rows = await conn.execute(
            select(_c.task_id, _c.attempt, _c.session_id, _c.error).where(
                _c.cancel_requested.is_(True), _c.state.in_(HELD)
            )
        )
        return [
            (row.task_id, row.attempt, row.session_id, row.error)
            for row in rows
            if row.session_id in session_ids
        ]

    async def claimable(
        self, conn: Executor, pools: set[str], *, now: datetime
    ) -> list[tuple[str, str, int]]:
        rows = await conn.execute(
            select(_c.pool, _c.kind, func.count().label("n"))
            .where(_c.state == State.QUEUED, _c.pool.in_(pools), ready(now))
            .group_by(_c.pool, _c.kind)
        )
        return [(row.pool, row.kind, row.n) for row in rows]

    async def queue_stats(self, conn: Executor) -> list[tuple[str, str, int, datetime | None]]:
        rows = await conn.execute(
            select(
                _c.pool, _c.kind, func.count().label("n"), func.min(_c.queued_at).label("oldest")
            )
            .where(_c.state == State.QUEUED)
            .group_by(_c.pool, _c.kind)
        )
        return [(row.pool, row.kind, row.n, row.oldest) for row in rows]
