"""Task state transitions. Each is one conditional UPDATE, so two replicas (or two
coroutines) can never move the same attempt twice: the row count says who won."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Table,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from muster.server.storage import usage as usage_store
from muster.server.storage.models import Task
from muster.server.storage.timing import instant, plus_seconds
from muster.server.storage.types import UTCDateTime
from muster.server.storage.usage import AttemptCost, Used

QUEUED = "QUEUED"
ASSIGNED = "ASSIGNED"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"
HELD = (ASSIGNED, RUNNING)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, TIMED_OUT})

MAX_RATE_LIMITED = 20
"""Attempts a provider's rate limit may cost a task without counting against max_attempts."""

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
    reserve_micros: int = 0
    """Non-zero when the attempt holds a budget reservation (an AI kind)."""

    @property
    def holder(self) -> str:
        """Names this attempt in concurrency leases and budget reservations."""
        return attempt_key(self.task_id, self.attempt)


def attempt_key(task_id: str, attempt: int) -> str:
    """``task:attempt``: how concurrency leases and budget reservations name an attempt."""
    return f"{task_id}:{attempt}"


HELD_COLUMNS = (
    Task.task_id,
    Task.attempt,
    Task.agent_id,
    Task.session_id,
    Task.pool,
    Task.owner,
    Task.reserve_micros,
)


def _held(row: Any) -> Held:
    mapping = row._mapping
    return Held(**{name: mapping[name] for name in Held.__slots__})


TASKS: Table = Task.__table__  # type: ignore[assignment]
"""The hot path (insert, claim, accept, heartbeat, finish) runs Core statements on this
table in shared transactions (server/storage/batch.py): no ORM objects, no session."""
_c = TASKS.c


@dataclass(frozen=True, slots=True)
class Claimed:
    """A queued attempt a claim handed to one stream: what its Assignment carries."""

    task_id: str
    attempt: int
    kind: str
    payload: bytes
    pool: str
    owner: str
    priority: int
    queued_at: datetime
    start_to_close_timeout: float | None
    deadline: datetime | None
    model: str | None
    reserve_micros: int
    """An AI attempt's worst-case cost, to reserve before it is sent; 0: not budgeted."""
    max_cost_micros: int | None
    output_schema: str | None
    waiting_reason: str
    """Why the task was last held back (to audit a new reason once, not every claim)."""
    signature: bytes | None
    """A signed task's envelope (a serialized TaskSignature), for its Assignment."""
    ceiling_micros: int = 0
    """What was reserved for this attempt (set after the claim): the Assignment's ceiling."""


CLAIMED_NAMES = tuple(name for name in Claimed.__slots__ if name != "ceiling_micros")
CLAIMED_COLUMNS = tuple(_c[name] for name in CLAIMED_NAMES)


def _claimed(row: Any) -> Claimed:
    mapping = row._mapping
    return Claimed(**{name: mapping[name] for name in CLAIMED_NAMES})


@dataclass(frozen=True, slots=True)
class Finished:
    """An attempt a Result ended, as its row says after the change."""

    owner: str
    pool: str
    kind: str
    started_at: datetime | None
    model: str | None
    reserve_micros: int


FINISHED_COLUMNS = tuple(_c[name] for name in Finished.__slots__)


def _finished(row: Any) -> Finished:
    mapping = row._mapping
    return Finished(**{name: mapping[name] for name in Finished.__slots__})


async def insert_task(session: AsyncSession, values: dict[str, Any]) -> tuple[Task, bool]:
    """Insert a task; with an idempotency key already used by this owner, or a signed
    task's id already taken (its envelope submitted before), return that task."""
    existing = await _earlier(session, values)
    if existing is not None:
        return existing, False
    task = Task(**values)
    try:
        async with session.begin_nested():
            session.add(task)
            await session.flush()
    except IntegrityError:
        existing = await _earlier(session, values)
        if existing is None:
            raise
        return existing, False
    return task, True


