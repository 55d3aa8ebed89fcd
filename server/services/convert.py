"""Rows to protocol messages, in one place."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from muster import tracing
from muster.server.quotas import BudgetUsage
from muster.server.services.waiting import NOTHING, Waiting, held_back_code
from muster.server.storage import models
from muster.server.storage.presence import LiveSession
from muster.states import State
from muster.v1 import admin_pb2, common_pb2

_ROLES = {
    "submitter": admin_pb2.ROLE_SUBMITTER,
    "admin": admin_pb2.ROLE_ADMIN,
    "viewer": admin_pb2.ROLE_VIEWER,
}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def duration(seconds: float | timedelta | None) -> Duration | None:
    if seconds is None:
        return None
    d = Duration()
    d.FromTimedelta(seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds))
    return d


def task_state(state: str) -> common_pb2.TaskState:
    # protoc's stubs type enum values as plain int; State.number is a TaskState value.
    return cast(common_pb2.TaskState, State(state).number)


def task(
    row: models.Task,
    attempts: Iterable[models.AttemptUsage] = (),
    waiting: Waiting | None = None,
) -> common_pb2.Task:
    """A task as the API shows it; ``attempts``: its per-attempt usage rows, if loaded;
    ``waiting``: why it waits (services/waiting.py), if worked out; else what dispatch
    last recorded."""
    if row.state != State.QUEUED:
        waiting = NOTHING
    elif waiting is None:
        waiting = Waiting(held_back_code(row.waiting_reason), row.waiting_reason)
    return common_pb2.Task(
        task_id=row.task_id,
        kind=row.kind,
        payload=row.payload,
        pool=row.pool,
        selector=row.selector or {},
        priority=row.priority,
        state=task_state(row.state),
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        owner=row.owner,
        idempotency_key=row.idempotency_key or "",
        agent_id=row.agent_id or "",
        output=row.output or b"",
        error=row.error,
        cancel_requested=row.cancel_requested,
        schedule_to_start_timeout=duration(row.schedule_to_start_timeout),
        start_to_close_timeout=duration(row.start_to_close_timeout),
        deadline=timestamp(row.deadline),
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        started_at=timestamp(row.started_at),
        finished_at=timestamp(row.finished_at),
        usage=common_pb2.Usage(
            input_tokens=row.input_tokens,
            output_tokens=row.output_tokens,
            cost_micros=row.cost_micros,
            model=row.model or "",
            cache_creation_input_tokens=row.cache_creation_tokens,
            cache_read_input_tokens=row.cache_read_tokens,
            reported_cost_micros=row.reported_cost_micros,
        ),
        waiting_reason=waiting.text,
        waiting_reason_code=waiting.code,
        waiting_until=timestamp(waiting.until),
        submitted_by=row.submitted_by,
        max_cost_micros=row.max_cost_micros or 0,
        output_schema=row.output_schema or "",
        signature=_signature(row.signature),
        trace_id=tracing.trace_id_of(row.trace_context),
        attempt_usage=[
            common_pb2.AttemptUsage(
                attempt=u.attempt,
                agent_id=u.agent_id,
                usage=common_pb2.Usage(
                    model=u.model,
                    input_tokens=u.input_tokens,
                    output_tokens=u.output_tokens,
                    cache_creation_input_tokens=u.cache_creation_tokens,
                    cache_creation_1h_input_tokens=u.cache_creation_1h_tokens,
                    cache_read_input_tokens=u.cache_read_tokens,
                    cost_micros=u.cost_micros,
                    reported_cost_micros=u.reported_cost_micros,
                ),
            )
            for u in attempts
        ],
    )


def _signature(envelope: bytes | None) -> common_pb2.TaskSignature | None:
    """A signed task's envelope as stored (None when unsigned, or unreadable: a row
    altered in the database)."""
    if not envelope:
        return None
    try:
        return common_pb2.TaskSignature.FromString(envelope)
    except DecodeError:
        return None


def bootstrap_token_status(row: models.BootstrapToken, now: datetime) -> admin_pb2.TokenStatus:
    """Deleted, else expired, else used up, else active (TokenStatus in admin.proto)."""
    if row.deleted_at is not None:
        return admin_pb2.TOKEN_STATUS_DELETED
    if row.expires_at <= now:
        return admin_pb2.TOKEN_STATUS_EXPIRED
    if row.uses >= row.max_uses:
        return admin_pb2.TOKEN_STATUS_USED_UP
    return admin_pb2.TOKEN_STATUS_ACTIVE


def api_token_status(row: models.ApiToken, now: datetime) -> admin_pb2.TokenStatus:
    """Deleted, else expired, else active (TokenStatus in admin.proto)."""
    if row.deleted_at is not None:
        return admin_pb2.TOKEN_STATUS_DELETED
    if row.expires_at is not None and row.expires_at <= now:
        return admin_pb2.TOKEN_STATUS_EXPIRED
    return admin_pb2.TOKEN_STATUS_ACTIVE


def bootstrap_token(
    row: models.BootstrapToken, now: datetime | None = None
) -> admin_pb2.BootstrapToken:
    return admin_pb2.BootstrapToken(
        token_id=row.token_id,
        pool=row.pool,
        labels=row.labels,
        name_pattern=row.name_pattern,
        max_uses=row.max_uses,
        uses=row.uses,
        expires_at=timestamp(row.expires_at),
        created_at=timestamp(row.created_at),
        created_by=row.created_by,
        deleted=row.deleted_at is not None,
        status=bootstrap_token_status(row, now or datetime.now(UTC)),
        reenroll_agent_id=row.agent_id or "",
    )


def api_token(row: models.ApiToken, now: datetime | None = None) -> admin_pb2.ApiToken:
    return admin_pb2.ApiToken(
        token_id=row.token_id,
        name=row.name,
        tenant=row.tenant,
        role=_ROLES.get(row.role, admin_pb2.ROLE_UNSPECIFIED),
        created_at=timestamp(row.created_at),
        expires_at=timestamp(row.expires_at),
        deleted=row.deleted_at is not None,
        status=api_token_status(row, now or datetime.now(UTC)),
    )


def role_name(role: admin_pb2.Role) -> str | None:
    return next((name for name, value in _ROLES.items() if value == role), None)


def certificate(row: models.Certificate) -> admin_pb2.Certificate:
    return admin_pb2.Certificate(
        serial=row.serial,
        agent_id=row.agent_id,
        not_before=timestamp(row.not_before),
        not_after=timestamp(row.not_after),
        revoked=row.revoked_at is not None,
        revoked_at=timestamp(row.revoked_at),
        renewed_from=row.renewed_from or "",
        reason=row.reason,
    )


@dataclass(frozen=True, slots=True)
class AgentPresence:
    """What the cluster knows of an agent's streams (storage/presence.py)."""

    stream: LiveSession | None = None
    """Its newest live stream; None when not connected."""
    in_flight: int = 0


