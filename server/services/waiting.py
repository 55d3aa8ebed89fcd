"""Why a queued task waits, and whether a new one could ever run: worked out when a task is
read, from cluster-wide presence (storage/presence.py) and what dispatch last recorded.

The checks run in the order of ``WaitingReason`` in common.proto and the first that
holds is the answer, so the reason shown is the one to fix first: without an agent in
the pool, a budget is beside the point.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from muster.server.dispatch.budgets import (
    WAITING_FOR_BUDGET,
    WAITING_FOR_PROVIDER,
    WAITING_FOR_STORE,
)
from muster.server.dispatch.inflight import STORE_DOWN
from muster.server.storage import presence as presence_store
from muster.server.storage.models import Task
from muster.states import State
from muster.v1 import common_pb2

Reader = AsyncSession | AsyncConnection
"""Reads work on an ORM session or, inside group commit, on its connection."""
WAITING_FOR_SLOT = "waiting for a slot"
"""How dispatch/inflight.py words a full tenant or pool."""
MAX_LISTED = 8
"""Kinds or labels named in one reason, at most (the rest are counted)."""

_HELD_BACK = (
    (WAITING_FOR_SLOT, common_pb2.WAITING_REASON_CONCURRENCY_LIMIT),
    (WAITING_FOR_BUDGET, common_pb2.WAITING_REASON_BUDGET),
    (WAITING_FOR_PROVIDER, common_pb2.WAITING_REASON_PROVIDER_BACKOFF),
    (WAITING_FOR_STORE, common_pb2.WAITING_REASON_QUOTA_STORE),
    (STORE_DOWN.partition(":")[0], common_pb2.WAITING_REASON_QUOTA_STORE),
)


@dataclass(frozen=True, slots=True)
class Waiting:
    """Why one queued task waits; ``code`` UNSPECIFIED and ``text`` empty: nothing holds it."""

    code: common_pb2.WaitingReason = common_pb2.WAITING_REASON_UNSPECIFIED
    text: str = ""
    until: datetime | None = None


NOTHING = Waiting()


@dataclass(frozen=True, slots=True)
class Agent:
    """A connected agent: its newest live stream and what it holds."""

    labels: Mapping[str, str]
    kinds: tuple[str, ...]
    max_concurrency: int
    in_flight: int


def held_back_code(reason: str) -> common_pb2.WaitingReason:
    """The code of a reason dispatch recorded when it held a claimed task back."""
    for prefix, code in _HELD_BACK:
        if reason.startswith(prefix):
            return code
    return common_pb2.WAITING_REASON_UNSPECIFIED


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The agents of some pools as the cluster sees them now: one read for many tasks."""

    enrolled: Mapping[str, list[presence_store.EnrolledAgent]]
    """Enabled agents, by pool."""
    connected: Mapping[str, list[Agent]]
    """Connected agents (each by its newest live stream), by pool."""


async def snapshot(reader: Reader, pools: Iterable[str], now: datetime) -> Snapshot:
    """Three queries, whatever the number of pools or tasks."""
    pools = set(pools)
    enrolled: dict[str, list[presence_store.EnrolledAgent]] = {}
    for agent in await presence_store.enrolled_agents(reader, pools):
        enrolled.setdefault(agent.pool, []).append(agent)
    newest: dict[str, presence_store.LiveSession] = {}
    for stream in await presence_store.live_sessions(reader, now, pools=pools):
        newest.setdefault(stream.agent_id, stream)  # newest first: its current stream
    holding = await presence_store.in_flight(reader, newest)
    connected: dict[str, list[Agent]] = {}
    for stream in newest.values():
        connected.setdefault(stream.pool, []).append(
            Agent(
                stream.labels,
                stream.capabilities,
                stream.max_concurrency,
                holding.get(stream.agent_id, 0),
            )
        )
    return Snapshot(enrolled, connected)


async def explain(
    reader: Reader, tasks: Sequence[Task], now: datetime, *, hold_fresh: timedelta
) -> dict[str, Waiting]:
    """Why each QUEUED task of ``tasks`` waits, by task id (other states are left out).

    A reason dispatch recorded (a limit, a budget) counts while its hold lasts and for
    ``hold_fresh`` after (a held task is claimed again as soon as its hold ends and an
    agent has room, and held again if the cause remains). After that it still counts,
    unless every agent that could run the task is busy: then that is why it waits."""
    queued = [t for t in tasks if t.state == State.QUEUED]
    if not queued:
        return {}
    seen = await snapshot(reader, {t.pool for t in queued}, now)
    return {t.task_id: why(seen, t, now, hold_fresh) for t in queued}


