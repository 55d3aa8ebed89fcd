"""``muster submit-many``'s input: JSON lines, one task per line, with keys named like
``muster submit``'s options (``max_attempts`` or ``max-attempts``). A line that cannot
be a task is refused alone, with its line number; the other lines still go."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from muster._types import TaskSpec
from muster.durations import parse_duration, parse_time
from muster.signing import TaskSigner

KEYS = (
    "kind",
    "payload",
    "pool",
    "selector",
    "priority",
    "max_attempts",
    "idempotency_key",
    "schedule_to_start_timeout",
    "start_to_close_timeout",
    "deadline",
    "max_cost_usd",
    "output_schema",
)
ALIASES = {"labels": "selector"}


class LineError(ValueError):
    """Why one input line is not a task."""


@dataclass(frozen=True, slots=True)
class Line:
    """One non-blank input line: its number (from 1) and its task, or why it is none."""

    number: int
    spec: TaskSpec | None = None
    error: LineError | None = None


def read_lines(lines: Iterable[bytes], signer: TaskSigner | None = None) -> Iterator[Line]:
    """Each non-blank line of ``lines`` (raw bytes, as read from a file), parsed."""
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield Line(number, error=LineError("not UTF-8 text"))
            continue
        if not text.strip():
            continue
        try:
            yield Line(number, spec=parse_line(text, signer))
        except LineError as err:
            yield Line(number, error=err)


def parse_line(text: str, signer: TaskSigner | None = None) -> TaskSpec:
    """The task one JSON line describes; LineError saying what is wrong otherwise."""
    try:
        given = json.loads(text)
    except json.JSONDecodeError as err:
        raise LineError(f"not JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(given, dict):
        raise LineError('expected a JSON object, e.g. {"kind": "echo", "payload": {}}')
    fields: dict[str, Any] = {}
    for raw_key, value in given.items():
        key = raw_key.replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in KEYS:
            raise LineError(f"unknown key {raw_key!r} (known: {', '.join(KEYS)}, labels)")
        if key in fields:
            raise LineError(f"{key!r} given twice")
        fields[key] = value
    kind = fields.get("kind")
    if not isinstance(kind, str) or not kind:
        raise LineError('kind: required, a string such as "echo"')
    return TaskSpec(
        kind=kind,
        payload=_payload(fields.get("payload")),
        pool=_text(fields, "pool") or "default",
        selector=_selector(fields.get("selector")),
        priority=_int(fields, "priority") or 0,
        max_attempts=_int(fields, "max_attempts"),
        idempotency_key=_text(fields, "idempotency_key"),
        schedule_to_start_timeout=_seconds(fields, "schedule_to_start_timeout"),
        start_to_close_timeout=_seconds(fields, "start_to_close_timeout"),
        deadline=_deadline(fields.get("deadline")),
        max_cost_usd=_usd(fields.get("max_cost_usd")),
        output_schema=_schema(fields.get("output_schema")),
        signer=signer,
    )


def _payload(value: Any) -> bytes | None:
    """A string is sent as given (as ``--payload``); any other JSON value as compact JSON."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _text(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key)
    if value is None or isinstance(value, str):
        return value
    raise LineError(f"{key}: expected a string, got {json.dumps(value)[:40]}")


def _int(fields: Mapping[str, Any], key: str) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise LineError(f"{key}: expected a whole number, got {json.dumps(value)[:40]}")
    if key == "max_attempts" and value < 1:
        raise LineError(f"max_attempts: must be at least 1, got {value}")
    return value


def _selector(value: Any) -> dict[str, str] | None:
    """An object of strings, or a list of ``"K=V"`` as ``--selector`` takes them."""
    if value is None:
        return None
    if isinstance(value, list):
        pairs = {}
        for entry in value:
            key, sep, label = entry.partition("=") if isinstance(entry, str) else ("", "", "")
            if not sep or not key:
                raise LineError(f'selector: expected "key=value", got {json.dumps(entry)[:40]}')
            pairs[key] = label
        return pairs
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return dict(value)
    raise LineError('selector: expected an object of strings or a list of "key=value"')


def _seconds(fields: Mapping[str, Any], key: str) -> float | None:
    """Seconds as a number, or a duration as ``muster submit`` takes it (``90s``, ``2h``)."""
    value = fields.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            seconds = parse_duration(value).total_seconds()
        except ValueError as err:
            raise LineError(f"{key}: {err}") from None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise LineError(f'{key}: expected seconds or a duration such as "30s"')
    if not math.isfinite(seconds) or seconds <= 0:
        raise LineError(f"{key}: must be positive")
    return seconds


def _deadline(value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise LineError("deadline: expected an ISO 8601 time with a zone")
    try:
        return parse_time(value)
    except ValueError as err:
        raise LineError(f"deadline: {err}") from None


def _usd(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise LineError("max_cost_usd: expected a positive number of US dollars")
    return float(value)


def _schema(value: Any) -> str | None:
    """A JSON Schema as an object, or as JSON text (the server checks it)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    raise LineError("output_schema: expected a JSON Schema object")
