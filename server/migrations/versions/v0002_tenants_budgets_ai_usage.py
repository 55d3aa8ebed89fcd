"""Tenants, spend budgets, pool settings and per-attempt AI usage.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06

Until now a task's owner was the submitting API token's *name*, which is not unique: a
new token with a deleted token's name inherited its tasks and idempotency keys. Tenants
make the owner explicit. Existing data keeps its meaning: every distinct token name
becomes a tenant of the same name, its tokens belong to it, and tasks keep their owner
(which now names that tenant).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)
MIGRATED_BY = "migration 0002"
_EMPTY = ""
_ZERO = "0"


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    # Every name that ever owned anything becomes a tenant: token names, and task owners
    # whose token is gone.
    op.execute(
        sa.text(
            "INSERT INTO tenants (name, created_at, created_by) "
            "SELECT name, MIN(created_at), :by FROM ("
            "  SELECT name, created_at FROM api_tokens"
            "  UNION ALL SELECT owner AS name, created_at FROM tasks"
            ") AS owners GROUP BY name"
        ).bindparams(by=MIGRATED_BY)
    )
    # Plain ADD COLUMN with a default works on both backends without copying tables. The
    # defaults stay: the code always sets these columns, but rows written by other tools
    # (a restore, a seeding script) get the same neutral values.
    op.add_column(
        "api_tokens", sa.Column("tenant", sa.String(63), nullable=False, server_default=_EMPTY)
    )
    op.execute("UPDATE api_tokens SET tenant = name")
    op.create_index("ix_api_tokens_tenant", "api_tokens", ["tenant"])
    column_defaults: tuple[tuple[str, sa.types.TypeEngine[Any], str], ...] = (
        ("submitted_by", sa.String(100), _EMPTY),
        ("cache_creation_tokens", sa.BigInteger(), _ZERO),
        ("cache_read_tokens", sa.BigInteger(), _ZERO),
        ("reported_cost_micros", sa.BigInteger(), _ZERO),
        ("reserve_micros", sa.BigInteger(), _ZERO),
        ("waiting_reason", sa.Text(), _EMPTY),
        ("rate_limited", sa.Integer(), _ZERO),
    )
    for column, type_, default in column_defaults:
        op.add_column("tasks", sa.Column(column, type_, nullable=False, server_default=default))
    op.add_column("tasks", sa.Column("model", sa.String(100), nullable=True))
    op.add_column("tasks", sa.Column("max_cost_micros", sa.BigInteger(), nullable=True))
    op.add_column("tasks", sa.Column("output_schema", sa.Text(), nullable=True))
    op.execute("UPDATE tasks SET submitted_by = owner")

    op.create_table(
        "attempt_usage",
        sa.Column("task_id", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.String(63), nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_creation_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_creation_1h_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_read_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("reported_cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("task_id", "attempt"),
    )
    op.create_table(
        "budgets",
        sa.Column("scope", sa.String(80), nullable=False),
        sa.Column("limit_micros", sa.BigInteger(), nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        sa.PrimaryKeyConstraint("scope"),
    )
    op.create_table(
        "pool_settings",
        sa.Column("pool", sa.String(63), nullable=False),
        sa.Column("allowed_models", sa.JSON(), nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.Column("updated_by", sa.String(100), nullable=False),
        sa.PrimaryKeyConstraint("pool"),
    )


def downgrade() -> None:
    op.drop_table("pool_settings")
    op.drop_table("budgets")
    op.drop_table("attempt_usage")
    for column in (
        "rate_limited",
        "waiting_reason",
        "output_schema",
        "max_cost_micros",
        "reserve_micros",
        "model",
        "reported_cost_micros",
        "cache_read_tokens",
        "cache_creation_tokens",
        "submitted_by",
    ):
        op.drop_column("tasks", column)
    op.drop_index("ix_api_tokens_tenant", table_name="api_tokens")
    op.drop_column("api_tokens", "tenant")
    op.drop_table("tenants")
