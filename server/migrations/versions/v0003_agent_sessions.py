"""Agent sessions: cluster-wide presence of connected agents.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

Until now "connected" meant connected to the replica that answered. Every replica now
writes one row per live stream at Hello, refreshes ``last_seen_at``/``expires_at`` of all
its rows in one statement per interval, and deletes the row when the stream ends. A row
whose ``expires_at`` has passed (its replica was killed) no longer counts as connected.

Agents also remember what they last declared in Hello (task kinds, concurrency), so a
submission no enrolled agent could run is flagged even while the agents are offline.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "agent_sessions",
        sa.Column("session_id", sa.String(40), nullable=False),
        sa.Column("agent_id", sa.String(63), nullable=False),
        sa.Column("replica", sa.String(100), nullable=False),
        sa.Column("instance", sa.String(100), nullable=False),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("max_concurrency", sa.Integer(), nullable=False),
        sa.Column("cert_serial", sa.String(48), nullable=False),
        sa.Column("cert_not_after", UTC_TIME, nullable=True),
        sa.Column("connected_at", UTC_TIME, nullable=False),
        sa.Column("last_seen_at", UTC_TIME, nullable=False),
        sa.Column("expires_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("session_id"),
    )
    op.create_index("ix_agent_sessions_agent_id", "agent_sessions", ["agent_id"])
    op.create_index("ix_agent_sessions_instance", "agent_sessions", ["instance"])
    op.create_index("ix_agent_sessions_expires_at", "agent_sessions", ["expires_at"])
    op.add_column("agents", sa.Column("capabilities", sa.JSON(), nullable=True))
    op.add_column("agents", sa.Column("max_concurrency", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("agents", "max_concurrency")
    op.drop_column("agents", "capabilities")
    op.drop_index("ix_agent_sessions_expires_at", table_name="agent_sessions")
    op.drop_index("ix_agent_sessions_instance", table_name="agent_sessions")
    op.drop_index("ix_agent_sessions_agent_id", table_name="agent_sessions")
    op.drop_table("agent_sessions")
