"""Rendering SDK results for a terminal: compact tables, key/value blocks and JSON."""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from muster._types import Task


def format_time(value: datetime | None) -> str:
    """UTC, to the second, ``Z``-suffixed; ``-`` when unset."""
    if value is None:
        return "-"
    return value.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def format_labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, indent: str = "") -> str:
    """Left-aligned columns two spaces apart, like ``kubectl get``."""
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


def task_details(task: Task) -> str:
    """A ``key: value`` block for ``muster task get``."""
    pairs: list[tuple[str, str]] = [
        ("task_id", task.task_id),
        ("kind", task.kind),
        ("state", task.state.name + (" (cancel requested)" if task.cancel_requested else "")),
        ("pool", task.pool),
        ("selector", format_labels(task.selector)),
        ("priority", str(task.priority)),
        ("attempt", f"{task.attempt}/{task.max_attempts}"),
        ("owner", task.owner or "-"),
        ("agent", task.agent_id or "-"),
        ("created", format_time(task.created_at)),
        ("started", format_time(task.started_at)),
        ("finished", format_time(task.finished_at)),
    ]
    if task.idempotency_key:
        pairs.append(("idempotency_key", task.idempotency_key))
    if task.error:
        pairs.append(("error", task.error))
    if task.output:
        pairs.append(("output", task.output_text))
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in pairs)
