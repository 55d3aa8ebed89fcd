"""The control plane's spans of a task's trace: Submit, the queue wait, the dispatch of
each attempt and the recording of its Result (the SDK's and the agent's spans are in
``muster/tracing.py`` and ``agent/tracing.py``; docs/tracing.md shows the tree).

Without a configured tracer provider every span here is a no-op that still carries its
parent's context, so a task submitted within a trace keeps it across an untraced server.
A task with no stored context costs nothing past one ``if``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from muster import tracing
from muster.server.storage.taskstore import Claimed
from muster.v1 import agent_pb2, common_pb2

SERVICE = "muster.v1.TaskService"


@contextmanager
def serving(method: str, context: Any) -> Iterator[trace.Span]:
    """The SERVER span of a TaskService call, child of the caller's ``traceparent``;
    current while the handler runs, so the tasks it creates store its context."""
    parent = tracing.parent_from_metadata(context.invocation_metadata())
    if not tracing.enabled():
        # No span; the caller's context, if any, is current, so tasks still store it.
        token = otel_context.attach(parent) if parent is not None else None
        try:
            yield trace.INVALID_SPAN
        finally:
            if token is not None:
                otel_context.detach(token)
        return
    with tracing.span(
        f"{SERVICE}/{method}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
    ) as span:
        yield span
        span.set_attribute("rpc.grpc.status_code", 0)


def current_context() -> str | None:
    """The current span's context as stored with a task (None: not traced)."""
    return tracing.to_stored(trace.get_current_span())


def dispatched(
    task: Claimed, agent_id: str, claimed_ns: int | None = None
) -> common_pb2.TraceContext | None:
    """The queue wait (from ``queued_at`` to the claim) and dispatch spans of an attempt
    sent now, as children of the task's context; the dispatch span's context is what the
    Assignment carries. ``claimed_ns``: when the claim began (now when None: eager)."""
    parent = tracing.parent_from_stored(task.trace_context)
    if parent is None:
        return None
    if not tracing.enabled():
        return tracing.stored_to_proto(task.trace_context)  # handed on as it came
    now = time.time_ns()
    claimed = min(claimed_ns or now, now)
    attributes: dict[str, str | int] = {
        tracing.TASK_ID: task.task_id,
        tracing.TASK_ATTEMPT: task.attempt,
        tracing.TASK_KIND: task.kind,
        tracing.TASK_POOL: task.pool,
    }
    tracer = tracing.tracer()
    tracer.start_span(
        "queue wait",
        context=parent,
        kind=SpanKind.INTERNAL,
        attributes=attributes,
        start_time=min(_ns(task.queued_at), claimed),
    ).end(end_time=claimed)
    span = tracer.start_span(
        "dispatch",
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes={
            **attributes,
            tracing.AGENT_ID: agent_id,
            "messaging.system": "muster",
            "messaging.operation.type": "send",
            "messaging.destination.name": task.pool,
        },
        start_time=claimed,
    )
    carried = tracing.to_proto(span)
    span.end(end_time=now)
    return carried


@contextmanager
def recording(agent_id: str, result: agent_pb2.Result) -> Iterator[trace.Span]:
    """The span of recording an agent's Result: a child of the span the agent ran the
    attempt in (Result.trace_context); a no-op for a Result without one."""
    parent = (
        tracing.parent_from_proto(result.trace_context)
        if result.HasField("trace_context") and tracing.enabled()
        else None
    )
    if parent is None:
        yield trace.INVALID_SPAN
        return
    with tracing.span(
        "record result",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            tracing.TASK_ID: result.task_id,
            tracing.TASK_ATTEMPT: result.attempt,
            tracing.AGENT_ID: agent_id,
            tracing.OUTCOME: _outcome(result.outcome),
            "messaging.system": "muster",
            "messaging.operation.type": "process",
        },
    ) as span:
        yield span


def acknowledged(span: trace.Span, status: agent_pb2.AckStatus) -> None:
    """What the server answered the Result (RECORDED, DUPLICATE, STALE)."""
    if span.is_recording():
        name = agent_pb2.AckStatus.Name(status).removeprefix("ACK_STATUS_")
        span.set_attribute("muster.ack.status", name)


def _outcome(outcome: int) -> str:
    try:
        return agent_pb2.Outcome.Name(outcome).removeprefix("OUTCOME_")
    except ValueError:
        return "UNKNOWN"


def _ns(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000_000)
