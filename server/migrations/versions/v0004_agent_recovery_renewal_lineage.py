"""Recovering agents and renewal lineage.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

- ``certificates.renewed_from``: the serial a renewal was made with, so revoking a serial
  also revokes every certificate renewed from it (a stolen key cannot renew itself out
  of a revocation). Certificates issued before this revision have no parent.
- ``certificates.issued_at``: when a certificate was issued (its notBefore is backdated,
  in whole seconds), so a rotation request reaches exactly the certificates issued
  before it.
- ``agents.removed_at``: ``muster agents remove`` retires an agent; its row stays (its
  certificates and the audit trail name it), and only a re-enrollment token brings it back.
- ``agents.rotate_requested_at``: ``muster agents rotate``, remembered so an agent that
  is offline when asked is told to renew when it next connects.
- ``bootstrap_tokens.agent_id``: a re-enrollment token, bound to one existing agent id.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("certificates", sa.Column("renewed_from", sa.String(48), nullable=True))
    op.create_index("ix_certificates_renewed_from", "certificates", ["renewed_from"])
    op.add_column("certificates", sa.Column("issued_at", UTC_TIME, nullable=True))
    op.add_column("agents", sa.Column("removed_at", UTC_TIME, nullable=True))
    op.add_column("agents", sa.Column("rotate_requested_at", UTC_TIME, nullable=True))
    op.add_column("bootstrap_tokens", sa.Column("agent_id", sa.String(63), nullable=True))


def downgrade() -> None:
    op.drop_column("bootstrap_tokens", "agent_id")
    op.drop_column("agents", "rotate_requested_at")
    op.drop_column("agents", "removed_at")
    op.drop_column("certificates", "issued_at")
    op.drop_index("ix_certificates_renewed_from", table_name="certificates")
    op.drop_column("certificates", "renewed_from")
