"""Bootstrap tokens, agents and their certificates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import asyncpg
from sqlalchemy import and_, bindparam, insert, select, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import aliased

from muster.server.storage.models import Agent, ApiToken, BootstrapToken, Certificate
from muster.server.storage.types import utcnow


async def bootstrap_token(session: AsyncSession, token_id: str) -> BootstrapToken | None:
    return await session.get(BootstrapToken, token_id, populate_existing=True)


Enrolled = Literal["enrolled", "used up", "name taken"]
"""What :func:`enroll_agent` did."""


@dataclass(frozen=True, slots=True)
class EarlierEnrollment:
    """A live certificate this token already issued for this key: a retry gets it again."""

    agent_id: str
    pool: str
    labels: dict[str, str]
    serial: str
    chain_pem: bytes
    not_after: datetime


@dataclass(frozen=True, slots=True)
class EnrollmentToken:
    """A bootstrap token as enrollment reads it, with the earlier enrollment for the key."""

    token_id: str
    secret_hash: str
    pool: str
    labels: dict[str, str]
    name_pattern: str
    max_uses: int
    uses: int
    expires_at: datetime
    deleted_at: datetime | None
    earlier: EarlierEnrollment | None
    bound_agent: str | None = None
    """A re-enrollment token's agent: it enrolls that existing agent id and no other."""


_EARLIER = and_(
    Certificate.token_id == BootstrapToken.token_id,
    Certificate.public_key_fingerprint == bindparam("fingerprint"),
    Certificate.reason.in_(("enroll", "reenroll")),
    Certificate.revoked_at.is_(None),
    Certificate.not_after > bindparam("now"),
)
# Built once: the statement's cache key is memoised, so each call only binds values.
_ENROLLMENT_TOKEN = (
    select(
        BootstrapToken.token_id,
        BootstrapToken.secret_hash,
        BootstrapToken.pool,
        BootstrapToken.labels,
        BootstrapToken.name_pattern,
        BootstrapToken.max_uses,
        BootstrapToken.uses,
        BootstrapToken.expires_at,
        BootstrapToken.deleted_at,
        BootstrapToken.agent_id,
        Agent.agent_id,
        Agent.pool,
        Agent.labels,
        Certificate.serial,
        Certificate.chain_pem,
        Certificate.not_after,
    )
    .select_from(BootstrapToken)
    .outerjoin(Certificate, _EARLIER)
    .outerjoin(Agent, Agent.agent_id == Certificate.agent_id)
    .where(BootstrapToken.token_id == bindparam("token_id"))
    .limit(1)
)
# enroll_agent's three steps on SQLite (Postgres runs them as one statement, _ENROLL_PG).
_REDEEM = (
    update(BootstrapToken)
    .where(
        BootstrapToken.token_id == bindparam("redeemed"),
        BootstrapToken.uses < BootstrapToken.max_uses,
        BootstrapToken.expires_at > bindparam("now"),
        BootstrapToken.deleted_at.is_(None),
    )
    .values(uses=BootstrapToken.uses + 1)
)
_ADD_AGENT = sqlite_insert(Agent).on_conflict_do_nothing()
_ADD_CERTIFICATE = insert(Certificate)


async def enrollment_token(
    conn: AsyncConnection, token_id: str, fingerprint: str, now: datetime
) -> EnrollmentToken | None:
    """The token, and what it earlier issued for the key ``fingerprint``: one round trip."""
    result = await conn.execute(
        _ENROLLMENT_TOKEN, {"token_id": token_id, "fingerprint": fingerprint, "now": now}
    )
    row = result.first()
    if row is None:
        return None
    (token_id, secret_hash, pool, labels, pattern, max_uses, uses, expires_at, deleted_at,
     bound_agent, agent_id, agent_pool, agent_labels, serial, chain_pem,
     not_after) = row  # fmt: skip
    earlier = None
    if agent_id is not None:
        earlier = EarlierEnrollment(
            agent_id, agent_pool, agent_labels, serial, chain_pem, not_after
        )
    return EnrollmentToken(
        token_id,
        secret_hash,
        pool,
        labels,
        pattern,
        max_uses,
        uses,
        expires_at,
        deleted_at,
        earlier,
        bound_agent,
    )


