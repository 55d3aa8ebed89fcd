"""The task store on SQLite (the embedded backend): one writer at a time, so each
gathered item is its own compare-and-set on ``(state, attempt)``; label selectors are
matched in Python (no JSON containment operator)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from muster.server.storage.taskstore.base import (
    CLAIM_SCAN,
    Acceptance,
    Claimed,
    ClaimRequest,
    Ending,
    Finished,
)
from muster.server.storage.taskstore.common import (
    CLAIMED_COLUMNS,
    TASKS,
    SqlTaskStore,
    claimed,
    finished,
    ready,
    rowcount,
)
from muster.states import State

_c = TASKS.c


class SqliteTaskStore(SqlTaskStore):
    """:class:`~muster.server.storage.taskstore.base.TaskStore` on SQLite."""

    async def _claim_many(
        self,
        conn: AsyncConnection,
        requests: Sequence[ClaimRequest],
        *,
        accept_timeout: timedelta,
        now: datetime,
    ) -> list[list[Claimed]]:
        # Streams are served one after the other (not dealt in turn as on Postgres).
        return [await self._claim_one(conn, r, accept_timeout, now) for r in requests]

    async def _claim_one(
        self, conn: AsyncConnection, request: ClaimRequest, accept_timeout: timedelta, now: datetime
    ) -> list[Claimed]:
        candidates = await conn.execute(
            select(_c.task_id, _c.attempt, _c.selector)
            .where(
                _c.state == State.QUEUED,
                _c.pool == request.pool,
                _c.kind.in_(request.kinds),
                ready(now),
            )
            .order_by(_c.priority.desc(), _c.queued_at, _c.task_id)
            .limit(CLAIM_SCAN)
        )
        assignment = {
            "state": State.ASSIGNED,
            "agent_id": request.agent_id,
            "session_id": request.session_id,
            "lease_expires_at": now + accept_timeout,
            "updated_at": now,
        }
        taken: list[str] = []
        for row in candidates.all():
            if len(taken) >= request.limit:
                break
            if any(request.labels.get(k) != v for k, v in (row.selector or {}).items()):
                continue
            result = await conn.execute(
                update(TASKS)
                .where(
                    _c.task_id == row.task_id, _c.state == State.QUEUED, _c.attempt == row.attempt
                )
                .values(assignment)
            )
            if rowcount(result) == 1:
                taken.append(row.task_id)
        if not taken:
            return []
        rows = await conn.execute(select(*CLAIMED_COLUMNS).where(_c.task_id.in_(taken)))
        by_id = {row.task_id: claimed(row) for row in rows}
        return [by_id[t] for t in taken]

    async def _accept_many(
        self, conn: AsyncConnection, items: Sequence[Acceptance], *, lease: timedelta, now: datetime
    ) -> list[bool]:
        moved: list[bool] = []
        for a in items:
            result = await conn.execute(
                update(TASKS)
                .where(
                    _c.task_id == a.task_id,
                    _c.attempt == a.attempt,
                    _c.session_id == a.session_id,
                    _c.state == State.ASSIGNED,
                )
                .values(
                    state=State.RUNNING,
                    started_at=now,
                    lease_expires_at=now + lease,
                    updated_at=now,
                )
            )
            moved.append(rowcount(result) == 1)
        return moved

    async def _end_many(
        self, conn: AsyncConnection, items: Sequence[Ending], *, now: datetime
    ) -> dict[tuple[str, int], Finished]:
        ended: dict[tuple[str, int], Finished] = {}
        for e in items:
            row = (await conn.execute(self._end_one(e, now))).first()
            if row is not None:
                ended[(e.task_id, e.attempt)] = finished(row)
        return ended
