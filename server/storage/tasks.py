"""Task state transitions. Each is one conditional UPDATE, so two replicas (or two
coroutines) can never move the same attempt twice: the row count says who won."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, cast, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from server.storage.models import Task
from server.storage.types import utcnow

QUEUED = "QUEUED"
ASSIGNED = "ASSIGNED"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"
HELD = (ASSIGNED, RUNNING)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT})

CLAIM_SCAN = 200
"""How many queued candidates one claim looks at; label selectors are matched in Python."""


@dataclass(frozen=True, slots=True)
class Held:
    """An attempt an agent holds, as reported by a transition that took it away."""

    task_id: str
    attempt: int
    agent_id: str | None
    session_id: str | None
    pool: str
    owner: str

    @property
    def holder(self) -> str:
        """Names this attempt in concurrency leases."""
        return f"{self.task_id}:{self.attempt}"


HELD_COLUMNS = (Task.task_id, Task.attempt, Task.agent_id, Task.session_id, Task.pool, Task.owner)


async def insert_task(session: AsyncSession, values: dict[str, Any]) -> tuple[Task, bool]:
    """Insert a task; with an idempotency key already used by this owner, return that task."""
    key = values.get("idempotency_key")
    if key:
        existing = await _by_idempotency_key(session, values["owner"], key)
        if existing is not None:
            return existing, False
    task = Task(**values)
    try:
        async with session.begin_nested():
            session.add(task)
            await session.flush()
    except IntegrityError:
        existing = await _by_idempotency_key(session, values["owner"], key or "")
        if existing is None:
            raise
        return existing, False
    return task, True


async def _by_idempotency_key(session: AsyncSession, owner: str, key: str) -> Task | None:
    result = await session.execute(
        select(Task).where(Task.owner == owner, Task.idempotency_key == key)
    )
    return result.scalar_one_or_none()


async def get(session: AsyncSession, task_id: str) -> Task | None:
    return await session.get(Task, task_id, populate_existing=True)


async def list_tasks(
    session: AsyncSession,
    *,
    states: Sequence[str],
    pool: str,
    kind: str,
    owner: str | None,
    limit: int,
    before: tuple[datetime, str] | None,
) -> list[Task]:
    """Newest first; ``before`` is (created_at, task_id) of the previous page's last row."""
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
            or_(Task.created_at < created, and_(Task.created_at == created, Task.task_id < task_id))
        )
    query = query.order_by(Task.created_at.desc(), Task.task_id.desc()).limit(limit)
    return list((await session.execute(query)).scalars())


def _ready(now: datetime) -> Any:
    """A queued task may be claimed now: it has no retry backoff left to wait out."""
    return or_(Task.not_before.is_(None), Task.not_before <= now)


def _assignment(
    agent_id: str, session_id: str, accept_by: datetime, now: datetime
) -> dict[str, Any]:
    """The columns a claim sets: who holds the attempt, and until when it must be Accepted."""
    return {
        "state": ASSIGNED,
        "agent_id": agent_id,
        "session_id": session_id,
        "lease_expires_at": accept_by,
        "updated_at": now,
    }


async def claim(
    session: AsyncSession,
    *,
    pool: str,
    labels: dict[str, str],
    kinds: Sequence[str],
    agent_id: str,
    session_id: str,
    limit: int,
    accept_timeout: timedelta,
) -> list[Task]:
    """Move up to ``limit`` matching QUEUED tasks to ASSIGNED for this stream.

    Highest priority first, then the longest-waiting. On Postgres one statement picks
    and takes the rows (``FOR UPDATE SKIP LOCKED``: replicas never wait on each other,
    never take the same row). Elsewhere a compare-and-set on ``(state, attempt)`` per
    candidate makes the claim safe against every other claimer.
    """
    if session.bind.dialect.name == "postgresql":
        return await _claim_skip_locked(
            session,
            pool=pool,
            labels=labels,
            kinds=kinds,
            agent_id=agent_id,
            session_id=session_id,
            limit=limit,
            accept_timeout=accept_timeout,
        )
    now = utcnow()
    candidates = await session.execute(
        select(Task.task_id, Task.attempt, Task.selector)
        .where(
            Task.state == QUEUED,
            Task.pool == pool,
            Task.kind.in_(kinds),
            _ready(now),
        )
        .order_by(Task.priority.desc(), Task.queued_at, Task.task_id)
        .limit(CLAIM_SCAN)
    )
    claimed: list[str] = []
    for task_id, attempt, selector in candidates:
        if len(claimed) >= limit:
            break
        if any(labels.get(k) != v for k, v in (selector or {}).items()):
            continue
        result = await session.execute(
            update(Task)
            .where(Task.task_id == task_id, Task.state == QUEUED, Task.attempt == attempt)
            .values(_assignment(agent_id, session_id, now + accept_timeout, now))
        )
        if _rowcount(result) == 1:
            claimed.append(task_id)
    if not claimed:
        return []
    rows = await session.execute(
        select(Task).where(Task.task_id.in_(claimed)).execution_options(populate_existing=True)
    )
    by_id = {t.task_id: t for t in rows.scalars()}
    return [by_id[t] for t in claimed]