async def enroll_agent(
    conn: AsyncConnection,
    *,
    token_id: str,
    now: datetime,
    agent_id: str,
    pool: str,
    labels: dict[str, str],
    serial: str,
    fingerprint: str,
    chain_pem: bytes,
    not_before: datetime,
    not_after: datetime,
    issuer_id: str,
) -> Enrolled:
    """Use up one redemption of the token, add the agent and its first certificate.

    Atomic per row: the token's ``uses`` only grows while below ``max_uses`` (so two
    concurrent redemptions of a single-use token cannot both succeed), and the agent is
    inserted with ON CONFLICT DO NOTHING (a concurrent enrollment of the same name waits
    for the other one, then finds it taken). Anything but "enrolled" leaves the caller
    to roll back, which also gives the redemption back.
    """
    if conn.dialect.name == "postgresql":
        # One statement, one round trip: the same three steps as data-modifying CTEs.
        driver = (await conn.get_raw_connection()).driver_connection
        assert isinstance(driver, asyncpg.Connection)
        redeemed, added = await driver.fetchrow(
            _ENROLL_PG, token_id, now, agent_id, pool, json.dumps(labels), serial,
            fingerprint, chain_pem, not_before, not_after, issuer_id,
        )  # fmt: skip
    else:
        added = 0
        redeemed = (await conn.execute(_REDEEM, {"redeemed": token_id, "now": now})).rowcount
        if redeemed:
            agent = {
                "agent_id": agent_id,
                "pool": pool,
                "labels": labels,
                "enabled": True,
                "token_id": token_id,
                "enrolled_at": now,
            }
            if (await conn.execute(_ADD_AGENT, agent)).rowcount:
                certificate = {
                    "serial": serial,
                    "agent_id": agent_id,
                    "public_key_fingerprint": fingerprint,
                    "token_id": token_id,
                    "reason": "enroll",
                    "chain_pem": chain_pem,
                    "not_before": not_before,
                    "not_after": not_after,
                    "issued_at": now,
                    "issuer_id": issuer_id,
                }
                added = (await conn.execute(_ADD_CERTIFICATE, certificate)).rowcount
    if not redeemed:
        return "used up"
    return "enrolled" if added else "name taken"


_ENROLL_PG = """
WITH redeemed AS (
    UPDATE bootstrap_tokens SET uses = uses + 1
    WHERE token_id = $1 AND uses < max_uses AND expires_at > $2 AND deleted_at IS NULL
    RETURNING token_id
), agent AS (
    INSERT INTO agents (agent_id, pool, labels, enabled, token_id, enrolled_at)
    SELECT $3, $4, $5::json, true, token_id, $2 FROM redeemed
    ON CONFLICT (agent_id) DO NOTHING
    RETURNING agent_id, token_id
), certificate AS (
    INSERT INTO certificates (serial, agent_id, public_key_fingerprint, token_id, reason,
                              chain_pem, not_before, not_after, issued_at, issuer_id)
    SELECT $6, agent_id, $7, token_id, 'enroll', $8, $9, $10, $2, $11 FROM agent
    RETURNING serial
)
SELECT (SELECT count(*) FROM redeemed), (SELECT count(*) FROM certificate)
"""


async def agent(session: AsyncSession, agent_id: str) -> Agent | None:
    return await session.get(Agent, agent_id, populate_existing=True)


async def agents(session: AsyncSession, pool: str = "") -> list[Agent]:
    query = select(Agent).order_by(Agent.agent_id)
    if pool:
        query = query.where(Agent.pool == pool)
    return list((await session.execute(query)).scalars())


