"""The one place that turns protobuf messages into SDK types and Python values into protobuf."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from muster._types import (
    Agent,
    ApiToken,
    AttemptUsage,
    AuditEvent,
    BootstrapToken,
    Budget,
    Certificate,
    PoolSettings,
    Role,
    Task,
    TaskState,
    Tenant,
    TokenStatus,
    Usage,
    WaitingReason,
)
from muster.errors import InvalidArgumentError, MusterError
from muster.money import MICROS_PER_USD
from muster.v1 import admin_pb2, common_pb2

Payload = bytes | str | Mapping[str, Any] | list[Any] | None
"""What ``submit`` accepts: bytes as is, text as UTF-8, a dict or list as compact JSON."""

Seconds = timedelta | float | int
"""A duration as a timedelta or a number of seconds."""


def _time(msg: Message, name: str) -> datetime | None:
    if not msg.HasField(name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, name)
    return ts.ToDatetime(tzinfo=UTC)


def _duration(msg: Message, name: str) -> timedelta | None:
    if not msg.HasField(name):
        return None
    d: duration_pb2.Duration = getattr(msg, name)
    value = d.ToTimedelta()
    return value if value else None


def task_from_proto(msg: common_pb2.Task, *, submit_warning: str = "") -> Task:
    try:
        state = TaskState(msg.state)
    except ValueError:
        raise MusterError(
            f"task {msg.task_id!r} has a state this SDK does not know ({msg.state}); upgrade muster"
        ) from None
    usage = msg.usage if msg.HasField("usage") else None
    return Task(
        task_id=msg.task_id,
        kind=msg.kind,
        state=state,
        payload=msg.payload,
        pool=msg.pool,
        selector=dict(msg.selector),
        priority=msg.priority,
        attempt=msg.attempt,
        max_attempts=msg.max_attempts,
        owner=msg.owner,
        idempotency_key=msg.idempotency_key,
        agent_id=msg.agent_id,
        output=msg.output,
        error=msg.error,
        cancel_requested=msg.cancel_requested,
        schedule_to_start_timeout=_duration(msg, "schedule_to_start_timeout"),
        start_to_close_timeout=_duration(msg, "start_to_close_timeout"),
        deadline=_time(msg, "deadline"),
        created_at=_time(msg, "created_at"),
        updated_at=_time(msg, "updated_at"),
        started_at=_time(msg, "started_at"),
        finished_at=_time(msg, "finished_at"),
        usage=usage_from_proto(usage) if usage is not None else None,
        waiting_reason=msg.waiting_reason,
        submitted_by=msg.submitted_by,
        max_cost_micros=msg.max_cost_micros,
        attempt_usage=tuple(
            AttemptUsage(a.attempt, a.agent_id, usage_from_proto(a.usage))
            for a in msg.attempt_usage
        ),
        output_schema=msg.output_schema,
        waiting_reason_code=WaitingReason.of(msg.waiting_reason_code),
        waiting_until=_time(msg, "waiting_until"),
        submit_warning=submit_warning,
        signed_by=msg.signature.key_id if msg.HasField("signature") else "",
        trace_id=msg.trace_id,
    )


def usage_from_proto(msg: common_pb2.Usage) -> Usage:
    return Usage(
        input_tokens=msg.input_tokens,
        output_tokens=msg.output_tokens,
        cost_micros=msg.cost_micros,
        model=msg.model,
        cache_creation_input_tokens=msg.cache_creation_input_tokens,
        cache_read_input_tokens=msg.cache_read_input_tokens,
        cache_creation_1h_input_tokens=msg.cache_creation_1h_input_tokens,
        reported_cost_micros=msg.reported_cost_micros,
    )


def bootstrap_token_from_proto(msg: admin_pb2.BootstrapToken) -> BootstrapToken:
    return BootstrapToken(
        token_id=msg.token_id,
        pool=msg.pool,
        labels=dict(msg.labels),
        name_pattern=msg.name_pattern,
        max_uses=msg.max_uses,
        uses=msg.uses,
        expires_at=_time(msg, "expires_at"),
        created_at=_time(msg, "created_at"),
        created_by=msg.created_by,
        deleted=msg.deleted,
        reenroll_agent_id=msg.reenroll_agent_id,
        status=TokenStatus.of(msg.status),
    )


def api_token_from_proto(msg: admin_pb2.ApiToken) -> ApiToken:
    try:
        role: Role | None = Role(msg.role)
    except ValueError:
        role = None
    return ApiToken(
        token_id=msg.token_id,
        name=msg.name,
        role=role,
        created_at=_time(msg, "created_at"),
        expires_at=_time(msg, "expires_at"),
        deleted=msg.deleted,
        tenant=msg.tenant,
        status=TokenStatus.of(msg.status),
    )


def tenant_from_proto(msg: admin_pb2.Tenant) -> Tenant:
    return Tenant(name=msg.name, created_at=_time(msg, "created_at"), tokens=msg.tokens)


def budget_from_proto(msg: admin_pb2.Budget) -> Budget:
    return Budget(
        scope=msg.scope,
        limit_micros=msg.limit_micros,
        period=msg.period,
        spent_micros=msg.spent_micros,
        reserved_micros=msg.reserved_micros,
        period_start=_time(msg, "period_start"),
        period_end=_time(msg, "period_end"),
        updated_at=_time(msg, "updated_at"),
        updated_by=msg.updated_by,
    )


def pool_settings_from_proto(msg: admin_pb2.PoolSettings) -> PoolSettings:
    return PoolSettings(
        pool=msg.pool,
        allowed_models=tuple(msg.allowed_models),
        updated_at=_time(msg, "updated_at"),
        updated_by=msg.updated_by,
    )


def certificate_from_proto(msg: admin_pb2.Certificate) -> Certificate:
    return Certificate(
        serial=msg.serial,
        agent_id=msg.agent_id,
        not_before=_time(msg, "not_before"),
        not_after=_time(msg, "not_after"),
        revoked=msg.revoked,
        revoked_at=_time(msg, "revoked_at"),
        renewed_from=msg.renewed_from,
        reason=msg.reason,
    )


def agent_from_proto(msg: admin_pb2.Agent) -> Agent:
    return Agent(
        agent_id=msg.agent_id,
        spiffe_id=msg.spiffe_id,
        pool=msg.pool,
        labels=dict(msg.labels),
        enabled=msg.enabled,
        connected=msg.connected,
        enrolled_at=_time(msg, "enrolled_at"),
        last_seen_at=_time(msg, "last_seen_at"),
        token_id=msg.token_id,
        certificates=tuple(certificate_from_proto(c) for c in msg.certificates),
        replica=msg.replica,
        capabilities=tuple(msg.capabilities),
        max_concurrency=msg.max_concurrency,
        in_flight=msg.in_flight,
        certificate_expires_at=_time(msg, "certificate_expires_at"),
        connected_at=_time(msg, "connected_at"),
        removed=msg.removed,
        removed_at=_time(msg, "removed_at"),
        rotate_requested_at=_time(msg, "rotate_requested_at"),
    )


def audit_event_from_proto(msg: admin_pb2.AuditEvent) -> AuditEvent:
    return AuditEvent(
        id=msg.id,
        time=_time(msg, "time"),
        actor=msg.actor,
        action=msg.action,
        target=msg.target,
        outcome=msg.outcome,
        peer=msg.peer,
        request_id=msg.request_id,
        details=msg.details,
    )


def encode_payload(payload: Payload) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(f"payload: not JSON-serialisable: {err}") from err


def usd_to_micros(value: float, name: str) -> int:
    """US dollars as whole micro-dollars (rounded to nearest); refuses NaN and infinities,
    which have no integer to stand for."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name}: must be a finite number of US dollars")
    return round(value * MICROS_PER_USD)


def encode_schema(schema: str | Mapping[str, Any] | None) -> str:
    """An output schema as JSON text: text is sent as given (the server checks it), a
    mapping as compact JSON."""
    if schema is None:
        return ""
    if isinstance(schema, str):
        return schema
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(f"output_schema: not JSON-serialisable: {err}") from err


def to_duration(value: Seconds, name: str) -> duration_pb2.Duration:
    delta = value if isinstance(value, timedelta) else timedelta(seconds=value)
    if delta <= timedelta(0):
        raise InvalidArgumentError(f"{name}: must be positive")
    out = duration_pb2.Duration()
    out.FromTimedelta(delta)
    return out


def to_timestamp(value: datetime, name: str) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidArgumentError(f"{name}: must be a timezone-aware datetime")
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value.astimezone(UTC))
    return out
