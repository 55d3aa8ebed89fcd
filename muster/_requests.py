"""Request building shared by the sync and asyncio clients, so both send the same messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc

from muster._convert import (
    Payload,
    Seconds,
    encode_payload,
    encode_schema,
    task_from_proto,
    to_duration,
    to_timestamp,
    usd_to_micros,
)
from muster._errors_map import _BY_CODE
from muster._types import Role, SubmitOutcome, TaskSpec, TaskState
from muster.errors import InvalidArgumentError, MusterError, QuotaExceededError
from muster.signing import TaskSigner
from muster.v1 import admin_pb2, task_pb2

MAX_PAGE_SIZE = 500
"""The server's cap on one List page; larger limits are fetched in several pages."""

DEFAULT_LIST_LIMIT = 100


def submit(
    kind: str,
    payload: Payload,
    *,
    pool: str,
    selector: Mapping[str, str] | None,
    priority: int,
    max_attempts: int | None,
    idempotency_key: str | None,
    schedule_to_start_timeout: Seconds | None,
    start_to_close_timeout: Seconds | None,
    deadline: datetime | None,
    max_cost_usd: float | None = None,
    output_schema: str | Mapping[str, Any] | None = None,
    signer: TaskSigner | None = None,
) -> task_pb2.SubmitRequest:
    # The server validates everything; the client only refuses what it cannot encode
    # faithfully (0 attempts, or a 0 cap, would read as "none given" on the wire).
    if max_attempts is not None and max_attempts < 1:
        raise InvalidArgumentError("max_attempts: must be at least 1")
    if max_cost_usd is not None and not usd_to_micros(max_cost_usd, "max_cost_usd") > 0:
        raise InvalidArgumentError("max_cost_usd: must be at least 0.000001 (None: no cap)")
    req = task_pb2.SubmitRequest(
        kind=kind,
        payload=encode_payload(payload),
        pool=pool,
        selector=dict(selector or {}),
        priority=priority,
        max_attempts=max_attempts or 0,
        idempotency_key=idempotency_key or "",
        max_cost_usd=max_cost_usd or 0.0,
        output_schema=encode_schema(output_schema),
    )
    if schedule_to_start_timeout is not None:
        req.schedule_to_start_timeout.CopyFrom(
            to_duration(schedule_to_start_timeout, "schedule_to_start_timeout")
        )
    if start_to_close_timeout is not None:
        req.start_to_close_timeout.CopyFrom(
            to_duration(start_to_close_timeout, "start_to_close_timeout")
        )
    if deadline is not None:
        req.deadline.CopyFrom(to_timestamp(deadline, "deadline"))
    if signer is not None:
        # Last: the signature covers the request as it will be sent.
        req.signature.CopyFrom(signer.sign(req))
    return req


MAX_SUBMIT_MANY = 1000
"""The server's cap on items per SubmitMany call (task.proto)."""
MAX_SUBMIT_MANY_BYTES = 3 << 20
"""Request bytes per SubmitMany call: the response carries each task back, payload
included, and must fit the client's 4 MiB receive cap (and the server's message cap)."""

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def submit_spec(spec: TaskSpec) -> task_pb2.SubmitRequest:
    """The SubmitRequest ``submit`` would send for these arguments."""
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"submit_many takes TaskSpec items, not {type(spec).__name__}")
    return submit(
        spec.kind,
        spec.payload,
        pool=spec.pool,
        selector=spec.selector,
        priority=spec.priority,
        max_attempts=spec.max_attempts,
        idempotency_key=spec.idempotency_key,
        schedule_to_start_timeout=spec.schedule_to_start_timeout,
        start_to_close_timeout=spec.start_to_close_timeout,
        deadline=spec.deadline,
        max_cost_usd=spec.max_cost_usd,
        output_schema=spec.output_schema,
        signer=spec.signer,
    )


@dataclass
class SubmitManyBatch:
    """One SubmitMany call and the positions of its items among all the items."""

    indexes: list[int] = field(default_factory=list)
    request: task_pb2.SubmitManyRequest = field(default_factory=task_pb2.SubmitManyRequest)
    size: int = 0


