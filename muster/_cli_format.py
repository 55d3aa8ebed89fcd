"""Rendering SDK results for a terminal: compact tables, key/value blocks and JSON.

Everything a table or a key/value block shows passes through
:func:`muster.sanitize.neutralize`: task output, errors and waiting reasons come from
agents (and models), and even names the server checked are cheaper to escape than to
reason about. JSON output is escaped by ``json.dumps`` instead.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from muster._types import (
    Budget,
    PoolSettings,
    Task,
    TaskState,
    TokenStatus,
    Usage,
    WaitingReason,
)
from muster.money import format_usd
from muster.sanitize import neutralize


def format_time(value: datetime | None) -> str:
    """UTC, to the second, ``Z``-suffixed; ``-`` when unset."""
    if value is None:
        return "-"
    return value.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def format_labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def key_values(pairs: Sequence[tuple[str, str]], *, indent: str = "") -> str:
    """``key: value`` lines with the values aligned; values are neutralised (a value
    may span lines: its line breaks are kept and its later lines indented)."""
    width = max(len(k) for k, _ in pairs) + 1
    pad = "\n" + indent + " " * (width + 1)
    return "\n".join(
        f"{indent}{(k + ':').ljust(width)} {neutralize(v).replace(chr(10), pad)}" for k, v in pairs
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, indent: str = "") -> str:
    """Left-aligned columns two spaces apart, like ``kubectl get``; cells are neutralised
    to one line each, so no cell can forge a row or move the cursor."""
    rows = [[neutralize(cell, single_line=True) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        indent + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if isinstance(item, bytes):
                # Text stays readable (``jq -r .output``); anything else goes as base64.
                try:
                    out[f.name] = item.decode("utf-8")
                except UnicodeDecodeError:
                    out[f.name + "_base64"] = base64.b64encode(item).decode("ascii")
            else:
                out[f.name] = _jsonable(item)
        return out
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, datetime):
        return format_time(value) if value.microsecond == 0 else value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def to_json(value: Any) -> str:
    """SDK dataclasses (or lists of them) as JSON text."""
    return json.dumps(_jsonable(value), indent=2, ensure_ascii=False)


def waiting_text(task: Task) -> str:
    """``<reason>[ until <time>] [<code>]``: why a queued task waits, in words and as the
    code scripts can match (a server too old to send a code sends none)."""
    text = task.waiting_reason or "-"
    if task.waiting_until is not None and "until" not in text:
        text += f" until {format_time(task.waiting_until)}"
    code = task.waiting_reason_code
    return f"{text} [{code}]" if code is not WaitingReason.NONE else text


def token_status(status: TokenStatus | None, deleted: bool) -> str:
    """A token's status for a table; from ``deleted`` alone when the server sent none."""
    if status is not None:
        return str(status)
    return "deleted" if deleted else "active"


def task_row(task: Task) -> list[str]:
    return [
        task.task_id,
        task.kind,
        task.pool,
        task.state.name,
        f"{task.attempt}/{task.max_attempts}",
        task.agent_id or "-",
        format_time(task.created_at),
    ]


TASK_HEADERS = ("TASK_ID", "KIND", "POOL", "STATE", "ATTEMPT", "AGENT", "CREATED")


def format_usage(usage: Usage) -> str:
    """One line: the model, tokens by type, and the cost the server computed."""
    parts = [usage.model or "-", f"input={usage.input_tokens}", f"output={usage.output_tokens}"]
    if usage.cache_creation_input_tokens:
        write = f"cache_write={usage.cache_creation_input_tokens}"
        if usage.cache_creation_1h_input_tokens:
            write += f" (1h={usage.cache_creation_1h_input_tokens})"
        parts.append(write)
    if usage.cache_read_input_tokens:
        parts.append(f"cache_read={usage.cache_read_input_tokens}")
    parts.append(f"cost={format_usd(usage.cost_micros)} USD")
    if usage.reported_cost_micros:
        parts.append(f"(tool reported {format_usd(usage.reported_cost_micros)} USD)")
    return " ".join(parts)


