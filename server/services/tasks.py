"""TaskService: submit, read, list, cancel and watch tasks (bearer API token required)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from muster import tracing as muster_tracing
from muster.ai import AI_KINDS, PayloadError, parse_output_schema
from muster.server import tracing
from muster.server.config import ServerConfig
from muster.server.dispatch.dispatcher import Dispatcher
from muster.server.principals import current_principal
from muster.server.quotas import Quotas
from muster.server.services import convert, waiting
from muster.server.services.ai_submit import AiAdmission
from muster.server.services.context import peer_address, request_id
from muster.server.services.errors import ServiceError, invalid, not_found
from muster.server.services.submit_many import Refusal, submit_many
from muster.server.services.validation import (
    KIND,
    check_labels,
    check_name,
    check_text,
    duration,
    enum_value,
    timestamp,
)
from muster.server.storage import usage as usage_store
from muster.server.storage.models import Task
from muster.server.storage.types import utcnow
from muster.signing import EnvelopeError, check_submitted
from muster.states import TERMINAL, State
from muster.v1 import common_pb2, task_pb2, task_pb2_grpc

MAX_ATTEMPTS = 20
MAX_PRIORITY = 1000
DEFAULT_PAGE = 50
MAX_PAGE = 500
MAX_TIMEOUT = timedelta(days=30)
MAX_DEADLINE = timedelta(days=3660)
"""How far ahead a deadline may be (about ten years; a typo guard)."""
MAX_IDEMPOTENCY_KEY = 128
MAX_TASK_ID = 128
MAX_REASON = 500
MAX_COST_USD = 1_000_000.0
"""The largest per-task spend cap accepted (a typo guard, not a policy)."""
MAX_OUTPUT_SCHEMA_BYTES = 64 * 1024
HOLD_FRESH_POLLS = 3
HOLD_FRESH_MARGIN = timedelta(seconds=1)


class TaskService(task_pb2_grpc.TaskServiceServicer):
    def __init__(
        self, dispatcher: Dispatcher, quotas: Quotas, config: ServerConfig, ai: AiAdmission
    ) -> None:
        self._dispatcher = dispatcher
        self._db = dispatcher.db
        self._quotas = quotas
        self._config = config
        self._ai = ai
        self._hold_fresh = config.poll_interval * HOLD_FRESH_POLLS + HOLD_FRESH_MARGIN
        """How long after its hold ends a reason dispatch recorded still counts (a held
        task is claimed again within a poll or two if an agent has room)."""

    async def Submit(
        self,
        request: task_pb2.SubmitRequest,
        context: grpc.aio.ServicerContext[task_pb2.SubmitRequest, task_pb2.SubmitResponse],
    ) -> task_pb2.SubmitResponse:
        with tracing.serving("Submit", context) as span:
            try:
                response = await self._submit_one(
                    request, peer_address(context), request_id(context)
                )
            except Refusal as refusal:
                await context.abort_with_status(refusal.status)
                raise  # abort_with_status raises; this line is for the type checker
            if span.is_recording():
                span.set_attributes(
                    {
                        muster_tracing.TASK_ID: response.task.task_id,
                        muster_tracing.TASK_KIND: request.kind,
                        "muster.task.created": response.created,
                    }
                )
            return response

    async def SubmitMany(
        self,
        request: task_pb2.SubmitManyRequest,
        context: grpc.aio.ServicerContext[task_pb2.SubmitManyRequest, task_pb2.SubmitManyResponse],
    ) -> task_pb2.SubmitManyResponse:
        peer, rid = peer_address(context), request_id(context)
        with tracing.serving("SubmitMany", context) as span:
            span.set_attribute("muster.submit_many.items", len(request.items))
            return await submit_many(request.items, lambda item: self._submit_one(item, peer, rid))

    async def _submit_one(
        self, request: task_pb2.SubmitRequest, peer: str, rid: str
    ) -> task_pb2.SubmitResponse:
        """Submit's whole path, shared by Submit and each item of SubmitMany; a refusal
        is a ServiceError (a Refusal when it carries a rich status)."""
        principal = current_principal.get()
        values = self._validate_submit(request)
        ai_task = None
        if request.kind in AI_KINDS:
            ai_task = await self._ai.check(
                kind=request.kind,
                payload=request.payload,
                pool=values["pool"],
                tenant=principal.tenant,
                max_cost_micros=values["max_cost_micros"],
            )
            values.update(model=ai_task.model, reserve_micros=ai_task.reserve_micros)
        decision = await self._quotas.check_submission(principal.name)
        if not decision.allowed:
            raise Refusal(decision.status())
        if ai_task is not None:
            decision = await self._ai.check_rates(principal.tenant, ai_task)
            if not decision.allowed:
                raise Refusal(decision.status())
        # The call's span (Submit, or the SubmitMany this item is part of) is the
        # parent of everything that happens to the task.
        values["trace_context"] = tracing.current_context()
        task, created, assigned = await self._dispatcher.submit(
            {**values, "owner": principal.tenant, "submitted_by": principal.name},
            actor=principal.name,
            peer=peer,
            request_id=rid,
        )
        if not created and task.owner != principal.tenant:
            # A signed envelope binds its task id: another tenant's copy cannot be a
            # second task, and must not read the first.
            raise ServiceError(
                grpc.StatusCode.ALREADY_EXISTS,
                "signature: another tenant submitted this signed task; sign it afresh",
            )
        if assigned:
            # Pushed at once to a connected agent that runs it: nothing to warn about and
            # no reason to wait. The check is three presence reads in the group commit's
            # queue, where the task's own Accepted and Result would wait behind them.
            warning, why = "", waiting.NOTHING
        else:
            warning, why = await self._db.group.run_many(
                "submit.check",
                waiting.check_submitted,
                waiting.Submitted(task, self._dispatcher.presence.now(), self._hold_fresh),
            )
        return task_pb2.SubmitResponse(
            task=convert.task(task, waiting=why), created=created, warning=warning
        )

    async def _why(self, session: Any, tasks: list[Task]) -> dict[str, waiting.Waiting]:
        """Why each queued task waits, from the presence of agents now."""
        return await waiting.explain(
            session, tasks, self._dispatcher.presence.now(), hold_fresh=self._hold_fresh
        )

    def _validate_submit(self, request: task_pb2.SubmitRequest) -> dict[str, Any]:
        if not request.kind:
            raise invalid("kind: required (for example 'echo')")
        check_name(request.kind, "kind", KIND)
        if len(request.payload) > self._config.max_payload_bytes:
            raise invalid(
                f"payload: {len(request.payload)} bytes exceeds the cap of "
                f"{self._config.max_payload_bytes} bytes"
            )
        pool = check_name(request.pool or "default", "pool")
        if not -MAX_PRIORITY <= request.priority <= MAX_PRIORITY:
            raise invalid(f"priority: must be between -{MAX_PRIORITY} and {MAX_PRIORITY}")
        max_attempts = request.max_attempts or self._config.default_max_attempts
        if not 1 <= max_attempts <= MAX_ATTEMPTS:
            raise invalid(f"max_attempts: must be between 1 and {MAX_ATTEMPTS}")
        check_text(request.idempotency_key, "idempotency_key", MAX_IDEMPOTENCY_KEY)
        deadline = None
        if request.HasField("deadline"):
            deadline = timestamp(request.deadline, "deadline")
            now = utcnow()
            if deadline <= now:
                raise invalid("deadline: must be in the future")
            if deadline > now + MAX_DEADLINE:
                raise invalid("deadline: at most ten years from now")
        values: dict[str, Any] = {
            "max_cost_micros": _max_cost(request.max_cost_usd),
            "output_schema": _output_schema(request.output_schema),
            "kind": request.kind,
            "payload": request.payload,
            "pool": pool,
            "selector": check_labels(dict(request.selector), "selector"),
            "priority": request.priority,
            "max_attempts": max_attempts,
            "idempotency_key": request.idempotency_key or None,
            "schedule_to_start_timeout": _timeout(request, "schedule_to_start_timeout"),
            "start_to_close_timeout": _timeout(request, "start_to_close_timeout"),
            "deadline": deadline,
        }
        if request.HasField("signature"):
            values |= self._signed(request)  # after the checks of the fields it covers
        return values

    def _signed(self, request: task_pb2.SubmitRequest) -> dict[str, Any]:
        """A signed task's id (bound to its envelope) and the envelope to store; the
        envelope must be well formed and match the request (see TaskSignature)."""
        try:
            task_id = check_submitted(request, self._dispatcher.clock.now())
        except EnvelopeError as err:
            raise invalid(str(err)) from None
        return {"task_id": task_id, "signature": request.signature.SerializeToString()}

    async def Get(
        self,
        request: task_pb2.GetTaskRequest,
        context: grpc.aio.ServicerContext[task_pb2.GetTaskRequest, common_pb2.Task],
    ) -> common_pb2.Task:
        task = await self._load(request.task_id)
        async with self._db.transaction() as session:
            used = await usage_store.of_tasks(session, [task.task_id])
            why = await self._why(session, [task])
        return convert.task(task, used.get(task.task_id, ()), why.get(task.task_id))

    async def List(
        self,
        request: task_pb2.ListTasksRequest,
        context: grpc.aio.ServicerContext[task_pb2.ListTasksRequest, task_pb2.ListTasksResponse],
    ) -> task_pb2.ListTasksResponse:
        limit = request.page_size or DEFAULT_PAGE
        if not 1 <= limit <= MAX_PAGE:
            raise invalid(f"page_size: must be between 1 and {MAX_PAGE}")
        states = []
        for state in request.states:
            name = enum_value(common_pb2.TaskState, state, "states").removeprefix("TASK_STATE_")
            if name == "UNSPECIFIED":
                raise invalid("states: TASK_STATE_UNSPECIFIED is not a state")
            states.append(State(name))
        # Filters: what no task can have matches nothing, but NUL and control
        # characters are refused rather than sent to the database.
        check_text(request.pool, "pool", 63)
        check_text(request.kind, "kind", 64)
        before = _decode_page_token(request.page_token) if request.page_token else None
        principal = current_principal.get()
        async with self._db.transaction() as session:
            rows = await self._db.tasks.list_tasks(
                session,
                states=states,
                pool=request.pool,
                kind=request.kind,
                owner=None if principal.is_admin else principal.tenant,
                limit=limit + 1,
                before=before,
            )
            rows = rows[:limit] if len(rows) > limit else rows
            next_token = ""
            if len(rows) == limit:
                next_token = _encode_page_token(rows[-1].created_at, rows[-1].task_id)
            used = await usage_store.of_tasks(
                session, [r.task_id for r in rows if r.cost_micros or r.input_tokens]
            )
            why = await self._why(session, rows)
        return task_pb2.ListTasksResponse(
            tasks=[convert.task(r, used.get(r.task_id, ()), why.get(r.task_id)) for r in rows],
            next_page_token=next_token,
        )

    async def Cancel(
        self,
        request: task_pb2.CancelTaskRequest,
        context: grpc.aio.ServicerContext[task_pb2.CancelTaskRequest, common_pb2.Task],
    ) -> common_pb2.Task:
        check_text(request.reason, "reason", MAX_REASON)
        principal = current_principal.get()
        await self._load(request.task_id)
        task = await self._dispatcher.cancel(
            request.task_id, request.reason, actor=principal.name, request_id=request_id(context)
        )
        if task is None:
            raise not_found(f"no task {request.task_id[:60]!r}")
        return convert.task(task)

    async def Watch(
        self,
        request: task_pb2.WatchTaskRequest,
        context: grpc.aio.ServicerContext[task_pb2.WatchTaskRequest, common_pb2.Task],
    ) -> AsyncIterator[common_pb2.Task]:
        poll = self._config.poll_interval.total_seconds()
        last: tuple[str, int, datetime] | None = None
        first: Task | None = None
        with self._dispatcher.hub.watch(request.task_id) as watcher:
            while True:
                watcher.changed.clear()
                if first is not None and watcher.ended is not None:
                    # Ended on this replica: its row as the end left it, and the payload
                    # (which never changes) as first read; access was checked then.
                    task = Task(**watcher.ended, payload=first.payload)
                else:
                    task = await self._load(request.task_id)
                    first = first or task
                seen = (task.state, task.attempt, task.updated_at)
                if seen != last:
                    last = seen
                    why: dict[str, waiting.Waiting] = {}
                    if task.state == State.QUEUED:  # only a queued task waits: no connection else
                        async with self._db.reading() as conn:
                            why = await self._why(conn, [task])
                    yield convert.task(task, waiting=why.get(task.task_id))
                if task.state in TERMINAL:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.changed.wait(), poll)

    async def _load(self, task_id: str) -> Task:
        """The task, if the caller may see it: submitters see their own tasks, admins all."""
        if not task_id:
            raise invalid("task_id: required")
        check_text(task_id, "task_id", MAX_TASK_ID)
        async with self._db.reading() as conn:
            task = await self._db.tasks.read(conn, task_id)
        principal = current_principal.get()
        if task is None or not (principal.is_admin or task.owner == principal.tenant):
            raise not_found(f"no task {task_id[:60]!r}")
        if task.state == State.ASSIGNED:
            # Its agent's Accepted arrived here and waits to be written (or folded into
            # the Result): shown as it will be written. The read is a detached copy.
            accepted_at = self._dispatcher.hub.waiting_accept(task_id, task.attempt)
            if accepted_at is not None:
                task.state, task.started_at = State.RUNNING, accepted_at
                task.updated_at = accepted_at  # as the write will set it
        return task


def _timeout(request: task_pb2.SubmitRequest, field: str) -> float | None:
    """The timeout in seconds; None (the server default) when absent or 0. Negative is
    INVALID_ARGUMENT, not the default."""
    if not request.HasField(field):
        return None
    value = duration(getattr(request, field), field, maximum=MAX_TIMEOUT, maximum_text="30 days")
    return value.total_seconds() or None


def _encode_page_token(created: datetime, task_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created.isoformat()}|{task_id}".encode()).decode()


def _decode_page_token(token: str) -> tuple[datetime, str]:
    """What ``_encode_page_token`` made: an aware time and a task id. Anything else
    (a naive or out-of-range time, control characters) is INVALID_ARGUMENT."""
    refused = invalid("page_token: not a token from a previous response")
    if len(token) > 512:
        raise refused
    try:
        created, task_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        when = datetime.fromisoformat(created)
    except (ValueError, UnicodeDecodeError):
        raise refused from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise refused
    try:
        check_text(task_id, "page_token", MAX_TASK_ID)
        when = when.astimezone(UTC)
    except (ServiceError, OverflowError, ValueError):
        raise refused from None
    return when, task_id


def _max_cost(value: float) -> int | None:
    """``max_cost_usd`` in micro-dollars; None when not set (0)."""
    if not math.isfinite(value) or not 0 <= value <= MAX_COST_USD:
        raise invalid(f"max_cost_usd: must be between 0 and {MAX_COST_USD:,.0f} US dollars")
    micros = round(value * 1_000_000)
    if value and micros == 0:
        raise invalid("max_cost_usd: less than one micro-dollar")
    return micros or None


def _output_schema(text: str) -> str | None:
    """A checked JSON Schema, as the text the agent will be given; None when not set."""
    if not text:
        return None
    if len(text.encode()) > MAX_OUTPUT_SCHEMA_BYTES:
        raise invalid(f"output_schema: larger than {MAX_OUTPUT_SCHEMA_BYTES // 1024} KiB")
    check_text(text, "output_schema", MAX_OUTPUT_SCHEMA_BYTES, multiline=True)
    try:
        parse_output_schema(text)
    except PayloadError as err:
        raise invalid(str(err)) from None
    return text
