"""Tasks remember their trace.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

- ``tasks.trace_context``: the W3C Trace Context (``traceparent``, then a space and
  ``tracestate`` if any) of the span that submitted the task, so that its queue wait,
  dispatch, run on the agent and Result join the submitter's OpenTelemetry trace
  (docs/tracing.md). NULL: not traced, as every task before this revision. Nullable
  and without a default, so adding it rewrites no row on Postgres.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("trace_context", sa.String(600), nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "trace_context")