class SubmitMany:
    """The calls ``submit_many`` makes (at most 1,000 items and 3 MiB each), and the
    outcome of every item in the caller's order: an item the SDK cannot encode is
    refused here, alone, and never sent."""

    def __init__(self, items: Iterable[TaskSpec]) -> None:
        self._outcomes: list[SubmitOutcome | None] = []
        self.batches: list[SubmitManyBatch] = []
        for index, spec in enumerate(items):
            try:
                request = submit_spec(spec)
            except MusterError as err:
                self._outcomes.append(SubmitOutcome(error=err))
                continue
            self._outcomes.append(None)
            size = request.ByteSize() + 8  # the field's tag and length
            batch = self.batches[-1] if self.batches else None
            if (
                batch is None
                or len(batch.indexes) >= MAX_SUBMIT_MANY
                or batch.size + size > MAX_SUBMIT_MANY_BYTES
            ):
                batch = SubmitManyBatch()
                self.batches.append(batch)
            batch.indexes.append(index)
            batch.request.items.append(request)
            batch.size += size

    def settle(self, batch: SubmitManyBatch, response: task_pb2.SubmitManyResponse) -> None:
        """Record what the server answered for ``batch``."""
        if len(response.results) != len(batch.indexes):
            raise MusterError(
                f"the server answered {len(response.results)} results "
                f"for {len(batch.indexes)} items"
            )
        for index, result in zip(batch.indexes, response.results, strict=True):
            self._outcomes[index] = submit_outcome(result)

    def outcomes(self) -> list[SubmitOutcome]:
        """Every item's outcome, in order (once every batch is settled)."""
        done = [o for o in self._outcomes if o is not None]
        if len(done) != len(self._outcomes):
            raise RuntimeError("SubmitMany.outcomes() before every batch was settled")
        return done


def submit_outcome(result: task_pb2.SubmitManyResult) -> SubmitOutcome:
    if result.WhichOneof("outcome") == "response":
        response = result.response
        return SubmitOutcome(task=task_from_proto(response.task, submit_warning=response.warning))
    error = result.error
    code = _CODES.get(error.code)
    message = error.message or (code.name if code is not None else "refused")
    cls = _BY_CODE.get(code, MusterError) if code is not None else MusterError
    if cls is QuotaExceededError:
        retry_after = None
        if error.HasField("retry_after"):
            retry_after = error.retry_after.ToTimedelta().total_seconds()
        return SubmitOutcome(error=QuotaExceededError(message, retry_after=retry_after))
    return SubmitOutcome(error=cls(message))


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise InvalidArgumentError("limit: must be at least 1 (or None for all)")


def list_tasks(
    *,
    states: Iterable[TaskState | str] | None,
    pool: str | None,
    kind: str | None,
    remaining: int | None,
    page_token: str,
) -> task_pb2.ListTasksRequest:
    try:
        wire_states = [int(TaskState.parse(s)) for s in states or ()]
    except ValueError as err:
        raise InvalidArgumentError(f"states: {err}") from err
    page_size = MAX_PAGE_SIZE if remaining is None else min(remaining, MAX_PAGE_SIZE)
    return task_pb2.ListTasksRequest(
        states=wire_states,  # type: ignore[arg-type]  # the stub wants the proto enum type
        pool=pool or "",
        kind=kind or "",
        page_size=page_size,
        page_token=page_token,
    )


def create_bootstrap_token(
    pool: str,
    labels: Mapping[str, str] | None,
    ttl: Seconds | None,
    max_uses: int | None,
    name_pattern: str | None,
    reenroll: str | None = None,
) -> admin_pb2.CreateBootstrapTokenRequest:
    req = admin_pb2.CreateBootstrapTokenRequest(
        pool=pool,
        labels=dict(labels or {}),
        name_pattern=name_pattern or "",
        max_uses=max_uses or 0,
        reenroll_agent_id=reenroll or "",
    )
    if ttl is not None:
        req.ttl.CopyFrom(to_duration(ttl, "ttl"))
    return req


def create_api_token(
    name: str, role: Role | str, ttl: Seconds | None, tenant: str | None = None
) -> admin_pb2.CreateApiTokenRequest:
    try:
        wire_role = int(Role.parse(role))
    except ValueError as err:
        raise InvalidArgumentError(f"role: {err}") from err
    req = admin_pb2.CreateApiTokenRequest(
        name=name,
        role=wire_role,  # type: ignore[arg-type]
        tenant=tenant or "",
    )
    if ttl is not None:
        req.ttl.CopyFrom(to_duration(ttl, "ttl"))
    return req


def query_audit(
    actor: str | None,
    action: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int | None,
) -> admin_pb2.QueryAuditRequest:
    check_limit(limit)
    req = admin_pb2.QueryAuditRequest(actor=actor or "", action=action or "", limit=limit or 0)
    if since is not None:
        req.since.CopyFrom(to_timestamp(since, "since"))
    if until is not None:
        req.until.CopyFrom(to_timestamp(until, "until"))
    return req


def set_budget(scope: str, limit_usd: float, period: str | None) -> admin_pb2.SetBudgetRequest:
    limit = usd_to_micros(limit_usd, "limit_usd")
    if limit < 0:
        raise InvalidArgumentError("limit_usd: must be at least 0 (0 stops the scope's AI work)")
    return admin_pb2.SetBudgetRequest(scope=scope, limit_micros=limit, period=period or "")