def _has_usage(usage: Usage | None) -> bool:
    return usage is not None and bool(
        usage.total_tokens or usage.cost_micros or usage.model or usage.reported_cost_micros
    )


def task_details(task: Task) -> str:
    """A ``key: value`` block for ``muster task get``; every value is neutralised."""
    pairs: list[tuple[str, str]] = [
        ("task_id", task.task_id),
        ("kind", task.kind),
        ("state", task.state.name + (" (cancel requested)" if task.cancel_requested else "")),
    ]
    if task.state is TaskState.QUEUED and (task.waiting_reason or task.waiting_reason_code):
        pairs.append(("waiting", waiting_text(task)))
    pairs += [
        ("pool", task.pool),
        ("selector", format_labels(task.selector)),
        ("priority", str(task.priority)),
        ("attempt", f"{task.attempt}/{task.max_attempts}"),
        ("owner", task.owner or "-"),
        ("submitted_by", task.submitted_by or "-"),
        ("agent", task.agent_id or "-"),
        ("created", format_time(task.created_at)),
        ("started", format_time(task.started_at)),
        ("finished", format_time(task.finished_at)),
    ]
    if task.signed:
        pairs.append(("signature", f"signed by {task.signed_by}"))
    if task.idempotency_key:
        pairs.append(("idempotency_key", task.idempotency_key))
    if task.trace_id:
        pairs.append(("trace_id", task.trace_id))
    if task.max_cost_micros:
        pairs.append(("max_cost", f"{format_usd(task.max_cost_micros)} USD"))
    if _has_usage(task.usage):
        assert task.usage is not None
        pairs.append(("usage", format_usage(task.usage)))
    for attempt in task.attempt_usage:
        agent = f" on {attempt.agent_id}" if attempt.agent_id else ""
        pairs.append((f"attempt {attempt.attempt}", format_usage(attempt.usage) + agent))
    if task.output_schema:
        pairs.append(("output_schema", " ".join(task.output_schema.split())))
    if task.error:
        pairs.append(("error", task.error))
    if task.output:
        # Its final line break would only print an empty, indented line.
        pairs.append(("output", task.output_text.removesuffix("\n")))
    return key_values(pairs)


BUDGET_HEADERS = ("SCOPE", "LIMIT_USD", "SPENT_USD", "RESERVED_USD", "LEFT_USD", "PERIOD", "ENDS")


def budget_row(budget: Budget) -> list[str]:
    return [
        budget.scope,
        format_usd(budget.limit_micros),
        format_usd(budget.spent_micros),
        format_usd(budget.reserved_micros),
        format_usd(budget.left_micros),
        budget.period,
        format_time(budget.period_end),
    ]


def budget_details(budget: Budget) -> str:
    """``muster budget get``: the limit, what the current period used, and its window."""
    window = (
        f"{format_time(budget.period_start)} to {format_time(budget.period_end)}"
        if budget.period_start is not None or budget.period_end is not None
        else "all time"
    )
    return key_values(
        [
            ("scope", budget.scope),
            ("limit", f"{format_usd(budget.limit_micros)} USD per {budget.period}"),
            ("spent", f"{format_usd(budget.spent_micros)} USD"),
            ("reserved", f"{format_usd(budget.reserved_micros)} USD"),
            ("left", f"{format_usd(budget.left_micros)} USD"),
            ("period", f"{budget.period} ({window})"),
            ("updated", f"{format_time(budget.updated_at)} by {budget.updated_by or '-'}"),
        ]
    )


def format_models(settings: PoolSettings) -> str:
    return ",".join(settings.allowed_models) or "any priced model"


def pool_details(settings: PoolSettings) -> str:
    updated = (
        f"{format_time(settings.updated_at)} by {settings.updated_by or '-'}"
        if settings.updated_at is not None
        else "never (defaults)"
    )
    return key_values(
        [("pool", settings.pool), ("models", format_models(settings)), ("updated", updated)]
    )
