"""The relational schema. Every durable fact of the control plane lives in these tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from muster.server.storage.types import UTCDateTime


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, str]: JSON}


class Agent(Base):
    """An enrolled agent. Its pool and labels are its scope, fixed at enrollment."""

    __tablename__ = "agents"

    agent_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    pool: Mapped[str] = mapped_column(String(63), index=True)
    labels: Mapped[dict[str, str]]
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    token_id: Mapped[str] = mapped_column(String(32))
    enrolled_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]
    """Written at connect and disconnect, and by its replica's presence refresh."""
    capabilities: Mapped[list[str] | None] = mapped_column(JSON)
    """Task kinds its last Hello declared (None: never connected)."""
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    """Its last Hello's max_concurrency."""
    removed_at: Mapped[datetime | None]
    """Set by ``muster agents remove``: its certificates are revoked and the id comes back
    only through a re-enrollment token bound to it (the row stays for audit and history)."""
    rotate_requested_at: Mapped[datetime | None]
    """An operator asked for rotation (``muster agents rotate``): a stream whose certificate
    is older is sent Renew, now or when it next connects."""


class AgentSession(Base):
    """A live agent stream on some replica: cluster-wide presence. Written at Hello,
    refreshed in one statement per replica per interval, deleted when the stream ends;
    a row past ``expires_at`` (its replica died) does not count as connected."""

    __tablename__ = "agent_sessions"

    session_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(63), index=True)
    replica: Mapped[str] = mapped_column(String(100))
    """The replica's name (replica_id), as shown to operators."""
    instance: Mapped[str] = mapped_column(String(100), index=True)
    """This one server process (name:pid:random): what its refresh and cleanup select by,
    so two replicas sharing a name never keep each other's rows alive."""
    capabilities: Mapped[list[str]] = mapped_column(JSON)
    """Task kinds the agent said it runs (Hello)."""
    max_concurrency: Mapped[int] = mapped_column(Integer)
    cert_serial: Mapped[str] = mapped_column(String(48))
    cert_not_after: Mapped[datetime | None]
    connected_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Certificate(Base):
    """Every certificate the CA issued; the agent listener accepts only serials found here."""

    __tablename__ = "certificates"

    serial: Mapped[str] = mapped_column(String(48), primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.agent_id"), index=True)
    public_key_fingerprint: Mapped[str] = mapped_column(String(80))
    token_id: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(16))
    chain_pem: Mapped[bytes] = mapped_column(LargeBinary)
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    revoked_at: Mapped[datetime | None] = mapped_column(index=True)
    """Replicas poll recent revocations to close streams they hold (index keeps that cheap)."""
    revocation_reason: Mapped[str | None] = mapped_column(String(200))
    renewed_from: Mapped[str | None] = mapped_column(String(48), index=True)
    """The serial whose holder renewed into this one: revoking a serial revokes its
    descendants, so a stolen key cannot outlive its revocation by renewing itself."""
    issued_at: Mapped[datetime | None]
    """When it was issued (notBefore is backdated, in whole seconds, and clamped to the
    intermediate's): a rotation request reaches the certificates issued before it.
    None: issued before migration 0004."""
    issuer_id: Mapped[str | None] = mapped_column(String(64), index=True)
    """The intermediate (ca_certificates.ca_id) that issued it. None: issued before
    migration 0005 (assigned to the imported intermediate at the first start)."""

    __table_args__ = (Index("ix_certificates_token_key", "token_id", "public_key_fingerprint"),)


class CACertificate(Base):
    """A root or intermediate of Muster's CA, past or present, shared by every replica.

    ``state``: ``prepared`` (a root in the trust bundle that does not issue yet, and
    its intermediate), ``active`` (the root and intermediate that issue), ``previous``
    (no longer issuing, still trusted while leaves depend on it) and ``retired``
    (out of the trust bundle). ``bundle_version`` is the trust bundle version at the
    row's last change: the bundle's version is the maximum over all rows.
    """

    __tablename__ = "ca_certificates"

    ca_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    """Lower-case hex SHA-256 of the certificate's DER, first 16 characters."""
    role: Mapped[str] = mapped_column(String(16))
    """``root`` or ``intermediate``."""
    state: Mapped[str] = mapped_column(String(16))
    parent_id: Mapped[str | None] = mapped_column(String(64))
    """An intermediate's root; None for a root."""
    certificate_pem: Mapped[bytes] = mapped_column(LargeBinary)
    key_ref: Mapped[str] = mapped_column(String(512))
    """Where the private key is: ``file:<name in the CA directory>`` or a ``pkcs11:``
    reference; never the key itself."""
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    bundle_version: Mapped[int] = mapped_column(BigInteger)


class BootstrapToken(Base):
    """A scoped enrollment credential; only the SHA-256 of its secret is stored."""

    __tablename__ = "bootstrap_tokens"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    pool: Mapped[str] = mapped_column(String(63))
    labels: Mapped[dict[str, str]]
    name_pattern: Mapped[str] = mapped_column(String(100))
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime]
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(100))
    deleted_at: Mapped[datetime | None]
    agent_id: Mapped[str | None] = mapped_column(String(63))
    """A re-enrollment token: it enrolls only this (existing) agent id, single-use."""


