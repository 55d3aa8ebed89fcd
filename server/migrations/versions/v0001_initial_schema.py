"""The initial schema, and the audit trail's append-only guard.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Besides the tables, a trigger refuses UPDATE, DELETE (and on Postgres TRUNCATE) of
``audit_events`` for every role, its owner included; on Postgres only the owner keeps
those privileges, whatever default privileges would have granted.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the column types: a migration must not change when the models do.
UTC_TIME = sa.DateTime(timezone=True)
AUDIT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
APPEND_ONLY = "audit_events is append-only"


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(63), nullable=False),
        sa.Column("pool", sa.String(63), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=False),
        sa.Column("enrolled_at", UTC_TIME, nullable=False),
        sa.Column("last_seen_at", UTC_TIME, nullable=True),
        sa.PrimaryKeyConstraint("agent_id"),
    )
    op.create_index("ix_agents_pool", "agents", ["pool"])

    op.create_table(
        "api_tokens",
        sa.Column("token_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("expires_at", UTC_TIME, nullable=True),
        sa.Column("deleted_at", UTC_TIME, nullable=True),
        sa.PrimaryKeyConstraint("token_id"),
    )

    op.create_table(
        "bootstrap_tokens",
        sa.Column("token_id", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("pool", sa.String(63), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("name_pattern", sa.String(100), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("expires_at", UTC_TIME, nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("created_by", sa.String(100), nullable=False),
        sa.Column("deleted_at", UTC_TIME, nullable=True),
        sa.PrimaryKeyConstraint("token_id"),
    )

    op.create_table(
        "certificates",
        sa.Column("serial", sa.String(48), nullable=False),
        sa.Column("agent_id", sa.String(63), nullable=False),
        sa.Column("public_key_fingerprint", sa.String(80), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=True),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("chain_pem", sa.LargeBinary(), nullable=False),
        sa.Column("not_before", UTC_TIME, nullable=False),
        sa.Column("not_after", UTC_TIME, nullable=False),
        sa.Column("revoked_at", UTC_TIME, nullable=True),
        sa.Column("revocation_reason", sa.String(200), nullable=True),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.agent_id"]),
        sa.PrimaryKeyConstraint("serial"),
    )
    op.create_index("ix_certificates_agent_id", "certificates", ["agent_id"])
    op.create_index("ix_certificates_revoked_at", "certificates", ["revoked_at"])
    op.create_index(
        "ix_certificates_token_key", "certificates", ["token_id", "public_key_fingerprint"]
    )

    op.create_table(
        "tasks",
        sa.Column("task_id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("pool", sa.String(63), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=True),
        sa.Column("agent_id", sa.String(63), nullable=True),
        sa.Column("session_id", sa.String(40), nullable=True),
        sa.Column("lease_expires_at", UTC_TIME, nullable=True),
        sa.Column("not_before", UTC_TIME, nullable=True),
        sa.Column("output", sa.LargeBinary(), nullable=True),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("schedule_to_start_timeout", sa.Float(), nullable=True),
        sa.Column("start_to_close_timeout", sa.Float(), nullable=True),
        sa.Column("deadline", UTC_TIME, nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.Column("queued_at", UTC_TIME, nullable=False),
        sa.Column("started_at", UTC_TIME, nullable=True),
        sa.Column("finished_at", UTC_TIME, nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("task_id"),
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_tasks_owner_idempotency_key"),
    )
    op.create_index("ix_tasks_created", "tasks", ["created_at"])
    op.create_index("ix_tasks_queue", "tasks", ["state", "pool", "priority", "queued_at"])
    op.create_index("ix_tasks_session_id", "tasks", ["session_id"])

    op.create_table(
        "audit_events",
        sa.Column("id", AUDIT_ID, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(32), nullable=False),
        sa.Column("chain", sa.String(100), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("time", UTC_TIME, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("peer", sa.String(100), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("chain", "seq", name="uq_audit_events_chain_seq"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_audit_events_action", "audit_events", ["action"])
    op.create_index("ix_audit_events_actor", "audit_events", ["actor"])
    op.create_index("ix_audit_events_time", "audit_events", ["time"])

    if op.get_context().dialect.name == "postgresql":
        _guard_audit_postgres()
    else:
        _guard_audit_sqlite()


def _guard_audit_postgres() -> None:
    op.execute(
        f"""
        CREATE FUNCTION muster_audit_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '{APPEND_ONLY}' USING HINT = 'audit rows are only ever inserted';
        END
        $$
        """
    )
    # Statement-level, so even an UPDATE or DELETE matching no row is refused.
    op.execute(
        """
        CREATE TRIGGER audit_events_append_only
        BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events
        FOR EACH STATEMENT EXECUTE FUNCTION muster_audit_append_only()
        """
    )
    # Default privileges may have granted the application role UPDATE and DELETE here
    # (and on the version table, which only migrations write): take them back from
    # everybody but the owner. The trigger holds regardless; this makes it "permission
    # denied" for the application role.
    op.execute(
        """
        DO $$
        DECLARE
            grant_row record;
        BEGIN
            FOR grant_row IN
                SELECT DISTINCT acl.grantee, c.relname
                FROM pg_class c, aclexplode(c.relacl) AS acl
                WHERE c.oid IN ('audit_events'::regclass, 'alembic_version'::regclass)
                  AND acl.grantee <> c.relowner AND acl.grantee <> 0
            LOOP
                -- regrole::text is already quoted where the name needs it.
                EXECUTE format(
                    'REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON %I FROM %s',
                    grant_row.relname, grant_row.grantee::regrole::text);
                IF grant_row.relname = 'alembic_version' THEN
                    EXECUTE format('REVOKE INSERT ON alembic_version FROM %s',
                                   grant_row.grantee::regrole::text);
                END IF;
            END LOOP;
        END
        $$
        """
    )
    op.execute("REVOKE UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON audit_events FROM PUBLIC")


def _guard_audit_sqlite() -> None:
    for event in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER audit_events_no_{event.lower()} BEFORE {event} ON audit_events "
            f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"
        )


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION muster_audit_append_only()")
    else:
        op.execute("DROP TRIGGER audit_events_no_update")
        op.execute("DROP TRIGGER audit_events_no_delete")
    op.drop_table("audit_events")
    op.drop_table("tasks")
    op.drop_table("certificates")
    op.drop_table("bootstrap_tokens")
    op.drop_table("api_tokens")
    op.drop_table("agents")
