"""What attempts consumed: one ``attempt_usage`` row per attempt that reported any, and
the task's running totals beside it, written in the transaction that ends the attempt."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from muster.server.storage.models import AttemptUsage, Task
from muster.server.storage.types import utcnow

USAGE: Table = AttemptUsage.__table__  # type: ignore[assignment]
TASKS: Table = Task.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class AttemptCost:
    """One attempt's tokens as its agent reported them, and their cost at the server's prices."""

    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_creation_1h_tokens: int = 0
    cache_read_tokens: int = 0
    cost_micros: int = 0
    reported_cost_micros: int = 0

    @property
    def empty(self) -> bool:
        return not (
            self.input_tokens
            or self.output_tokens
            or self.cache_creation_tokens
            or self.cache_read_tokens
            or self.cost_micros
            or self.reported_cost_micros
        )


@dataclass(frozen=True, slots=True)
class Used:
    """An attempt's usage to record: which attempt, which agent, what it cost."""

    task_id: str
    attempt: int
    agent_id: str
    cost: AttemptCost


async def record(conn: AsyncConnection, items: Iterable[Used]) -> None:
    """Keep each attempt's usage and add it to its task's totals (nothing for empty usage).

    Callers record only attempts they just ended, so an attempt is never counted twice."""
    rows = [u for u in items if not u.cost.empty]
    if not rows:
        return
    now = utcnow()
    await conn.execute(
        insert(USAGE),
        [
            {
                "task_id": u.task_id,
                "attempt": u.attempt,
                "agent_id": u.agent_id,
                "model": u.cost.model,
                "input_tokens": u.cost.input_tokens,
                "output_tokens": u.cost.output_tokens,
                "cache_creation_tokens": u.cost.cache_creation_tokens,
                "cache_creation_1h_tokens": u.cost.cache_creation_1h_tokens,
                "cache_read_tokens": u.cost.cache_read_tokens,
                "cost_micros": u.cost.cost_micros,
                "reported_cost_micros": u.cost.reported_cost_micros,
                "recorded_at": now,
            }
            for u in rows
        ],
    )
    c = TASKS.c
    for u in rows:
        await conn.execute(
            update(TASKS)
            .where(c.task_id == u.task_id)
            .values(
                input_tokens=c.input_tokens + u.cost.input_tokens,
                output_tokens=c.output_tokens + u.cost.output_tokens,
                cache_creation_tokens=c.cache_creation_tokens + u.cost.cache_creation_tokens,
                cache_read_tokens=c.cache_read_tokens + u.cost.cache_read_tokens,
                cost_micros=c.cost_micros + u.cost.cost_micros,
                reported_cost_micros=c.reported_cost_micros + u.cost.reported_cost_micros,
            )
        )


async def of_tasks(session: AsyncSession, task_ids: Sequence[str]) -> dict[str, list[AttemptUsage]]:
    """Each task's attempt usage rows, oldest attempt first."""
    if not task_ids:
        return {}
    rows = await session.execute(
        select(AttemptUsage)
        .where(AttemptUsage.task_id.in_(task_ids))
        .order_by(AttemptUsage.task_id, AttemptUsage.attempt)
    )
    found: dict[str, list[AttemptUsage]] = {}
    for row in rows.scalars():
        found.setdefault(row.task_id, []).append(row)
    return found


async def cost_of(
    session: AsyncSession, attempts: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """The recorded cost of each of ``attempts`` that reported usage."""
    if not attempts:
        return {}
    ids = {task_id for task_id, _ in attempts}
    rows = await session.execute(
        select(AttemptUsage.task_id, AttemptUsage.attempt, AttemptUsage.cost_micros).where(
            AttemptUsage.task_id.in_(ids)
        )
    )
    wanted = set(attempts)
    return {(t, a): cost for t, a, cost in rows if (t, a) in wanted}


async def spent_since(
    session: AsyncSession,
    since: datetime | None,
    *,
    owner: str | None = None,
    pool: str | None = None,
) -> int:
    """What attempts recorded since ``since`` (ever, if None) cost, of one tenant or pool."""
    query = select(func.coalesce(func.sum(AttemptUsage.cost_micros), 0))
    if owner is not None or pool is not None:
        query = query.join(Task, Task.task_id == AttemptUsage.task_id)
    if since is not None:
        query = query.where(AttemptUsage.recorded_at >= since)
    if owner is not None:
        query = query.where(Task.owner == owner)
    if pool is not None:
        query = query.where(Task.pool == pool)
    return int((await session.execute(query)).scalar_one())


async def capped_tasks_spent(
    session: AsyncSession, states: Sequence[str]
) -> list[tuple[str, int, int]]:
    """(task_id, cap, spent so far) of tasks in ``states`` that have their own spend cap."""
    rows = await session.execute(
        select(Task.task_id, Task.max_cost_micros, Task.cost_micros).where(
            Task.state.in_(states), Task.max_cost_micros.is_not(None)
        )
    )
    return [(t, int(cap), int(spent)) for t, cap, spent in rows]