@dataclass(frozen=True, slots=True)
class Submitted:
    """A task just submitted, to check as one of a batch (see :func:`check_submitted`)."""

    task: Task
    now: datetime
    hold_fresh: timedelta


async def check_submitted(
    conn: AsyncConnection, items: Sequence[Submitted]
) -> list[tuple[str, Waiting]]:
    """(warning, waiting reason) of each new task: concurrent submissions share one
    snapshot (group commit gathers them), so a busy Submit path pays three reads per
    batch, not per task."""
    if not items:
        return []
    seen = await snapshot(conn, {i.task.pool for i in items}, max(i.now for i in items))
    return [(warning(seen, i.task), why(seen, i.task, i.now, i.hold_fresh)) for i in items]


def why(seen: Snapshot, task: Task, now: datetime, hold_fresh: timedelta) -> Waiting:
    """The first reason that holds, in the order of ``WaitingReason``."""
    if task.state != State.QUEUED:
        return NOTHING
    pool, kind = task.pool, task.kind
    enrolled = len(seen.enrolled.get(pool, ()))
    connected = seen.connected.get(pool, [])
    if not enrolled:
        return Waiting(
            common_pb2.WAITING_REASON_NO_AGENT_IN_POOL,
            f"no enabled agent is enrolled in pool {pool}",
        )
    offering = [a for a in connected if kind in a.kinds]
    if not offering:
        if not connected:
            text = f"no agent of pool {pool} is connected ({_agents(enrolled)} enrolled)"
        else:
            offered = sorted({k for a in connected for k in a.kinds})
            text = (
                f"no connected agent of pool {pool} offers kind {kind} "
                f"(they offer: {_listed(offered)})"
            )
        return Waiting(common_pb2.WAITING_REASON_NO_AGENT_FOR_KIND, text)
    selector = task.selector or {}
    matching = [a for a in offering if _matches(a.labels, selector)]
    if not matching:
        return Waiting(
            common_pb2.WAITING_REASON_NO_AGENT_MATCHES_SELECTOR,
            f"no connected agent of pool {pool} that offers kind {kind} carries the "
            f"selector's labels {_listed([f'{k}={v}' for k, v in sorted(selector.items())])}",
        )
    held_until = task.not_before
    if task.waiting_reason and held_until is not None and held_until + hold_fresh > now:
        return Waiting(held_back_code(task.waiting_reason), task.waiting_reason, held_until)
    if held_until is not None and held_until > now and not task.waiting_reason:
        return Waiting(
            common_pb2.WAITING_REASON_RETRY_BACKOFF,
            f"retry backoff after attempt {task.attempt - 1} until "
            f"{held_until.isoformat(timespec='seconds')}",
            held_until,
        )
    slots = sum(a.max_concurrency for a in matching)
    used = sum(min(a.in_flight, a.max_concurrency) for a in matching)
    if used >= slots:
        return Waiting(
            common_pb2.WAITING_REASON_AGENTS_BUSY,
            f"all {_agents(len(matching))} that could run it are busy "
            f"({used} of {slots} slots in use)",
        )
    if task.waiting_reason:
        # Its hold has lapsed but no claim has reached it yet (others came first): the
        # next claim holds it again or sends it.
        return Waiting(held_back_code(task.waiting_reason), task.waiting_reason)
    return NOTHING


def warning(seen: Snapshot, task: Task) -> str:
    """Why no enrolled agent could run a new task as things stand ("" when one could).

    Pools and labels are fixed at enrollment, so those answers are certain; kinds are
    declared at each connect, so an agent that never connected might still offer it."""
    pool, kind, selector = task.pool, task.kind, task.selector or {}
    enrolled = seen.enrolled.get(pool, [])
    if not enrolled:
        return f"no enabled agent is enrolled in pool {pool}: the task waits until one is"
    matching = [a for a in enrolled if _matches(a.labels, selector)]
    if not matching:
        labels = _listed([f"{k}={v}" for k, v in sorted(selector.items())])
        return (
            f"no agent of pool {pool} carries the selector's labels {labels}: "
            "the task waits until one enrolls with them"
        )
    if any(a.capabilities is None or kind in a.capabilities for a in matching):
        return ""
    offered = sorted({k for a in matching for k in a.capabilities or ()})
    return (
        f"no agent of pool {pool} has offered kind {kind} (they offer: {_listed(offered)}): "
        "the task waits until one does"
    )


def _matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _listed(items: Iterable[str]) -> str:
    names = list(items)
    if len(names) <= MAX_LISTED:
        return ", ".join(names) or "nothing"
    return f"{', '.join(names[:MAX_LISTED])} and {len(names) - MAX_LISTED} more"


def _agents(count: int) -> str:
    return f"{count} agent" if count == 1 else f"{count} agents"
