"""Messages as a person reads them: every value the templates show is made here, as
text (Jinja2 escapes it on the way out). Text that came from agents, executors or
models (outputs, errors, reasons, details) first goes through ``neutralize``, as in the
CLI, so control characters and bidi overrides show as visible escapes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message

from muster.money import format_usd
from muster.sanitize import neutralize
from muster.v1 import admin_pb2, common_pb2

MAX_SHOWN_BYTES = 64 * 1024
"""A payload or output is shown up to this much; the rest is counted, not sent."""
NONE = "—"


def when(message: Message, name: str) -> str:
    """A Timestamp field as ``2026-12-07 00:40:01Z``; a dash when unset."""
    if not message.HasField(name):
        return NONE
    value: datetime = getattr(message, name).ToDatetime(tzinfo=UTC)
    return value.strftime("%Y-%m-%d %H:%M:%SZ")


def moment(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value else NONE


def age(value: datetime | None, now: datetime) -> str:
    """How long ago, roughly: ``42s``, ``7m``, ``3h``, ``2d``."""
    if value is None:
        return NONE
    seconds = max(0, int((now - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def text(value: str) -> str:
    """Untrusted text shown as lines (an error, a reason)."""
    return neutralize(value)


def line(text: str) -> str:
    """Untrusted text for one table cell or line."""
    return neutralize(text, single_line=True)


def labels(values: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items())) or NONE


def state(value: int) -> str:
    name: str = common_pb2.TaskState.Name(value)
    return name.removeprefix("TASK_STATE_")


def content(data: bytes) -> dict[str, Any]:
    """A payload or an output: its size, and as much as is shown of it as text
    (not UTF-8: its bytes escaped). JSON is shown indented."""
    shown = data[:MAX_SHOWN_BYTES]
    text = shown.decode("utf-8", errors="backslashreplace")
    if len(shown) == len(data):
        with contextlib.suppress(ValueError):
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    return {
        "size": len(data),
        "text": neutralize(text),
        "cut": len(data) - len(shown),
    }


def usage(value: common_pb2.Usage) -> str:
    parts = []
    if value.model:
        parts.append(line(value.model))
    if value.input_tokens or value.output_tokens:
        parts.append(f"{value.input_tokens} in / {value.output_tokens} out tokens")
    if value.cache_read_input_tokens or value.cache_creation_input_tokens:
        parts.append(
            f"cache {value.cache_read_input_tokens} read / "
            f"{value.cache_creation_input_tokens} written"
        )
    if value.cost_micros:
        parts.append(f"{format_usd(value.cost_micros)} USD")
    if value.reported_cost_micros:
        parts.append(f"tool reported {format_usd(value.reported_cost_micros)} USD")
    return ", ".join(parts) or NONE


def agent_row(agent: admin_pb2.Agent) -> dict[str, str]:
    status = "removed" if agent.removed else ("enabled" if agent.enabled else "disabled")
    return {
        "agent_id": agent.agent_id,
        "pool": agent.pool,
        "labels": labels(agent.labels),
        "presence": "connected" if agent.connected else "offline",
        "replica": agent.replica or NONE,
        "kinds": ", ".join(agent.capabilities) or NONE,
        "load": f"{agent.in_flight}/{agent.max_concurrency}",
        "last_seen": when(agent, "last_seen_at"),
        "connected_at": when(agent, "connected_at"),
        "certificate_expires": when(agent, "certificate_expires_at"),
        "status": status,
        "enrolled": when(agent, "enrolled_at"),
        "spiffe_id": agent.spiffe_id,
    }


def certificate_row(cert: admin_pb2.Certificate) -> dict[str, str]:
    return {
        "serial": cert.serial,
        "reason": cert.reason,
        "not_before": when(cert, "not_before"),
        "not_after": when(cert, "not_after"),
        "revoked": when(cert, "revoked_at") if cert.revoked else "no",
        "renewed_from": cert.renewed_from or NONE,
    }


def task_row(task: common_pb2.Task) -> dict[str, str]:
    return {
        "task_id": task.task_id,
        "kind": task.kind,
        "pool": task.pool,
        "tenant": task.owner,
        "state": state(task.state),
        "attempt": f"{task.attempt}/{task.max_attempts}",
        "agent": task.agent_id or NONE,
        "created": when(task, "created_at"),
        "updated": when(task, "updated_at"),
        "waiting": line(task.waiting_reason),
        "cost": format_usd(task.usage.cost_micros) if task.usage.cost_micros else "",
    }


def task_fields(task: common_pb2.Task) -> list[tuple[str, str]]:
    """The task page's table: label, value."""
    fields = [
        ("state", state(task.state)),
        ("kind", task.kind),
        ("pool", task.pool),
        ("selector", labels(task.selector)),
        ("tenant", task.owner),
        ("submitted by", task.submitted_by or NONE),
        ("priority", str(task.priority)),
        ("attempt", f"{task.attempt} of {task.max_attempts}"),
        ("agent", task.agent_id or NONE),
        ("created", when(task, "created_at")),
        ("started", when(task, "started_at")),
        ("finished", when(task, "finished_at")),
        ("updated", when(task, "updated_at")),
        ("deadline", when(task, "deadline")),
        ("idempotency key", line(task.idempotency_key) or NONE),
        ("cancel requested", "yes" if task.cancel_requested else "no"),
        ("usage", usage(task.usage)),
        ("spend cap", f"{format_usd(task.max_cost_micros)} USD" if task.max_cost_micros else NONE),
        ("signed", task.signature.key_id if task.HasField("signature") else "no"),
        ("trace id", task.trace_id or NONE),
    ]
    if task.waiting_reason:
        fields.insert(1, ("waiting", line(task.waiting_reason)))
        if task.HasField("waiting_until"):
            fields.insert(2, ("waiting until", when(task, "waiting_until")))
    return fields


def attempt_rows(task: common_pb2.Task) -> list[dict[str, str]]:
    return [
        {"attempt": str(a.attempt), "agent": a.agent_id, "usage": usage(a.usage)}
        for a in task.attempt_usage
    ]


def audit_row(event: admin_pb2.AuditEvent) -> dict[str, str]:
    return {
        "time": when(event, "time"),
        "actor": line(event.actor),
        "action": line(event.action),
        "target": line(event.target),
        "outcome": event.outcome,
        "peer": line(event.peer),
        "details": line(_details(event.details)),
    }


def _details(text: str) -> str:
    """The details JSON as ``key=value`` pairs; as stored when it is not an object."""
    try:
        values = json.loads(text)
    except ValueError:
        return text
    if not isinstance(values, dict):
        return text
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in values.items())


def budget_row(budget: admin_pb2.Budget) -> dict[str, str]:
    left = budget.limit_micros - budget.spent_micros - budget.reserved_micros
    return {
        "scope": budget.scope,
        "limit": format_usd(budget.limit_micros),
        "spent": format_usd(budget.spent_micros),
        "reserved": format_usd(budget.reserved_micros),
        "left": format_usd(max(left, 0)),
        "period": budget.period,
        "window": f"{when(budget, 'period_start')} to {when(budget, 'period_end')}"
        if budget.HasField("period_start")
        else "forever",
        "updated": f"{when(budget, 'updated_at')} by {line(budget.updated_by)}",
        "exhausted": "yes" if left <= 0 else "",
    }
