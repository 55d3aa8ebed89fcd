"""Tenants: the owners of tasks, idempotency keys and budgets. A tenant's name is its
stable identity: tenants are never renamed or deleted, so a name is never reused."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from muster.server.storage.models import ApiToken, Tenant
from muster.server.storage.types import utcnow


async def ensure(session: AsyncSession, name: str, *, created_by: str) -> None:
    """Create tenant ``name`` unless it exists (safe against a concurrent creator)."""
    dialect = session.bind.dialect.name if session.bind is not None else ""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    await session.execute(
        insert(Tenant)
        .values(name=name, created_at=utcnow(), created_by=created_by)
        .on_conflict_do_nothing(index_elements=["name"])
    )


async def create_own(
    session: AsyncSession, token_name: str, token_id: str, *, created_by: str
) -> str:
    """A new tenant for one token: named after the token, or ``<name>-<token_id>`` when
    that name is taken (by a deleted token's tenant, say). Returns its name."""
    for name in (token_name, f"{token_name[:46]}-{token_id}"):
        if await session.get(Tenant, name) is None:
            session.add(Tenant(name=name, created_at=utcnow(), created_by=created_by))
            await session.flush()
            return name
    raise RuntimeError(f"tenant names for token {token_id} are both taken")  # ids are unique


async def list_with_token_counts(session: AsyncSession) -> list[tuple[Tenant, int]]:
    """Every tenant, by name, with its number of live API tokens."""
    live = (
        select(ApiToken.tenant, func.count().label("n"))
        .where(ApiToken.deleted_at.is_(None))
        .group_by(ApiToken.tenant)
        .subquery()
    )
    rows = await session.execute(
        select(Tenant, func.coalesce(live.c.n, 0))
        .outerjoin(live, live.c.tenant == Tenant.name)
        .order_by(Tenant.name)
    )
    return [(tenant, int(count)) for tenant, count in rows]
