"""Cluster-wide presence of agents: one ``agent_sessions`` row per live stream, on any replica.

A replica writes a row when it welcomes a stream and deletes it when the stream ends.
Rather than one write per heartbeat, each replica refreshes ``last_seen_at`` and
``expires_at`` of all its rows (and its agents' ``last_seen_at``) in one pass per
interval. A row past ``expires_at`` belongs to a replica that stopped refreshing (it
was killed): it does not count as connected, and any replica deletes it later.

What MUST hold, on every backend: an agent is connected exactly when it has a row whose
``expires_at`` is after the reader's now; readers never trust a replica's memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from muster.server.storage.models import Agent, AgentSession, Task
from muster.states import HELD

HELD_STATES = HELD
"""Task states in which an attempt occupies one of its agent's slots."""

_SESSIONS: Table = AgentSession.__table__  # type: ignore[assignment]
_AGENTS: Table = Agent.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class Connected:
    """A welcomed stream, as its replica records it."""

    session_id: str
    agent_id: str
    replica: str
    instance: str
    capabilities: tuple[str, ...]
    max_concurrency: int
    cert_serial: str
    cert_not_after: datetime | None
    now: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A stream that ended, and when."""

    session_id: str
    agent_id: str
    now: datetime


@dataclass(frozen=True, slots=True)
class LiveSession:
    """A stream that counts as connected, with its agent's scope."""

    session_id: str
    agent_id: str
    pool: str
    labels: dict[str, str] = field(hash=False)
    replica: str
    capabilities: tuple[str, ...]
    max_concurrency: int
    cert_not_after: datetime | None
    connected_at: datetime
    last_seen_at: datetime


@dataclass(frozen=True, slots=True)
class EnrolledAgent:
    """An enabled agent of a pool: its fixed scope and what it last declared."""

    agent_id: str
    pool: str
    labels: dict[str, str] = field(hash=False)
    capabilities: tuple[str, ...] | None
    """None: it never connected, so what it runs is not known."""


async def connect_many(conn: AsyncConnection, items: Sequence[Connected]) -> list[None]:
    """Record welcomed streams; their agents were seen now and declared these kinds."""
    await conn.execute(
        insert(_SESSIONS),
        [
            {
                "session_id": c.session_id,
                "agent_id": c.agent_id,
                "replica": c.replica,
                "instance": c.instance,
                "capabilities": list(c.capabilities),
                "max_concurrency": c.max_concurrency,
                "cert_serial": c.cert_serial,
                "cert_not_after": c.cert_not_after,
                "connected_at": c.now,
                "last_seen_at": c.now,
                "expires_at": c.expires_at,
            }
            for c in items
        ],
    )
    await conn.execute(
        update(_AGENTS)
        .where(_AGENTS.c.agent_id == bindparam("b_agent_id"))
        .values(
            last_seen_at=bindparam("b_now"),
            capabilities=bindparam("b_capabilities"),
            max_concurrency=bindparam("b_max_concurrency"),
        ),
        [
            {
                "b_agent_id": c.agent_id,
                "b_now": c.now,
                "b_capabilities": list(c.capabilities),
                "b_max_concurrency": c.max_concurrency,
            }
            for c in items
        ],
    )
    return [None] * len(items)


async def disconnect_many(conn: AsyncConnection, items: Sequence[Disconnected]) -> list[None]:
    """Forget ended streams; their agents were last seen now."""
    await conn.execute(
        delete(_SESSIONS).where(_SESSIONS.c.session_id.in_([d.session_id for d in items]))
    )
    await conn.execute(
        update(_AGENTS)
        .where(_AGENTS.c.agent_id == bindparam("b_agent_id"))
        .values(last_seen_at=bindparam("b_now")),
        [{"b_agent_id": d.agent_id, "b_now": d.now} for d in items],
    )
    return [None] * len(items)


async def refresh(conn: AsyncConnection, instance: str, now: datetime, ttl: timedelta) -> None:
    """One replica's pass: its rows stay alive for ``ttl`` more, its agents were seen now,
    and rows that expired a ``ttl`` ago (a dead replica's) are deleted by whoever passes."""
    await conn.execute(
        update(_SESSIONS)
        .where(_SESSIONS.c.instance == instance)
        .values(last_seen_at=now, expires_at=now + ttl)
    )
    mine = select(_SESSIONS.c.agent_id).where(_SESSIONS.c.instance == instance)
    await conn.execute(update(_AGENTS).where(_AGENTS.c.agent_id.in_(mine)).values(last_seen_at=now))
    await conn.execute(delete(_SESSIONS).where(_SESSIONS.c.expires_at < now - ttl))


async def live_sessions(
    session: AsyncSession | AsyncConnection,
    now: datetime,
    *,
    agent_ids: Iterable[str] | None = None,
    pools: Iterable[str] | None = None,
) -> list[LiveSession]:
    """Streams that count as connected now (of these agents, or of agents in these pools),
    newest first."""
    query = (
        select(
            AgentSession.session_id,
            AgentSession.agent_id,
            Agent.pool,
            Agent.labels,
            AgentSession.replica,
            AgentSession.capabilities,
            AgentSession.max_concurrency,
            AgentSession.cert_not_after,
            AgentSession.connected_at,
            AgentSession.last_seen_at,
        )
        .join(Agent, Agent.agent_id == AgentSession.agent_id)
        .where(AgentSession.expires_at > now)
        .order_by(AgentSession.connected_at.desc(), AgentSession.session_id.desc())
    )
    if agent_ids is not None:
        query = query.where(AgentSession.agent_id.in_(list(agent_ids)))
    if pools is not None:
        query = query.where(Agent.pool.in_(list(pools)))
    rows = await session.execute(query)
    return [
        LiveSession(
            session_id=r.session_id,
            agent_id=r.agent_id,
            pool=r.pool,
            labels=dict(r.labels or {}),
            replica=r.replica,
            capabilities=tuple(r.capabilities or ()),
            max_concurrency=r.max_concurrency,
            cert_not_after=r.cert_not_after,
            connected_at=r.connected_at,
            last_seen_at=r.last_seen_at,
        )
        for r in rows
    ]


async def in_flight(
    session: AsyncSession | AsyncConnection, agent_ids: Iterable[str]
) -> dict[str, int]:
    """Attempts each agent holds (assigned or running), as the task table says: the count
    every replica agrees on, whichever replica the agent's stream is on."""
    ids = list(agent_ids)
    if not ids:
        return {}
    rows = await session.execute(
        select(Task.agent_id, func.count())
        .where(Task.state.in_(HELD_STATES), Task.agent_id.in_(ids))
        .group_by(Task.agent_id)
    )
    return {agent_id: count for agent_id, count in rows}


async def enrolled_agents(
    session: AsyncSession | AsyncConnection, pools: Iterable[str]
) -> list[EnrolledAgent]:
    """The enabled agents of these pools."""
    rows = await session.execute(
        select(Agent.agent_id, Agent.pool, Agent.labels, Agent.capabilities).where(
            Agent.pool.in_(list(pools)), Agent.enabled.is_(True)
        )
    )
    return [
        EnrolledAgent(
            agent_id=r.agent_id,
            pool=r.pool,
            labels=dict(r.labels or {}),
            capabilities=tuple(r.capabilities) if r.capabilities is not None else None,
        )
        for r in rows
    ]
