"""Everything the console shows, read through the storage layer and the services' own
read paths, so a page says what the API says: the same presence, waiting reasons,
usage and budget figures. Only reads live here; nothing in this module writes.

Agents, budgets, pool settings and the audit query are AdminService's read methods,
called in-process; tasks are read as TaskService reads them (the store, the usage rows,
``waiting.explain``, ``convert.task``), but across every tenant with a tenant filter,
which the API does not offer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import select

from muster.server.config import ServerConfig
from muster.server.console.filters import AuditFilter, TaskFilter
from muster.server.dispatch.presence import Presence
from muster.server.services import convert, waiting
from muster.server.services.admin import AdminService
from muster.server.services.errors import not_found
from muster.server.services.tasks import HOLD_FRESH_MARGIN, HOLD_FRESH_POLLS
from muster.server.storage import usage as usage_store
from muster.server.storage.database import Database
from muster.server.storage.models import AuditEvent
from muster.states import State
from muster.v1 import admin_pb2, common_pb2

QUEUE_SAMPLE = 500
"""Queued tasks whose waiting reasons the overview counts (the newest)."""
HISTORY_ROWS = 200
"""Audit rows shown on a task's page, at most."""
HISTORY_MARGIN = timedelta(minutes=1)
"""Audit times come from each replica's clock: look this much either side of the task."""


class _InProcess:
    """The call context AdminService's read methods get here: they use none of it
    but, should one look, the caller is the console and the request has no metadata."""

    def peer(self) -> str:
        return "console"

    def invocation_metadata(self) -> tuple[()]:
        return ()


_CONTEXT = cast(Any, _InProcess())


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[common_pb2.Task]
    next_before: tuple[datetime, str] | None
    """The cursor of the next page; None on the last."""


@dataclass(slots=True)
class Queue:
    """Queued tasks of one pool and kind, and why the newest of them wait."""

    pool: str
    kind: str
    queued: int
    oldest: datetime | None
    reasons: Counter[str] = field(default_factory=Counter)
    """Reason code name -> tasks, among the sampled."""
    examples: dict[str, str] = field(default_factory=dict)
    """Reason code name -> one task's reason in words."""


@dataclass(frozen=True, slots=True)
class TaskHistory:
    task: common_pb2.Task
    events: list[admin_pb2.AuditEvent]
    """Its audit rows (submit, assign, finish, requeue, cancel...), oldest first."""


