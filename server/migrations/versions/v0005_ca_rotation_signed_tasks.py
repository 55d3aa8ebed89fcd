"""CA rotation and signed tasks.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

- ``ca_certificates``: every root and intermediate the CA has had, with its state
  (prepared, active, previous, retired), so every replica trusts, issues and reloads
  from one shared record. ``key_ref`` says where the private key is (a file in the CA
  directory, or a PKCS#11 object); the key itself is never stored here. ``bundle_version``
  rows give the trust bundle's monotonically increasing version (see TrustBundle in
  agent.proto). Rows are imported from the CA directory at the first start after this
  revision.
- ``certificates.issuer_id``: the intermediate (``ca_certificates.ca_id``) that issued a
  certificate, so ``muster ca status`` counts live leaves per CA and ``--retire`` knows
  when no live leaf depends on a root. NULL: issued before this revision (assigned to
  the intermediate imported at first start).
- ``tasks.signature``: a signed task's envelope (a serialized TaskSignature), kept
  verbatim and forwarded in every Assignment.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ca_certificates",
        sa.Column("ca_id", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("parent_id", sa.String(64), nullable=True),
        sa.Column("certificate_pem", sa.LargeBinary, nullable=False),
        sa.Column("key_ref", sa.String(512), nullable=False),
        sa.Column("not_before", UTC_TIME, nullable=False),
        sa.Column("not_after", UTC_TIME, nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.Column("bundle_version", sa.BigInteger, nullable=False),
    )
    op.add_column("certificates", sa.Column("issuer_id", sa.String(64), nullable=True))
    op.create_index("ix_certificates_issuer_id", "certificates", ["issuer_id"])
    op.add_column("tasks", sa.Column("signature", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "signature")
    op.drop_index("ix_certificates_issuer_id", table_name="certificates")
    op.drop_column("certificates", "issuer_id")
    op.drop_table("ca_certificates")