async def _earlier(session: AsyncSession, values: dict[str, Any]) -> Task | None:
    """The task a submission repeats: same owner and idempotency key, or same signed id."""
    key = values.get("idempotency_key")
    if key:
        existing = await _by_idempotency_key(session, values["owner"], key)
        if existing is not None:
            return existing
    if values.get("signature") is not None:
        return await get(session, values["task_id"])
    return None


async def insert_many(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> list[None]:
    """Insert tasks that have no idempotency key (nothing to look up first), in one
    statement; every row must have the same columns."""
    await conn.execute(insert(TASKS), list(rows))
    return [None] * len(rows)


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
    return or_(_c.not_before.is_(None), _c.not_before <= now)


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


@dataclass(frozen=True, slots=True)
class ClaimRequest:
    """One stream asking for up to ``limit`` tasks it can run."""

    pool: str
    labels: dict[str, str]
    kinds: tuple[str, ...]
    agent_id: str
    session_id: str
    limit: int

    @property
    def key(self) -> tuple[object, ...]:
        """Streams with the same key can run the same tasks: one statement serves them."""
        return ("claim", self.pool, tuple(sorted(self.labels.items())), self.kinds)


_CLAIM_MANY = text(
    """
    WITH picked AS (
        SELECT task_id, priority, queued_at FROM tasks
        WHERE state = 'QUEUED' AND pool = :pool AND kind = ANY(CAST(:kinds AS text[]))
          AND (not_before IS NULL OR not_before <= :now)
          AND CAST(selector AS jsonb) <@ CAST(:labels AS jsonb)
        ORDER BY priority DESC, queued_at, task_id
        LIMIT :total
        FOR UPDATE SKIP LOCKED
    ), ranked AS (
        SELECT task_id, row_number() OVER (ORDER BY priority DESC, queued_at, task_id) AS n
        FROM picked
    ), slots AS (
        SELECT * FROM unnest(CAST(:agents AS text[]), CAST(:sessions AS text[]))
                      WITH ORDINALITY AS s(agent_id, session_id, n)
    )
    UPDATE tasks SET state = 'ASSIGNED', agent_id = slots.agent_id,
                     session_id = slots.session_id, lease_expires_at = :accept_by,
                     updated_at = :now
    FROM ranked JOIN slots USING (n)
    WHERE tasks.task_id = ranked.task_id
    RETURNING tasks.session_id, tasks.task_id, tasks.attempt, tasks.kind, tasks.payload,
              tasks.pool, tasks.owner, tasks.priority, tasks.queued_at,
              tasks.start_to_close_timeout, tasks.deadline, tasks.model, tasks.reserve_micros,
              tasks.max_cost_micros, tasks.output_schema, tasks.waiting_reason,
              tasks.signature
    """
).bindparams(
    bindparam("now", type_=UTCDateTime),
    bindparam("accept_by", type_=UTCDateTime),
    bindparam("labels", type_=JSON),
)


async def claim_many(
    conn: AsyncConnection,
    requests: Sequence[ClaimRequest],
    *,
    accept_timeout: timedelta,
    now: datetime,
) -> list[list[Claimed]]:
    """Move matching QUEUED tasks to ASSIGNED for several streams that share a
    :attr:`ClaimRequest.key`; per request, the tasks it got (at most its ``limit``).

    Highest priority first, then the longest-waiting; dealt round-robin, so a short queue
    is spread over the streams. On Postgres one statement picks and takes the rows
    (``FOR UPDATE SKIP LOCKED``: replicas never wait on each other, never take the same
    row). Elsewhere a compare-and-set on ``(state, attempt)`` per candidate makes each
    claim safe against every other claimer.
    """
    if conn.dialect.name != "postgresql":
        return [await _claim_one(conn, r, now, accept_timeout) for r in requests]
    deepest = max(r.limit for r in requests)
    slots = [r for depth in range(deepest) for r in requests if r.limit > depth]
    first = requests[0]
    result = await conn.execute(
        _CLAIM_MANY,
        {
            "pool": first.pool,
            "kinds": list(first.kinds),
            "labels": first.labels,
            "now": now,
            "accept_by": now + accept_timeout,
            "total": len(slots),
            "agents": [r.agent_id for r in slots],
            "sessions": [r.session_id for r in slots],
        },
    )
    by_session: dict[str, list[Claimed]] = {r.session_id: [] for r in requests}
    for row in result:
        by_session[row.session_id].append(_claimed(row))
    for claimed in by_session.values():
        claimed.sort(key=lambda t: (-t.priority, t.queued_at, t.task_id))
    return [by_session[r.session_id] for r in requests]


async def _claim_one(
    conn: AsyncConnection, request: ClaimRequest, now: datetime, accept_timeout: timedelta
) -> list[Claimed]:
    candidates = await conn.execute(
        select(_c.task_id, _c.attempt, _c.selector)
        .where(
            _c.state == QUEUED,
            _c.pool == request.pool,
            _c.kind.in_(request.kinds),
            _ready(now),
        )
        .order_by(_c.priority.desc(), _c.queued_at, _c.task_id)
        .limit(CLAIM_SCAN)
    )
    assignment = _assignment(request.agent_id, request.session_id, now + accept_timeout, now)
    taken: list[str] = []
    for task_id, attempt, selector in candidates.all():
        if len(taken) >= request.limit:
            break
        if any(request.labels.get(k) != v for k, v in (selector or {}).items()):
            continue
        result = await conn.execute(
            update(TASKS)
            .where(_c.task_id == task_id, _c.state == QUEUED, _c.attempt == attempt)
            .values(assignment)
        )
        if _rowcount(result) == 1:
            taken.append(task_id)
    if not taken:
        return []
    rows = await conn.execute(select(*CLAIMED_COLUMNS).where(_c.task_id.in_(taken)))
    by_id = {row.task_id: _claimed(row) for row in rows}
    return [by_id[t] for t in taken]


@dataclass(frozen=True, slots=True)
class HoldBack:
    """A claimed attempt that may not be sent yet, why, and until when."""

    task_id: str
    attempt: int
    retry_at: datetime
    reason: str = ""
    """Shown as the task's waiting reason (empty: a passing limit not worth showing)."""


async def unclaim(
    session: AsyncSession, items: Sequence[HoldBack], session_id: str, *, now: datetime
) -> None:
    """Give back claimed attempts that were not sent (a limit or a budget said no).

    The attempt number stays: nothing was delivered. ``retry_at`` keeps the pump from
    taking the same tasks straight back while what held them back lasts.
    """
    for item in items:
        await session.execute(
            update(Task)
            .where(
                Task.task_id == item.task_id,
                Task.attempt == item.attempt,
                Task.session_id == session_id,
                Task.state == ASSIGNED,
            )
            .values(
                state=QUEUED,
                agent_id=None,
                session_id=None,
                lease_expires_at=None,
                not_before=item.retry_at,
                waiting_reason=item.reason,
                updated_at=now,
            )
        )


async def fail_claimed(
    session: AsyncSession,
    task_id: str,
    attempt: int,
    session_id: str,
    error: str,
    *,
    now: datetime,
) -> bool:
    """End a claimed, unsent attempt's task as FAILED (its own spend cap is used up)."""
    result = await session.execute(
        update(Task)
        .where(
            Task.task_id == task_id,
            Task.attempt == attempt,
            Task.session_id == session_id,
            Task.state == ASSIGNED,
        )
        .values(
            state=FAILED,
            error=error,
            session_id=None,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
    )
    return _rowcount(result) == 1


async def held_by_sessions(session: AsyncSession, session_ids: set[str]) -> list[Held]:
    """Every attempt held by the given streams (to renew their concurrency leases).

    Reads every held attempt and keeps this replica's here: sending thousands of stream
    ids as parameters cost more than the rows."""
    if not session_ids:
        return []
    rows = await session.execute(select(*HELD_COLUMNS).where(Task.state.in_(HELD)))
    return [_held(row) for row in rows if row.session_id in session_ids]


async def accept(
    conn: AsyncConnection,
    task_id: str,
    attempt: int,
    session_id: str,
    lease: timedelta,
    *,
    now: datetime,
) -> bool:
    result = await conn.execute(
        update(TASKS)
        .where(
            _c.task_id == task_id,
            _c.attempt == attempt,
            _c.session_id == session_id,
            _c.state == ASSIGNED,
        )
        .values(state=RUNNING, started_at=now, lease_expires_at=now + lease, updated_at=now)
    )
    return _rowcount(result) == 1


@dataclass(frozen=True, slots=True)
class Acceptance:
    task_id: str
    attempt: int
    session_id: str


_ACCEPT_MANY = text(
    """
    UPDATE tasks SET state = 'RUNNING', started_at = :now, lease_expires_at = :lease,
                     updated_at = :now
    FROM unnest(CAST(:ids AS text[]), CAST(:attempts AS int[]), CAST(:sessions AS text[]))
         AS v(task_id, attempt, session_id)
    WHERE tasks.task_id = v.task_id AND tasks.attempt = v.attempt
      AND tasks.session_id = v.session_id AND tasks.state = 'ASSIGNED'
    RETURNING tasks.task_id, tasks.attempt
    """
).bindparams(bindparam("now", type_=UTCDateTime), bindparam("lease", type_=UTCDateTime))


async def accept_many(
    conn: AsyncConnection, items: Sequence[Acceptance], *, lease: timedelta, now: datetime
) -> list[bool]:
    """:func:`accept` for many attempts; on Postgres in one statement."""
    if conn.dialect.name != "postgresql":
        return [
            await accept(conn, a.task_id, a.attempt, a.session_id, lease, now=now) for a in items
        ]
    result = await conn.execute(
        _ACCEPT_MANY,
        {
            "now": now,
            "lease": now + lease,
            "ids": [a.task_id for a in items],
            "attempts": [a.attempt for a in items],
            "sessions": [a.session_id for a in items],
        },
    )
    accepted = {(task_id, attempt) for task_id, attempt in result}
    return [(a.task_id, a.attempt) in accepted for a in items]


async def renew_leases(
    conn: AsyncConnection,
    session_id: str,
    attempts: Sequence[tuple[str, int]],
    lease: timedelta,
    *,
    now: datetime,
) -> int:
    """Extend the leases of the attempts this stream still reports; returns how many."""
    if not attempts:
        return 0
    ids = [task_id for task_id, _ in attempts]
    result = await conn.execute(
        update(TASKS)
        .where(_c.session_id == session_id, _c.state.in_(HELD), _c.task_id.in_(ids))
        .values(lease_expires_at=now + lease)
    )
    return _rowcount(result)


async def adopt(
    session: AsyncSession,
    agent_id: str,
    session_id: str,
    attempts: Sequence[tuple[str, int]],
    lease: timedelta,
    *,
    now: datetime,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Move attempts an agent still holds onto its new stream.

    Returns (adopted, lost): lost attempts are no longer this agent's current attempt.
    """
    adopted: list[tuple[str, int]] = []
    lost: list[tuple[str, int]] = []
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
    conn: AsyncConnection,
    *,
    task_id: str,
    attempt: int,
    agent_id: str,
    state: str,
    output: bytes,
    error: str,
    usage: AttemptCost | None = None,
    now: datetime,
) -> Finished | None:
    """End the current attempt in ``state``, keeping its usage; None when it is not
    current (stale)."""
    result = await conn.execute(
        update(TASKS)
        .where(
            _c.task_id == task_id,
            _c.attempt == attempt,
            _c.agent_id == agent_id,
            _c.state.in_(HELD),
        )
        .values(
            state=state,
            output=output,
            error=error,
            finished_at=now,
            updated_at=now,
            session_id=None,
            lease_expires_at=None,
        )
        .returning(*FINISHED_COLUMNS)
    )
    row = result.first()
    if row is None:
        return None
    if usage is not None:
        await usage_store.record(conn, [Used(task_id, attempt, agent_id, usage)])
    return _finished(row)


@dataclass(frozen=True, slots=True)
class Ending:
    """What a Result sets on the attempt it ends."""

    task_id: str
    attempt: int
    agent_id: str
    state: str
    output: bytes
    error: str
    usage: AttemptCost | None = None


_FINISH_MANY = text(
    """
    UPDATE tasks SET state = v.state, output = v.output, error = v.error,
                     finished_at = :now, updated_at = :now, session_id = NULL,
                     lease_expires_at = NULL
    FROM unnest(CAST(:ids AS text[]), CAST(:attempts AS int[]), CAST(:agents AS text[]),
                CAST(:states AS text[]), CAST(:outputs AS bytea[]), CAST(:errors AS text[]))
         AS v(task_id, attempt, agent_id, state, output, error)
    WHERE tasks.task_id = v.task_id AND tasks.attempt = v.attempt
      AND tasks.agent_id = v.agent_id AND tasks.state IN ('ASSIGNED', 'RUNNING')
    RETURNING tasks.task_id, tasks.attempt, tasks.owner, tasks.pool, tasks.kind,
              tasks.started_at, tasks.model, tasks.reserve_micros
    """
).bindparams(bindparam("now", type_=UTCDateTime))


async def finish_many(
    conn: AsyncConnection, items: Sequence[Ending], *, now: datetime
) -> list[tuple[str, Finished] | Current | None]:
    """End many attempts (on Postgres in one statement). Per item: (state, Finished) when
    it ended, else the task's current attempt to say why not (None: no such task)."""
    if conn.dialect.name != "postgresql":
        ended: dict[tuple[str, int], Finished] = {}
        for e in items:
            finished = await finish(
                conn,
                task_id=e.task_id,
                attempt=e.attempt,
                agent_id=e.agent_id,
                state=e.state,
                output=e.output,
                error=e.error,
                usage=e.usage,
                now=now,
            )
            if finished is not None:
                ended[(e.task_id, e.attempt)] = finished
    else:
        result = await conn.execute(
            _FINISH_MANY,
            {
                "now": now,
                "ids": [e.task_id for e in items],
                "attempts": [e.attempt for e in items],
                "agents": [e.agent_id for e in items],
                "states": [e.state for e in items],
                "outputs": [e.output for e in items],
                "errors": [e.error for e in items],
            },
        )
        ended = {(row.task_id, row.attempt): _finished(row) for row in result}
        # The usage of the copy that ended the attempt (a resent Result is not counted).
        used = {
            (e.task_id, e.attempt): Used(e.task_id, e.attempt, e.agent_id, e.usage)
            for e in reversed(items)
            if e.usage is not None and (e.task_id, e.attempt) in ended
        }
        await usage_store.record(conn, used.values())
    answers: list[tuple[str, Finished] | Current | None] = []
    for e in items:
        # A Result handed in twice ends the attempt once: the second copy is told why not.
        finished = ended.pop((e.task_id, e.attempt), None)
        if finished is not None:
            answers.append((e.state, finished))
        else:
            answers.append(await attempt_of(conn, e.task_id))
    return answers


async def signature_of(conn: AsyncConnection, task_id: str) -> bytes | None:
    """A task's stored envelope (a serialized TaskSignature); None when unsigned."""
    row = (await conn.execute(select(_c.signature).where(_c.task_id == task_id))).first()
    return row[0] if row is not None else None


@dataclass(frozen=True, slots=True)
class Current:
    """A task's current attempt, to tell a resent Result from a stale one."""

    attempt: int
    agent_id: str | None
    state: str


async def attempt_of(conn: AsyncConnection, task_id: str) -> Current | None:
    result = await conn.execute(
        select(_c.attempt, _c.agent_id, _c.state).where(_c.task_id == task_id)
    )
    row = result.first()
    return Current(row[0], row[1], row[2]) if row is not None else None


async def retry_or_fail(
    session: AsyncSession,
    *,
    task_id: str,
    attempt: int,
    error: str,
    backoff: timedelta,
    exhausted_state: str = FAILED,
    extra_where: Sequence[Any] = (),
    rate_limited: bool = False,
    now: datetime,
) -> str | None:
    """End the held attempt: requeue as attempt + 1, or end the task once attempts run out.

    A task whose cancellation was requested ends CANCELLED instead. An attempt the
    provider refused for its rate limit (``rate_limited``) does not count against
    ``max_attempts``, up to :data:`MAX_RATE_LIMITED` of them. Returns the new state, or
    None when the attempt was not current.
    """
    task = await session.get(Task, task_id, populate_existing=True)
    if task is None or task.attempt != attempt or task.state not in HELD:
        return None
    free = rate_limited and task.rate_limited < MAX_RATE_LIMITED
    counted = task.attempt - task.rate_limited - (1 if free else 0)
    if task.cancel_requested:
        new_state, values = CANCELLED, {"error": task.error or "cancelled", "finished_at": now}
    elif counted >= task.max_attempts:
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
            "waiting_reason": "",
            "rate_limited": task.rate_limited + (1 if free else 0),
        }
    result = await session.execute(
        update(Task)
        .where(Task.task_id == task_id, Task.attempt == attempt, Task.state.in_(HELD), *extra_where)
        .values(state=new_state, session_id=None, lease_expires_at=None, updated_at=now, **values)
    )
    return new_state if _rowcount(result) == 1 else None


async def kind_and_model(session: AsyncSession, task_id: str) -> tuple[str, str | None] | None:
    """A task's kind and model (to price what its attempt reports); None if no such task."""
    row = (
        await session.execute(select(Task.kind, Task.model).where(Task.task_id == task_id))
    ).first()
    return (row.kind, row.model) if row is not None else None


async def held_with_reservations(session: AsyncSession) -> list[Claimed]:
    """Every attempt agents hold that reserved budget (to restore an in-process store)."""
    rows = await session.execute(
        select(*CLAIMED_COLUMNS).where(Task.state.in_(HELD), Task.reserve_micros > 0)
    )
    return [_claimed(row) for row in rows]


async def held_attempts(
    session: AsyncSession, attempts: Sequence[tuple[str, int]]
) -> set[tuple[str, int]]:
    """Which of ``attempts`` an agent still holds (their task's current, ASSIGNED or RUNNING)."""
    if not attempts:
        return set()
    rows = await session.execute(
        select(Task.task_id, Task.attempt).where(
            Task.task_id.in_({task_id for task_id, _ in attempts}), Task.state.in_(HELD)
        )
    )
    wanted = set(attempts)
    return {(t, a) for t, a in rows if (t, a) in wanted}


async def held_by_session(session: AsyncSession, session_id: str) -> list[Held]:
    rows = await session.execute(
        select(*HELD_COLUMNS).where(Task.session_id == session_id, Task.state.in_(HELD))
    )
    return [_held(row) for row in rows]


async def hand_over(
    session: AsyncSession, session_id: str, until: datetime, *, now: datetime
) -> int:
    """Keep what a drained stream holds for its agent's next stream: the attempts stay
    ASSIGNED or RUNNING with the same number and agent, their leases running to ``until``
    (the handover grace), so a Hello listing them adopts them and a resent Result is
    recorded. Returns how many."""
    result = await session.execute(
        update(Task)
        .where(Task.session_id == session_id, Task.state.in_(HELD))
        .values(lease_expires_at=until, updated_at=now)
    )
    return _rowcount(result)


async def expired_leases(session: AsyncSession, now: datetime, limit: int = 500) -> list[Held]:
    rows = await session.execute(
        select(*HELD_COLUMNS).where(Task.state.in_(HELD), Task.lease_expires_at < now).limit(limit)
    )
    return [_held(row) for row in rows]


OVERDUE_BATCH = 500
"""Overdue attempts one reaper pass ends per check; the next pass takes the rest."""


async def overrun_attempts(
    session: AsyncSession, now: datetime, limit: int = OVERDUE_BATCH
) -> list[Held]:
    """Running attempts past their start-to-close timeout (counted from the attempt's
    start), the longest overdue first. The database decides which rows are overdue, so
    any number of running attempts can hide none of them."""
    due = plus_seconds(_c.started_at, _c.start_to_close_timeout)
    rows = await session.execute(
        select(*HELD_COLUMNS)
        .where(
            _c.state == RUNNING,
            _c.start_to_close_timeout.is_not(None),
            _c.started_at.is_not(None),
            due < instant(now),
        )
        .order_by(due)
        .limit(limit)
    )
    return [_held(row) for row in rows]


async def time_out_expired(
    session: AsyncSession,
    now: datetime,
    limit: int = OVERDUE_BATCH,
    ended: list[tuple[str, int, str]] | None = None,
) -> list[Held]:
    """End tasks past their deadline, or queued past their schedule-to-start timeout
    (counted from when the current attempt was queued).

    Returns the attempts that were held by an agent, which must be told to stop; adds
    (task id, attempt, reason) of every task it ended to ``ended`` (for the audit trail).
    """
    past_deadline = and_(_c.deadline.is_not(None), _c.deadline < now)
    waited_too_long = and_(
        _c.state == QUEUED,
        _c.schedule_to_start_timeout.is_not(None),
        plus_seconds(_c.queued_at, _c.schedule_to_start_timeout) < instant(now),
    )
    rows = await session.execute(
        select(*HELD_COLUMNS, _c.state, past_deadline.label("past_deadline"), _c.waiting_reason)
        .where(_c.state.in_((QUEUED, *HELD)), or_(past_deadline, waited_too_long))
        .limit(limit)
    )
    stopped: list[Held] = []
    for row in rows:
        state = row.state
        reason = "deadline exceeded" if row.past_deadline else "schedule-to-start timeout exceeded"
        if state == QUEUED and row.waiting_reason:
            reason = f"{reason} ({row.waiting_reason})"
        result = await session.execute(
            update(Task)
            .where(Task.task_id == row.task_id, Task.attempt == row.attempt, Task.state == state)
            .values(
                state=TIMED_OUT,
                error=reason,
                finished_at=now,
                updated_at=now,
                session_id=None,
                lease_expires_at=None,
            )
        )
        if _rowcount(result) == 1:
            if ended is not None:
                ended.append((row.task_id, row.attempt, reason))
            if state in HELD:
                stopped.append(_held(row))
    return stopped


async def request_cancel(
    session: AsyncSession, task_id: str, reason: str, *, now: datetime
) -> Task | None:
    """Cancel a queued task at once; mark a held one so its agent is told to stop."""
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
    """(task_id, attempt, session_id, reason) of held attempts whose cancel was requested,
    held by the given streams (few rows; filtered here rather than by thousands of ids)."""
    if not session_ids:
        return []
    rows = await session.execute(
        select(Task.task_id, Task.attempt, Task.session_id, Task.error).where(
            Task.cancel_requested.is_(True), Task.state.in_(HELD)
        )
    )
    return [(t, a, s, e) for t, a, s, e in rows if s in session_ids]


async def claimable(
    session: AsyncSession, pools: set[str], *, now: datetime
) -> list[tuple[str, str, int]]:
    """(pool, kind, count) of queued tasks that may be claimed at ``now``, in ``pools``."""
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


async def queue_stats(session: AsyncSession) -> list[tuple[str, str, int, datetime | None]]:
    """(pool, kind, queued count, oldest queued_at) for the metrics gauges."""
    rows = await session.execute(
        select(Task.pool, Task.kind, func.count(), func.min(Task.queued_at))
        .where(Task.state == QUEUED)
        .group_by(Task.pool, Task.kind)
    )
    return [(pool, kind, count, oldest) for pool, kind, count, oldest in rows]


def _rowcount(result: Any) -> int:
    return int(result.rowcount)
