"""The agent's spans of a task's trace: running an attempt, and the AI call inside it.

The span that runs an attempt is a child of the dispatch span the Assignment names
(``Assignment.trace_context``), and is current while the executor runs, so an executor's
own spans (the AI call below, or a plugin's) nest under it. Its context goes back in
the Result (``Result.trace_context``), where the server's span for recording it hangs.
Without a configured tracer provider the spans are no-ops that pass the Assignment's
context through to the Result unchanged. No payload, output, prompt or key is ever
put on a span.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from muster import tracing
from muster.agent.executors.base import Usage
from muster.v1 import agent_pb2


@contextmanager
def executing(assignment: agent_pb2.Assignment) -> Iterator[trace.Span]:
    """The CONSUMER span of running one attempt, current inside the ``with``; a no-op
    (and nothing else) for an Assignment that carries no trace context."""
    parent = (
        tracing.parent_from_proto(assignment.trace_context)
        if assignment.HasField("trace_context")
        else None
    )
    if parent is None:
        yield trace.INVALID_SPAN
        return
    if not tracing.enabled():
        # No span: the Assignment's context goes back in the Result as it came.
        yield trace.get_current_span(parent)
        return
    with tracing.span(
        f"execute {assignment.kind}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            tracing.TASK_ID: assignment.task_id,
            tracing.TASK_ATTEMPT: assignment.attempt,
            tracing.TASK_KIND: assignment.kind,
            "messaging.system": "muster",
            "messaging.operation.type": "process",
        },
    ) as span:
        yield span


async def attempt(
    assignment: agent_pb2.Assignment, run: Awaitable[agent_pb2.Result | None]
) -> agent_pb2.Result | None:
    """Await ``run`` (the attempt) in its span; its Result then names the span."""
    with executing(assignment) as span:
        result = await run
        if result is not None:
            finished(span, result)
        return result


def finished(span: trace.Span, result: agent_pb2.Result) -> None:
    """Note the attempt's outcome on its span and name the span in the Result."""
    carried = tracing.to_proto(span)
    if carried is None:
        return
    result.trace_context.CopyFrom(carried)
    if not span.is_recording():
        return
    outcome = agent_pb2.Outcome.Name(result.outcome).removeprefix("OUTCOME_")
    span.set_attribute(tracing.OUTCOME, outcome)
    if result.outcome == agent_pb2.OUTCOME_FAILED:
        span.set_attribute("muster.task.retryable", result.retryable)
        # The error text may quote a provider or a payload: only that it failed.
        span.set_status(Status(StatusCode.ERROR, "attempt failed"))


class AiCall:
    """The span of one call to an AI provider, as an executor sees it."""

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def used(self, usage: Usage) -> None:
        """Record the tokens the call used (counts and the model only)."""
        if not self.span.is_recording():
            return
        self.span.set_attributes(
            {
                "gen_ai.usage.input_tokens": usage.input_tokens,
                "gen_ai.usage.output_tokens": usage.output_tokens,
            }
        )
        if usage.model:
            self.span.set_attribute("gen_ai.response.model", usage.model)


@contextmanager
def ai_call(
    provider: str, operation: str, model: str, *, max_tokens: int | None = None
) -> Iterator[AiCall]:
    """A CLIENT span for one provider call, after OpenTelemetry's GenAI conventions
    (``{operation} {model}``, ``gen_ai.*``): a child of the attempt's span."""
    if not tracing.enabled():
        yield AiCall(trace.INVALID_SPAN)
        return
    attributes: dict[str, str | int] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,
        "gen_ai.request.model": model,
    }
    if max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = max_tokens
    with tracing.span(
        f"{operation} {model}".strip(),
        kind=SpanKind.CLIENT,
        attributes=attributes,
    ) as span:
        yield AiCall(span)
