"""Budget definitions and pool settings: what an administrator set, kept in the database.

The running totals of a budget (spent, reserved) live in the quota store, keyed by
:meth:`BudgetRule.key`; these rows only say which scopes are limited, by how much and
over which period, and which models a pool's AI tasks may name. Callers validate
(scope syntax, periods, model prices) before writing; these functions only store.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from muster.server.ai.budgets import BudgetRule
from muster.server.storage.models import Budget, PoolSettings
from muster.server.storage.types import utcnow


async def list_budgets(session: AsyncSession) -> list[Budget]:
    """Every budget, by scope."""
    return list((await session.execute(select(Budget).order_by(Budget.scope))).scalars())


async def get_budget(session: AsyncSession, scope: str) -> Budget | None:
    return await session.get(Budget, scope)


async def set_budget(
    session: AsyncSession, scope: str, limit_micros: int, period: str, *, by: str
) -> Budget:
    """Create or change the budget of ``scope`` (safe against a concurrent setter: the
    later write wins, as with any other setting)."""
    await _upsert(
        session,
        Budget,
        "scope",
        {
            "scope": scope,
            "limit_micros": limit_micros,
            "period": period,
            "updated_at": utcnow(),
            "updated_by": by,
        },
    )
    row = await session.get(Budget, scope, populate_existing=True)
    assert row is not None
    return row


async def delete_budget(session: AsyncSession, scope: str) -> bool:
    """Remove the budget of ``scope``; False if it had none."""
    row = await session.get(Budget, scope)
    if row is None:
        return False
    await session.delete(row)
    await session.flush()
    return True


async def pool_settings(session: AsyncSession, pool: str) -> PoolSettings | None:
    return await session.get(PoolSettings, pool)


async def list_pool_settings(session: AsyncSession) -> list[PoolSettings]:
    """Every pool that has settings, by name."""
    rows = await session.execute(select(PoolSettings).order_by(PoolSettings.pool))
    return list(rows.scalars())


async def set_pool_settings(
    session: AsyncSession, pool: str, allowed_models: list[str], *, by: str
) -> PoolSettings:
    """Replace ``pool``'s model list (empty: any model with a price)."""
    await _upsert(
        session,
        PoolSettings,
        "pool",
        {
            "pool": pool,
            "allowed_models": list(allowed_models),
            "updated_at": utcnow(),
            "updated_by": by,
        },
    )
    row = await session.get(PoolSettings, pool, populate_existing=True)
    assert row is not None
    return row


def rule(row: Budget) -> BudgetRule:
    """The row as the rule the quota store and the dispatch gate work with."""
    return BudgetRule(scope=row.scope, limit_micros=row.limit_micros, period=row.period)


async def _upsert(session: AsyncSession, model: Any, key: str, values: dict[str, Any]) -> None:
    """INSERT ... ON CONFLICT (key) DO UPDATE, in the dialect of the session's database."""
    dialect = session.bind.dialect.name if session.bind is not None else ""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(model).values(**values)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[key],
            set_={name: statement.excluded[name] for name in values if name != key},
        )
    )