async def _claim_skip_locked(
    session: AsyncSession,
    *,
    pool: str,
    labels: dict[str, str],
    kinds: Sequence[str],
    agent_id: str,
    session_id: str,
    limit: int,
    accept_timeout: timedelta,
) -> list[Task]:
    now = utcnow()
    picked = (
        select(Task.task_id)
        .where(
            Task.state == QUEUED,
            Task.pool == pool,
            Task.kind.in_(kinds),
            _ready(now),
            # The selector is satisfied when the agent's labels contain all of it.
            cast(Task.selector, JSONB).contained_by(literal(labels, JSONB)),
        )
        .order_by(Task.priority.desc(), Task.queued_at, Task.task_id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = await session.execute(
        update(Task)
        .where(Task.task_id.in_(picked.scalar_subquery()))
        .values(_assignment(agent_id, session_id, now + accept_timeout, now))
        .returning(Task)
        .execution_options(synchronize_session=False)
    )
    claimed = list(result.scalars())
    claimed.sort(key=lambda t: (-t.priority, t.queued_at, t.task_id))
    return claimed


async def unclaim(
    session: AsyncSession, attempts: Sequence[tuple[str, int]], session_id: str, retry_at: datetime
) -> None:
    """Give back claimed attempts that were not sent (an in-flight limit said no).

    The attempt number stays: nothing was delivered. ``retry_at`` keeps the pump from
    taking the same tasks straight back while their tenant or pool is full.
    """
    now = utcnow()
    for task_id, attempt in attempts:
        await session.execute(
            update(Task)
            .where(
                Task.task_id == task_id,
                Task.attempt == attempt,
                Task.session_id == session_id,
                Task.state == ASSIGNED,
            )
            .values(
                state=QUEUED,
                agent_id=None,
                session_id=None,
                lease_expires_at=None,
                not_before=retry_at,
                updated_at=now,
            )
        )


async def held_by_sessions(session: AsyncSession, session_ids: set[str]) -> list[Held]:
    """Every attempt held by the given streams (to renew their concurrency leases)."""
    if not session_ids:
        return []
    rows = await session.execute(
        select(*HELD_COLUMNS).where(Task.session_id.in_(session_ids), Task.state.in_(HELD))
    )
    return [Held(*row) for row in rows]


async def accept(
    session: AsyncSession, task_id: str, attempt: int, session_id: str, lease: timedelta
) -> bool:
    now = utcnow()
    result = await session.execute(
        update(Task)
        .where(
            Task.task_id == task_id,
            Task.attempt == attempt,
            Task.session_id == session_id,
            Task.state == ASSIGNED,
        )
        .values(state=RUNNING, started_at=now, lease_expires_at=now + lease, updated_at=now)
    )
    return _rowcount(result) == 1


async def renew_leases(
    session: AsyncSession, session_id: str, attempts: Sequence[tuple[str, int]], lease: timedelta
) -> int:
    """Extend the leases of the attempts this stream still reports; returns how many."""
    if not attempts:
        return 0
    now = utcnow()
    ids = [task_id for task_id, _ in attempts]
    result = await session.execute(
        update(Task)
        .where(Task.session_id == session_id, Task.state.in_(HELD), Task.task_id.in_(ids))
        .values(lease_expires_at=now + lease)
    )
    return _rowcount(result)


async def adopt(
    session: AsyncSession,
    agent_id: str,
    session_id: str,
    attempts: Sequence[tuple[str, int]],
    lease: timedelta,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Move attempts an agent still holds onto its new stream.

    Returns (adopted, lost): lost attempts are no longer this agent's current attempt.
    """
    adopted: list[tuple[str, int]] = []
    lost: list[tuple[str, int]] = []
    now = utcnow()
    for task_id, attempt in attempts:
        result = await session.execute(
            update(Task)
            .where(
                Task.task_id == task_id,
                Task.attempt == attempt,
                Task.agent_id == agent_id,
                Task.state.in_(HELD),
            )
            .values(session_id=session_id, lease_expires_at=now + lease, updated_at=now)
        )
        (adopted if _rowcount(result) == 1 else lost).append((task_id, attempt))
    return adopted, lost


async def finish(
    session: AsyncSession,
    *,
    task_id: str,
    attempt: int,
    agent_id: str,
    state: str,
    output: bytes,
    error: str,
    usage: tuple[int, int, int],
) -> bool:
    """Record the end of the current attempt; False when it is not current (stale)."""
    now = utcnow()
    result = await session.execute(
        update(Task)
        .where(
            Task.task_id == task_id,
            Task.attempt == attempt,
            Task.agent_id == agent_id,
            Task.state.in_(HELD),
        )
        .values(
            state=state,
            output=output,
            error=error,
            finished_at=now,
            updated_at=now,
            session_id=None,
            lease_expires_at=None,
            input_tokens=usage[0],
            output_tokens=usage[1],
            cost_micros=usage[2],
        )
    )
    return _rowcount(result) == 1


async def retry_or_fail(
    session: AsyncSession,
    *,
    task_id: str,
    attempt: int,
    error: str,
    backoff: timedelta,
    exhausted_state: str = FAILED,
    extra_where: Sequence[Any] = (),
) -> str | None:
    """End the held attempt: requeue as attempt + 1, or end the task once attempts run out.

    A task whose cancellation was requested ends CANCELLED instead. Returns the new state,
    or None when the attempt was not current.
    """
    now = utcnow()
    task = await session.get(Task, task_id, populate_existing=True)
    if task is None or task.attempt != attempt or task.state not in HELD:
        return None
    if task.cancel_requested:
        new_state, values = CANCELLED, {"error": task.error or "cancelled", "finished_at": now}
    elif task.attempt >= task.max_attempts:
        new_state = exhausted_state
        values = {
            "error": f"{error} (attempt {attempt} of {task.max_attempts})",
            "finished_at": now,
        }
    else:
        new_state = QUEUED
        values = {
            "attempt": attempt + 1,
            "error": error,
            "queued_at": now,
            "not_before": now + backoff if backoff > timedelta(0) else None,
            "agent_id": None,
            "started_at": None,
        }
    result = await session.execute(
        update(Task)
        .where(Task.task_id == task_id, Task.attempt == attempt, Task.state.in_(HELD), *extra_where)
        .values(state=new_state, session_id=None, lease_expires_at=None, updated_at=now, **values)
    )
    return new_state if _rowcount(result) == 1 else None


async def held_by_session(session: AsyncSession, session_id: str) -> list[Held]:
    rows = await session.execute(
        select(*HELD_COLUMNS).where(Task.session_id == session_id, Task.state.in_(HELD))
    )
    return [Held(*row) for row in rows]


async def expired_leases(session: AsyncSession, now: datetime, limit: int = 500) -> list[Held]:
    rows = await session.execute(
        select(*HELD_COLUMNS).where(Task.state.in_(HELD), Task.lease_expires_at < now).limit(limit)
    )
    return [Held(*row) for row in rows]


async def overrun_attempts(session: AsyncSession, now: datetime, limit: int = 500) -> list[Held]:
    """Running attempts past their start-to-close timeout."""
    rows = await session.execute(
        select(*HELD_COLUMNS, Task.started_at, Task.start_to_close_timeout)
        .where(Task.state == RUNNING, Task.start_to_close_timeout.is_not(None))
        .limit(limit)
    )
    return [
        Held(t, a, ag, s, p, o)
        for t, a, ag, s, p, o, started, timeout in rows
        if started is not None
        and timeout is not None
        and started + timedelta(seconds=timeout) < now
    ]


async def time_out_expired(session: AsyncSession, now: datetime) -> list[Held]:
    """End tasks past their deadline, or queued past their schedule-to-start timeout.

    Returns the attempts that were held by an agent, which must be told to stop.
    """
    candidates = await session.execute(
        select(
            *HELD_COLUMNS,
            Task.state,
            Task.deadline,
            Task.queued_at,
            Task.schedule_to_start_timeout,
        ).where(
            Task.state.in_((QUEUED, *HELD)),
            or_(Task.deadline < now, Task.schedule_to_start_timeout.is_not(None)),
        )
    )
    stopped: list[Held] = []
    for (
        task_id,
        attempt,
        agent_id,
        session_id,
        pool,
        owner,
        state,
        deadline,
        queued_at,
        s2s,
    ) in candidates:
        if deadline is not None and deadline < now:
            reason = "deadline exceeded"
        elif state == QUEUED and s2s is not None and queued_at + timedelta(seconds=s2s) < now:
            reason = "schedule-to-start timeout exceeded"
        else:
            continue
        result = await session.execute(
            update(Task)
            .where(Task.task_id == task_id, Task.attempt == attempt, Task.state == state)
            .values(
                state=TIMED_OUT,
                error=reason,
                finished_at=now,
                updated_at=now,
                session_id=None,
                lease_expires_at=None,
            )
        )
        if _rowcount(result) == 1 and state in HELD:
            stopped.append(Held(task_id, attempt, agent_id, session_id, pool, owner))
    return stopped


async def request_cancel(session: AsyncSession, task_id: str, reason: str) -> Task | None:
    """Cancel a queued task at once; mark a held one so its agent is told to stop."""
    now = utcnow()
    task = await session.get(Task, task_id, populate_existing=True)
    if task is None or task.state in TERMINAL:
        return task
    message = reason or "cancelled by request"
    if task.state == QUEUED:
        await session.execute(
            update(Task)
            .where(Task.task_id == task_id, Task.state == QUEUED, Task.attempt == task.attempt)
            .values(
                state=CANCELLED,
                error=message,
                cancel_requested=True,
                finished_at=now,
                updated_at=now,
            )
        )
    else:
        await session.execute(
            update(Task)
            .where(Task.task_id == task_id, Task.attempt == task.attempt)
            .values(cancel_requested=True, error=message, updated_at=now)
        )
    return await session.get(Task, task_id, populate_existing=True)


async def cancel_requested(
    session: AsyncSession, session_ids: set[str]
) -> list[tuple[str, int, str, str]]:
    """(task_id, attempt, session_id, reason) of held attempts whose cancel was requested."""
    if not session_ids:
        return []
    rows = await session.execute(
        select(Task.task_id, Task.attempt, Task.session_id, Task.error).where(
            Task.session_id.in_(session_ids), Task.cancel_requested.is_(True), Task.state.in_(HELD)
        )
    )
    return [(t, a, s or "", e) for t, a, s, e in rows]


async def claimable(session: AsyncSession, pools: set[str]) -> list[tuple[str, str, int]]:
    """(pool, kind, count) of queued tasks that may be claimed now, in ``pools``."""
    now = utcnow()
    rows = await session.execute(
        select(Task.pool, Task.kind, func.count())
        .where(
            Task.state == QUEUED,
            Task.pool.in_(pools),
            _ready(now),
        )
        .group_by(Task.pool, Task.kind)
    )
    return [(pool, kind, count) for pool, kind, count in rows]


async def queue_stats(session: AsyncSession) -> list[tuple[str, int, datetime | None]]:
    """(pool, queued count, oldest queued_at) for the metrics gauges."""
    rows = await session.execute(
        select(Task.pool, func.count(), func.min(Task.queued_at))
        .where(Task.state == QUEUED)
        .group_by(Task.pool)
    )
    return [(pool, count, oldest) for pool, count, oldest in rows]


def _rowcount(result: Any) -> int:
    return int(result.rowcount)
