"""Bootstrap tokens, agents and their certificates."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from server.storage.models import Agent, ApiToken, BootstrapToken, Certificate
from server.storage.types import utcnow


async def bootstrap_token(session: AsyncSession, token_id: str) -> BootstrapToken | None:
    return await session.get(BootstrapToken, token_id, populate_existing=True)


async def redeem_bootstrap_token(session: AsyncSession, token_id: str, now: datetime) -> bool:
    """Use up one redemption atomically; False if the token is used up, expired or deleted."""
    result = await session.execute(
        update(BootstrapToken)
        .where(
            BootstrapToken.token_id == token_id,
            BootstrapToken.uses < BootstrapToken.max_uses,
            BootstrapToken.expires_at > now,
            BootstrapToken.deleted_at.is_(None),
        )
        .values(uses=BootstrapToken.uses + 1)
    )
    return int(result.rowcount) == 1  # type: ignore[attr-defined]


async def certificate_for_key(
    session: AsyncSession, token_id: str, fingerprint: str, now: datetime
) -> Certificate | None:
    """A live enrollment certificate earlier issued from this token for this key (a retry)."""
    result = await session.execute(
        select(Certificate).where(
            Certificate.token_id == token_id,
            Certificate.public_key_fingerprint == fingerprint,
            Certificate.reason == "enroll",
            Certificate.revoked_at.is_(None),
            Certificate.not_after > now,
        )
    )
    return result.scalars().first()


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


async def revoke_certificates(
    session: AsyncSession, *, agent_id: str | None = None, serial: str | None = None, reason: str
) -> list[str]:
    """Revoke live certificates of an agent, or one serial; returns the serials revoked."""
    query = select(Certificate.serial).where(Certificate.revoked_at.is_(None))
    if agent_id is not None:
        query = query.where(Certificate.agent_id == agent_id)
    if serial is not None:
        query = query.where(Certificate.serial == serial)
    serials = list((await session.execute(query)).scalars())
    if serials:
        await session.execute(
            update(Certificate)
            .where(Certificate.serial.in_(serials))
            .values(revoked_at=utcnow(), revocation_reason=reason[:200])
        )
    return serials


async def revoked_since(session: AsyncSession, since: datetime) -> list[tuple[str, str]]:
    """(agent_id, serial) of certificates revoked at or after ``since``."""
    result = await session.execute(
        select(Certificate.agent_id, Certificate.serial).where(Certificate.revoked_at >= since)
    )
    return [(agent_id, serial) for agent_id, serial in result]


async def disabled_agents(session: AsyncSession, agent_ids: set[str]) -> list[str]:
    """Which of ``agent_ids`` are disabled."""
    if not agent_ids:
        return []
    result = await session.execute(
        select(Agent.agent_id).where(Agent.agent_id.in_(agent_ids), Agent.enabled.is_(False))
    )
    return list(result.scalars())


async def api_token(session: AsyncSession, token_id: str) -> ApiToken | None:
    return await session.get(ApiToken, token_id)


async def has_live_admin_token(session: AsyncSession) -> bool:
    result = await session.execute(
        select(ApiToken.token_id)
        .where(ApiToken.role == "admin", ApiToken.deleted_at.is_(None))
        .limit(1)
    )
    return result.first() is not None