async def certificate(session: AsyncSession, serial: str) -> Certificate | None:
    return await session.get(Certificate, serial, populate_existing=True)


async def certificates_of(session: AsyncSession, agent_ids: Sequence[str]) -> list[Certificate]:
    result = await session.execute(
        select(Certificate)
        .where(Certificate.agent_id.in_(agent_ids))
        .order_by(Certificate.not_before.desc())
    )
    return list(result.scalars())


async def lock_agent(session: AsyncSession, agent_id: str) -> Agent | None:
    """The agent's row, locked until the transaction ends (Postgres; SQLite serialises
    writers anyway). Renewal, re-enrollment, removal and revocation of one agent take
    this lock first, so a renewal cannot slip a new certificate past a revocation."""
    result = await session.execute(
        select(Agent)
        .where(Agent.agent_id == agent_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return result.scalar_one_or_none()


def _lineage(root: str) -> Any:
    """A serial and every certificate renewed from it, however many renewals deep."""
    lineage = select(Certificate.serial).where(Certificate.serial == root).cte(recursive=True)
    child = aliased(Certificate)
    return lineage.union(select(child.serial).where(child.renewed_from == lineage.c.serial))


async def revoke_certificates(
    session: AsyncSession, *, agent_id: str | None = None, serial: str | None = None, reason: str
) -> list[str]:
    """Revoke live certificates of an agent, or one serial and its descendants (every
    certificate renewed from it, transitively); returns the serials revoked."""
    query = select(Certificate.serial).where(Certificate.revoked_at.is_(None))
    if agent_id is not None:
        query = query.where(Certificate.agent_id == agent_id)
    if serial is not None:
        query = query.where(Certificate.serial.in_(select(_lineage(serial).c.serial)))
    serials = sorted((await session.execute(query)).scalars())
    if serials:
        await session.execute(
            update(Certificate)
            .where(Certificate.serial.in_(serials))
            .values(revoked_at=utcnow(), revocation_reason=reason[:200])
        )
    return serials


async def key_used_by(session: AsyncSession, agent_id: str, fingerprint: str) -> str | None:
    """The serial of a certificate this agent already holds for that public key, if any."""
    result = await session.execute(
        select(Certificate.serial)
        .where(Certificate.agent_id == agent_id, Certificate.public_key_fingerprint == fingerprint)
        .limit(1)
    )
    return result.scalar_one_or_none()


@dataclass(frozen=True, slots=True)
class Reenrolled:
    """What :func:`reenroll_agent` did, and what the agent was before (for the audit)."""

    outcome: Literal["reenrolled", "used up", "no agent"]
    was_removed: bool = False
    was_enabled: bool = False
    revoked: list[str] = field(default_factory=list)
    """Serials the agent still had live, revoked by the re-enrollment."""


async def reenroll_agent(
    session: AsyncSession,
    *,
    token_id: str,
    now: datetime,
    agent_id: str,
    serial: str,
    fingerprint: str,
    chain_pem: bytes,
    not_before: datetime,
    not_after: datetime,
    issuer_id: str,
) -> Reenrolled:
    """Redeem a re-enrollment token for its agent: certify the new key, revoke whatever
    certificates the agent still had live, and restore the agent (not removed, enabled).
    Anything but "reenrolled" leaves the caller to roll back."""
    conn = await session.connection()
    redeemed = (await conn.execute(_REDEEM, {"redeemed": token_id, "now": now})).rowcount
    if not redeemed:
        return Reenrolled("used up")
    agent = await lock_agent(session, agent_id)
    if agent is None:
        return Reenrolled("no agent")
    was_removed, was_enabled = agent.removed_at is not None, agent.enabled
    revoked = await revoke_certificates(session, agent_id=agent_id, reason="re-enrolled")
    agent.removed_at = None
    agent.enabled = True
    agent.token_id = token_id
    session.add(
        Certificate(
            serial=serial,
            agent_id=agent_id,
            public_key_fingerprint=fingerprint,
            token_id=token_id,
            reason="reenroll",
            chain_pem=chain_pem,
            not_before=not_before,
            not_after=not_after,
            issued_at=now,
            issuer_id=issuer_id,
        )
    )
    await session.flush()
    return Reenrolled("reenrolled", was_removed, was_enabled, revoked)


async def delete_reenrollment_tokens(
    session: AsyncSession, agent_id: str, now: datetime
) -> list[str]:
    """Delete the live re-enrollment tokens bound to ``agent_id``; returns their ids."""
    result = await session.execute(
        select(BootstrapToken.token_id).where(
            BootstrapToken.agent_id == agent_id, BootstrapToken.deleted_at.is_(None)
        )
    )
    token_ids = sorted(result.scalars())
    if token_ids:
        await session.execute(
            update(BootstrapToken)
            .where(BootstrapToken.token_id.in_(token_ids))
            .values(deleted_at=now)
        )
    return token_ids


async def request_rotation(session: AsyncSession, agent_id: str | None, now: datetime) -> int:
    """Mark one agent, or every agent not removed, as asked to rotate at ``now``: their
    streams on older certificates get Renew when they next connect. Returns how many."""
    statement = update(Agent).where(Agent.removed_at.is_(None)).values(rotate_requested_at=now)
    if agent_id is not None:
        statement = statement.where(Agent.agent_id == agent_id)
    result = await session.execute(statement)
    return int(getattr(result, "rowcount", 0) or 0)


async def revoked_since(session: AsyncSession, since: datetime) -> list[tuple[str, str]]:
    """(agent_id, serial) of certificates revoked at or after ``since``."""
    result = await session.execute(
        select(Certificate.agent_id, Certificate.serial).where(Certificate.revoked_at >= since)
    )
    return [(agent_id, serial) for agent_id, serial in result]


async def disabled_agents(session: AsyncSession, agent_ids: set[str]) -> list[str]:
    """Which of ``agent_ids`` are disabled.

    Asks for the disabled agents (few) and intersects here, rather than sending every
    connected agent's id (thousands) as parameters every poll."""
    if not agent_ids:
        return []
    result = await session.execute(select(Agent.agent_id).where(Agent.enabled.is_(False)))
    return [agent_id for agent_id in result.scalars() if agent_id in agent_ids]


@dataclass(frozen=True, slots=True)
class Presented:
    """What the agent listener needs to know about a presented certificate's serial."""

    agent_id: str
    revoked_at: datetime | None
    enabled: bool
    pool: str
    labels: dict[str, str]
    rotate_requested_at: datetime | None = None
    issued_at: datetime | None = None


async def presented_many(conn: AsyncConnection, serials: Sequence[str]) -> list[Presented | None]:
    """Per serial: its certificate's agent, revocation and the agent's state and scope
    (None: not a certificate this server issued). One query for many new connections."""
    rows = await conn.execute(
        select(
            Certificate.serial,
            Certificate.agent_id,
            Certificate.revoked_at,
            Agent.enabled,
            Agent.pool,
            Agent.labels,
            Agent.rotate_requested_at,
            Certificate.issued_at,
        )
        .join(Agent, Agent.agent_id == Certificate.agent_id)
        .where(Certificate.serial.in_(set(serials)))
    )
    found = {
        serial: Presented(agent_id, revoked_at, enabled, pool, labels, rotate, issued)
        for serial, agent_id, revoked_at, enabled, pool, labels, rotate, issued in rows
    }
    return [found.get(serial) for serial in serials]


async def api_token(session: AsyncSession, token_id: str) -> ApiToken | None:
    return await session.get(ApiToken, token_id)


async def has_live_admin_token(session: AsyncSession) -> bool:
    result = await session.execute(
        select(ApiToken.token_id)
        .where(ApiToken.role == "admin", ApiToken.deleted_at.is_(None))
        .limit(1)
    )
    return result.first() is not None