def agent(
    row: models.Agent,
    certificates: list[models.Certificate],
    *,
    spiffe_id: str,
    presence: AgentPresence,
) -> admin_pb2.Agent:
    stream = presence.stream
    live_certs = [c.not_after for c in certificates if c.revoked_at is None]
    expires = stream.cert_not_after if stream is not None else max(live_certs, default=None)
    kinds = stream.capabilities if stream is not None else (row.capabilities or ())
    return admin_pb2.Agent(
        agent_id=row.agent_id,
        spiffe_id=spiffe_id,
        pool=row.pool,
        labels=row.labels,
        enabled=row.enabled,
        connected=stream is not None,
        enrolled_at=timestamp(row.enrolled_at),
        last_seen_at=timestamp(row.last_seen_at),
        token_id=row.token_id,
        certificates=[certificate(c) for c in certificates],
        replica=stream.replica if stream is not None else "",
        capabilities=list(kinds),
        max_concurrency=(
            stream.max_concurrency if stream is not None else (row.max_concurrency or 0)
        ),
        in_flight=presence.in_flight,
        certificate_expires_at=timestamp(expires),
        connected_at=timestamp(stream.connected_at if stream is not None else None),
        removed=row.removed_at is not None,
        removed_at=timestamp(row.removed_at),
        rotate_requested_at=timestamp(row.rotate_requested_at),
    )


def audit_event(row: models.AuditEvent) -> admin_pb2.AuditEvent:
    return admin_pb2.AuditEvent(
        id=row.id,
        time=timestamp(row.time),
        actor=row.actor,
        action=row.action,
        target=row.target,
        outcome=row.outcome,
        peer=row.peer,
        request_id=row.request_id,
        details=json.dumps(row.details, sort_keys=True),
    )


def tenant(row: models.Tenant, live_tokens: int) -> admin_pb2.Tenant:
    return admin_pb2.Tenant(name=row.name, created_at=timestamp(row.created_at), tokens=live_tokens)


def budget(
    row: models.Budget,
    usage: BudgetUsage,
    window: tuple[datetime | None, datetime | None],
) -> admin_pb2.Budget:
    """A budget's definition with its current period's figures (from the quota store)."""
    start, end = window
    return admin_pb2.Budget(
        scope=row.scope,
        limit_micros=row.limit_micros,
        period=row.period,
        spent_micros=usage.spent,
        reserved_micros=usage.reserved,
        period_start=timestamp(start),
        period_end=timestamp(end),
        updated_at=timestamp(row.updated_at),
        updated_by=row.updated_by,
    )


def pool_settings(row: models.PoolSettings) -> admin_pb2.PoolSettings:
    return admin_pb2.PoolSettings(
        pool=row.pool,
        allowed_models=list(row.allowed_models),
        updated_at=timestamp(row.updated_at),
        updated_by=row.updated_by,
    )