class Tenant(Base):
    """Who owns tasks, idempotency keys and budgets. API tokens belong to one; its name is
    unique and never reused, so a new token with an old token's name owns nothing old."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(100))


class ApiToken(Base):
    """A client credential for TaskService/AdminService; only its hash is stored."""

    __tablename__ = "api_tokens"

    token_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    """The tenant it belongs to (tenants.name)."""
    secret_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]


class Task(Base):
    """A task and its current attempt. ``(task_id, attempt)`` fences results."""

    __tablename__ = "tasks"

    task_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    pool: Mapped[str] = mapped_column(String(63))
    selector: Mapped[dict[str, str]]
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    max_attempts: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str] = mapped_column(String(100))
    """The tenant (tenants.name) that owns the task."""
    submitted_by: Mapped[str] = mapped_column(String(100), default="")
    """The API token name that submitted it."""
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    agent_id: Mapped[str | None] = mapped_column(String(63))
    session_id: Mapped[str | None] = mapped_column(String(40), index=True)
    lease_expires_at: Mapped[datetime | None]
    not_before: Mapped[datetime | None]
    """Earliest time a retry may be claimed (backoff)."""
    output: Mapped[bytes | None] = mapped_column(LargeBinary)
    error: Mapped[str] = mapped_column(Text, default="")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    schedule_to_start_timeout: Mapped[float | None] = mapped_column(Float)
    start_to_close_timeout: Mapped[float | None] = mapped_column(Float)
    deadline: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    queued_at: Mapped[datetime]
    """When the current attempt entered the queue: orders the queue, measures schedule-to-start."""
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    """Usage totals over every attempt (attempt_usage has each one)."""
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_creation_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reported_cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    model: Mapped[str | None] = mapped_column(String(100))
    """AI kinds: the model the payload names (budgets, provider back-off, metrics)."""
    reserve_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    """AI kinds: one attempt's worst-case cost, reserved at dispatch; 0: not budgeted."""
    max_cost_micros: Mapped[int | None] = mapped_column(BigInteger)
    """The task's own spend cap over all attempts (SubmitRequest.max_cost_usd)."""
    output_schema: Mapped[str | None] = mapped_column(Text)
    waiting_reason: Mapped[str] = mapped_column(Text, default="")
    """Why a QUEUED task was last held back at dispatch (budget, provider back-off)."""
    rate_limited: Mapped[int] = mapped_column(Integer, default=0)
    """Attempts the provider refused for its rate limit: not counted against max_attempts."""
    signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    """A signed task's envelope (a serialized TaskSignature), forwarded verbatim."""
    trace_context: Mapped[str | None] = mapped_column(String(600))
    """W3C Trace Context of the span that submitted it: ``traceparent``, then a space and
    ``tracestate`` if any (muster/tracing.py); NULL when it was not traced."""

    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_tasks_owner_idempotency_key"),
        Index("ix_tasks_queue", "state", "pool", "priority", "queued_at"),
        Index("ix_tasks_created", "created_at"),
    )


class AttemptUsage(Base):
    """What one attempt consumed, as the agent reported it and the server priced it."""

    __tablename__ = "attempt_usage"

    task_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(63))
    model: Mapped[str] = mapped_column(String(100), default="")
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_creation_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_creation_1h_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    reported_cost_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    recorded_at: Mapped[datetime]


class Budget(Base):
    """A spend limit on a scope ("global", "tenant:<name>", "pool:<name>"). The running
    totals live in the quota store (Redis); the definition lives here."""

    __tablename__ = "budgets"

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)
    limit_micros: Mapped[int] = mapped_column(BigInteger)
    period: Mapped[str] = mapped_column(String(8))
    updated_at: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(100))


class PoolSettings(Base):
    """Per-pool settings; today the models AI tasks in the pool may name (empty: any priced)."""

    __tablename__ = "pool_settings"

    pool: Mapped[str] = mapped_column(String(63), primary_key=True)
    allowed_models: Mapped[list[str]] = mapped_column(JSON)
    updated_at: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(100))


class AuditEvent(Base):
    """One row of the append-only audit trail. Details never hold secrets.

    Rows form hash chains (one per replica): ``hash`` covers the row's content and
    ``prev_hash``, the ``hash`` of the row before it in the same ``chain`` (``seq`` - 1).
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    event_id: Mapped[str] = mapped_column(String(32), unique=True)
    """Random id given when the event happened; makes replays from the spool idempotent."""
    chain: Mapped[str] = mapped_column(String(100))
    seq: Mapped[int] = mapped_column(BigInteger)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    time: Mapped[datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(200), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(200))
    outcome: Mapped[str] = mapped_column(String(16))
    peer: Mapped[str] = mapped_column(String(100))
    request_id: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (UniqueConstraint("chain", "seq", name="uq_audit_events_chain_seq"),)