class ConsoleReads:
    def __init__(
        self, db: Database, admin: AdminService, presence: Presence, config: ServerConfig
    ) -> None:
        self._db = db
        self._admin = admin
        self._presence = presence
        # As TaskService reckons it: a reason dispatch recorded counts this long after.
        self._hold_fresh = config.poll_interval * HOLD_FRESH_POLLS + HOLD_FRESH_MARGIN

    async def agents(self, pool: str = "") -> list[admin_pb2.Agent]:
        request = admin_pb2.ListAgentsRequest(pool=pool)
        return list((await self._admin.ListAgents(request, _CONTEXT)).agents)

    async def agent(self, agent_id: str) -> admin_pb2.Agent:
        return await self._admin.GetAgent(admin_pb2.GetAgentRequest(agent_id=agent_id), _CONTEXT)

    async def budgets(self) -> list[admin_pb2.Budget]:
        """Every budget with its figures (UNAVAILABLE when the quota store cannot say)."""
        response = await self._admin.ListBudgets(admin_pb2.ListBudgetsRequest(), _CONTEXT)
        return list(response.budgets)

    async def pool_settings(self) -> list[admin_pb2.PoolSettings]:
        request = admin_pb2.ListPoolSettingsRequest()
        return list((await self._admin.ListPoolSettings(request, _CONTEXT)).pools)

    async def audit(self, wanted: AuditFilter) -> list[admin_pb2.AuditEvent]:
        request = admin_pb2.QueryAuditRequest(
            actor=wanted.actor, action=wanted.action, limit=wanted.limit
        )
        if wanted.since is not None:
            request.since.FromDatetime(wanted.since)
        if wanted.until is not None:
            request.until.FromDatetime(wanted.until)
        return list((await self._admin.QueryAudit(request, _CONTEXT)).events)

    async def tasks(self, wanted: TaskFilter) -> TaskPage:
        async with self._db.transaction() as session:
            rows = await self._db.tasks.list_tasks(
                session,
                states=wanted.states,
                pool=wanted.pool,
                kind=wanted.kind,
                owner=wanted.tenant or None,
                limit=wanted.limit + 1,
                before=wanted.before,
            )
            more = len(rows) > wanted.limit
            rows = rows[: wanted.limit]
            used = await usage_store.of_tasks(
                session, [r.task_id for r in rows if r.cost_micros or r.input_tokens]
            )
            why = await waiting.explain(
                session, rows, self._presence.now(), hold_fresh=self._hold_fresh
            )
        shown = [convert.task(r, used.get(r.task_id, ()), why.get(r.task_id)) for r in rows]
        last = rows[-1] if more and rows else None
        return TaskPage(shown, (last.created_at, last.task_id) if last is not None else None)

    async def task(self, task_id: str) -> TaskHistory:
        async with self._db.transaction() as session:
            row = await self._db.tasks.read(session, task_id)
            if row is None:
                raise not_found(f"no task {task_id[:60]!r}")
            used = await usage_store.of_tasks(session, [row.task_id])
            why = await waiting.explain(
                session, [row], self._presence.now(), hold_fresh=self._hold_fresh
            )
            end = row.finished_at or self._presence.now()
            events = await session.execute(
                select(AuditEvent)
                .where(
                    AuditEvent.time >= row.created_at - HISTORY_MARGIN,
                    AuditEvent.time <= end + HISTORY_MARGIN,
                    AuditEvent.target == row.task_id,
                )
                .order_by(AuditEvent.time, AuditEvent.id)
                .limit(HISTORY_ROWS)
            )
            history = [convert.audit_event(e) for e in events.scalars()]
        task = convert.task(row, used.get(row.task_id, ()), why.get(row.task_id))
        return TaskHistory(task, history)

    async def queues(self) -> list[Queue]:
        """Every (pool, kind) with queued tasks, oldest first, with the reasons the
        newest ``QUEUE_SAMPLE`` queued tasks wait for."""
        async with self._db.transaction() as session:
            stats = await self._db.tasks.queue_stats(session)
            sample = await self._db.tasks.list_tasks(
                session,
                states=[State.QUEUED],
                pool="",
                kind="",
                owner=None,
                limit=QUEUE_SAMPLE,
                before=None,
            )
            why = await waiting.explain(
                session, sample, self._presence.now(), hold_fresh=self._hold_fresh
            )
        queues = {
            (pool, kind): Queue(pool, kind, count, oldest) for pool, kind, count, oldest in stats
        }
        for task in sample:
            queue = queues.get((task.pool, task.kind))
            reason = why.get(task.task_id)
            if queue is None or reason is None:
                continue  # dispatched since the counts were read
            code = reason_name(reason.code)
            queue.reasons[code] += 1
            queue.examples.setdefault(code, reason.text)
        return sorted(queues.values(), key=_oldest_first)


def reason_name(code: int) -> str:
    """``NO_AGENT_IN_POOL`` for WAITING_REASON_NO_AGENT_IN_POOL; ``NONE`` for nothing."""
    if code == common_pb2.WAITING_REASON_UNSPECIFIED:
        return "NONE"
    name: str = common_pb2.WaitingReason.Name(code)
    return name.removeprefix("WAITING_REASON_")


def _oldest_first(queue: Queue) -> tuple[bool, datetime | None, str, str]:
    return (queue.oldest is None, queue.oldest, queue.pool, queue.kind)


def pools_of(agents: Sequence[admin_pb2.Agent]) -> dict[str, dict[str, int]]:
    """Per pool: agents enrolled (not removed), enabled, connected; slots and in flight."""
    pools: dict[str, dict[str, int]] = {}
    for agent in agents:
        if agent.removed:
            continue
        pool = pools.setdefault(
            agent.pool,
            {"enrolled": 0, "enabled": 0, "connected": 0, "slots": 0, "in_flight": 0},
        )
        pool["enrolled"] += 1
        pool["enabled"] += int(agent.enabled)
        if agent.connected:
            pool["connected"] += 1
            pool["slots"] += agent.max_concurrency
        pool["in_flight"] += agent.in_flight
    return dict(sorted(pools.items()))
