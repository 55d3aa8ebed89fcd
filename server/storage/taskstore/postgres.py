"""The task store on Postgres: each gathered transition is one statement over arrays
(sql/tasks.sql), so a batch of claims, accepts or finishes costs one round trip."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import cache
from importlib import resources

from sqlalchemy import JSON, TextClause, TextualSelect, bindparam, text
from sqlalchemy.ext.asyncio import AsyncConnection

from muster.server.storage.taskstore.base import Acceptance, Claimed, ClaimRequest, Ending, Finished
from muster.server.storage.taskstore.common import ENDED_COLUMNS, SqlTaskStore, claimed, finished
from muster.server.storage.types import UTCDateTime
from muster.states import State

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)

STATES = {
    "queued": State.QUEUED,
    "assigned": State.ASSIGNED,
    "running": State.RUNNING,
}
"""The state parameters the statements use (states are never literals in the SQL)."""


def named_statements(source: str) -> dict[str, str]:
    """``-- name: X`` blocks of a .sql file, by name (the text up to the next name)."""
    parts = _NAME.split(source)
    return {
        name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }


RESULT_COLUMNS = {"finish_many": ENDED_COLUMNS}
"""Statements whose returned rows are typed by the model's columns (times as UTC, JSON
as objects), by name."""


@cache
def statement(name: str) -> TextClause | TextualSelect:
    """A named statement of sql/tasks.sql, its time and JSON parameters typed (and its
    result columns, per :data:`RESULT_COLUMNS`)."""
    source = resources.files("muster.server.storage").joinpath("sql/tasks.sql").read_text()
    sql = text(named_statements(source)[name])
    typed = [
        bindparam(key, type_=UTCDateTime)
        for key in ("now", "accept_by", "lease")
        if key in sql._bindparams
    ]
    if "labels" in sql._bindparams:
        typed.append(bindparam("labels", type_=JSON))
    sql = sql.bindparams(*typed)
    columns = RESULT_COLUMNS.get(name)
    return sql if columns is None else sql.columns(*columns)


class PostgresTaskStore(SqlTaskStore):
    """:class:`~muster.server.storage.taskstore.base.TaskStore` on Postgres."""

    async def _claim_many(
        self,
        conn: AsyncConnection,
        requests: Sequence[ClaimRequest],
        *,
        accept_timeout: timedelta,
        now: datetime,
    ) -> list[list[Claimed]]:
        deepest = max(r.limit for r in requests)
        slots = [r for depth in range(deepest) for r in requests if r.limit > depth]
        first = requests[0]
        result = await conn.execute(
            statement("claim_many"),
            {
                **STATES,
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
            by_session[row.session_id].append(claimed(row))
        for got in by_session.values():
            got.sort(key=lambda t: (-t.priority, t.queued_at, t.task_id))
        return [by_session[r.session_id] for r in requests]

    async def _accept_many(
        self, conn: AsyncConnection, items: Sequence[Acceptance], *, lease: timedelta, now: datetime
    ) -> list[bool]:
        result = await conn.execute(
            statement("accept_many"),
            {
                **STATES,
                "now": now,
                "lease": now + lease,
                "ids": [a.task_id for a in items],
                "attempts": [a.attempt for a in items],
                "sessions": [a.session_id for a in items],
            },
        )
        accepted = {(row.task_id, row.attempt) for row in result}
        return [(a.task_id, a.attempt) in accepted for a in items]

    async def _end_many(
        self, conn: AsyncConnection, items: Sequence[Ending], *, now: datetime
    ) -> dict[tuple[str, int], Finished]:
        result = await conn.execute(
            statement("finish_many"),
            {
                **STATES,
                "now": now,
                "ids": [e.task_id for e in items],
                "attempts": [e.attempt for e in items],
                "agents": [e.agent_id for e in items],
                "states": [str(e.state) for e in items],
                "outputs": [e.output for e in items],
                "errors": [e.error for e in items],
                "accepted": [e.accepted_at for e in items],
            },
        )
        return {(row.task_id, row.attempt): finished(row) for row in result}
