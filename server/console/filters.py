"""The query strings of the list pages, checked before anything is read: a filter that
is not understood is a 400 page saying what is accepted, never an empty list or a 500."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from multidict import MultiMapping

from muster.durations import parse_time
from muster.server.console.errors import bad_request
from muster.server.services.errors import ServiceError
from muster.server.services.validation import KIND, check_name, check_text
from muster.states import State

MAX_TASKS = 500
DEFAULT_TASKS = 50
MAX_AUDIT = 1000
DEFAULT_AUDIT = 100
MAX_TASK_ID = 128
_STATES = ", ".join(s.value.lower() for s in State)


@dataclass(frozen=True, slots=True)
class TaskFilter:
    states: tuple[State, ...] = ()
    kind: str = ""
    pool: str = ""
    tenant: str = ""
    limit: int = DEFAULT_TASKS
    before: tuple[datetime, str] | None = None
    """(created_at, task_id) of the previous page's last task."""


@dataclass(frozen=True, slots=True)
class AuditFilter:
    actor: str = ""
    action: str = ""
    since: datetime | None = None
    until: datetime | None = None
    limit: int = DEFAULT_AUDIT


def task_filter(query: MultiMapping[str]) -> TaskFilter:
    _known(query, ("state", "kind", "pool", "tenant", "limit", "before"))
    states = []
    for value in query.getall("state", []):
        if not value:
            continue  # the form's "any"
        try:
            states.append(State(value.strip().upper()))
        except ValueError:
            raise bad_request(
                f"state: {_shown(value)} is not a task state (one of: {_STATES})"
            ) from None
    kind = _one(query, "kind")
    pool = _one(query, "pool")
    tenant = _one(query, "tenant")
    try:
        if kind:
            check_name(kind, "kind", KIND)
        if pool:
            check_name(pool, "pool")
        if tenant:
            check_name(tenant, "tenant")
    except ServiceError as err:
        raise bad_request(err.message) from None
    before = _one(query, "before")
    return TaskFilter(
        states=tuple(dict.fromkeys(states)),
        kind=kind,
        pool=pool,
        tenant=tenant,
        limit=_limit(query, DEFAULT_TASKS, MAX_TASKS),
        before=decode_cursor(before) if before else None,
    )


def audit_filter(query: MultiMapping[str], now: datetime) -> AuditFilter:
    _known(query, ("actor", "action", "since", "until", "limit"))
    actor, action = _one(query, "actor"), _one(query, "action")
    try:
        check_text(actor, "actor", 200)
        check_text(action, "action", 200)
    except ServiceError as err:
        raise bad_request(err.message) from None
    return AuditFilter(
        actor=actor,
        action=action,
        since=_time(query, "since", now),
        until=_time(query, "until", now),
        limit=_limit(query, DEFAULT_AUDIT, MAX_AUDIT),
    )


def pool_filter(query: MultiMapping[str]) -> str:
    _known(query, ("pool",))
    pool = _one(query, "pool")
    if pool:
        try:
            check_name(pool, "pool")
        except ServiceError as err:
            raise bad_request(err.message) from None
    return pool


def task_id(value: str) -> str:
    """A task id from a URL path (an opaque string: no control characters)."""
    try:
        return check_text(value, "task id", MAX_TASK_ID)
    except ServiceError as err:
        raise bad_request(err.message) from None


def encode_cursor(created_at: datetime, task_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{task_id}".encode()).decode()


def decode_cursor(text: str) -> tuple[datetime, str]:
    refused = bad_request("before: not a page link from this console (go back to the first page)")
    if len(text) > 512:
        raise refused
    try:
        created, task = base64.urlsafe_b64decode(text.encode()).decode().split("|", 1)
        when = datetime.fromisoformat(created)
        check_text(task, "before", MAX_TASK_ID)
        if when.tzinfo is None:
            raise ValueError("naive")
        return when.astimezone(UTC), task
    except (ValueError, UnicodeDecodeError, OverflowError, ServiceError):
        raise refused from None


def _known(query: MultiMapping[str], names: Iterable[str]) -> None:
    allowed = tuple(names)
    for key in query:
        if key not in allowed:
            raise bad_request(
                f"unknown filter {_shown(key)} (this page takes: {', '.join(allowed)})"
            )


def _one(query: MultiMapping[str], name: str) -> str:
    values = query.getall(name, [])
    if len(values) > 1:
        raise bad_request(f"{name}: give it once")
    return values[0].strip() if values else ""


def _limit(query: MultiMapping[str], default: int, maximum: int) -> int:
    text = _one(query, "limit")
    if not text:
        return default
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise bad_request(f"limit: {_shown(text)} is not a number from 1 to {maximum}")
    return int(text)


def _time(query: MultiMapping[str], name: str, now: datetime) -> datetime | None:
    text = _one(query, name)
    if not text:
        return None
    try:
        when = parse_time(text, now=now)
        when.astimezone(UTC)
    except (ValueError, OverflowError) as err:
        raise bad_request(f"{name}: {err}") from None
    return when


def _shown(value: str) -> str:
    """A value quoted in a message, short and with control characters made visible."""
    return repr(value[:40])
