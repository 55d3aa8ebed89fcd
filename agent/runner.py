"""Runs attempts through executors, one asyncio task each, within the concurrency limit.

The runner outlives streams: work keeps running while the agent reconnects,
and every finished attempt is handed to ``on_finished`` as a Result, in the
same event-loop step that removes it from :meth:`running`, so a Hello or
Heartbeat never sees an attempt both running and finished.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2

from muster.agent import tracing
from muster.agent.executors import (
    ExecutionResult,
    ExecutorError,
    ExecutorRegistry,
    ProgressFn,
    TaskContext,
    Usage,
)
from muster.agent.metrics import UNKNOWN_KIND, AgentMetrics
from muster.agent.signatures import SignatureGate
from muster.ai import PayloadError, check_output, parse_output_schema
from muster.sanitize import neutralize
from muster.v1 import agent_pb2, common_pb2

log = logging.getLogger(__name__)

AttemptKey = tuple[str, int]
MAX_ERROR_CHARS = 4096

FinishedFn = Callable[[agent_pb2.Result], None]
ProgressSink = Callable[[str, int, str, int, int], None]
"""``(task_id, attempt, message, percent, output_tokens)``."""


@dataclass(slots=True)
class _Running:
    key: AttemptKey
    kind: str
    task: asyncio.Task[agent_pb2.Result | None] | None = None
    cancel_reason: str | None = None
    abandoned: bool = False
    started: float | None = None
    """Event-loop time the executor was called (None: it never was)."""
    timed_out: bool = False


class TaskRunner:
    """Owns the executor tasks; knows which attempts are running."""

    def __init__(
        self,
        registry: ExecutorRegistry,
        concurrency: int,
        on_finished: FinishedFn,
        on_progress: ProgressSink | None = None,
        *,
        gate: SignatureGate | None = None,
        metrics: AgentMetrics | None = None,
        max_output_bytes: int = 0,
    ) -> None:
        self.registry = registry
        self.concurrency = concurrency
        self._on_finished = on_finished
        self._on_progress = on_progress
        self.gate = gate
        """Refuses attempts of kinds this agent runs only when signed (None: no such kind)."""
        self._running: dict[AttemptKey, _Running] = {}
        self._metrics = metrics
        self.max_output_bytes = max_output_bytes
        """A successful output above this fails the attempt for good (0: no limit)."""

    # Queries --------------------------------------------------------------

    def running(self) -> list[AttemptKey]:
        """Attempts whose executor is still running, in start order."""
        return list(self._running)

    def is_running(self, key: AttemptKey) -> bool:
        return key in self._running

    def free_slots(self) -> int:
        return max(0, self.concurrency - len(self._running))

    @property
    def idle(self) -> bool:
        return not self._running

    # Commands -------------------------------------------------------------

    def start(self, assignment: agent_pb2.Assignment) -> bool:
        """Start one attempt; False when it is already running or no slot is free."""
        key = (assignment.task_id, assignment.attempt)
        if key in self._running:
            return False
        if not self.free_slots():
            return False
        entry = _Running(key=key, kind=assignment.kind)
        self._running[key] = entry
        entry.task = asyncio.create_task(
            self._attempt(entry, assignment), name=f"attempt {key[0]}#{key[1]}"
        )
        return True

    def cancel(self, key: AttemptKey, reason: str) -> bool:
        """Stop an attempt at the server's request; it reports OUTCOME_CANCELLED."""
        entry = self._running.get(key)
        if entry is None or entry.task is None:
            return False
        if entry.cancel_reason is None:
            entry.cancel_reason = reason or "cancelled by the server"
            entry.task.cancel()
        return True

    async def abandon_all(self) -> list[AttemptKey]:
        """Stop every attempt without reporting: the server requeues them when the lease ends.

        Used when shutdown runs out of time; a CANCELLED result would wrongly
        make the task terminal.
        """
        entries = list(self._running.values())
        for entry in entries:
            entry.abandoned = True
            if entry.task is not None:
                entry.task.cancel()
        tasks = [e.task for e in entries if e.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        return [e.key for e in entries]

    # The attempt ------------------------------------------------------------

    async def _attempt(
        self, entry: _Running, assignment: agent_pb2.Assignment
    ) -> agent_pb2.Result | None:
        result: agent_pb2.Result | None = None
        try:
            # In the attempt's span, with the executor's own spans inside it.
            result = await tracing.attempt(assignment, self._execute(entry, assignment))
            return result
        finally:
            # Same step: leave "running" and hand the result over (see module doc).
            self._running.pop(entry.key, None)
            if self._metrics is not None:
                self._count(entry, result)
            if result is not None:
                self._on_finished(result)

    async def _execute(
        self, entry: _Running, assignment: agent_pb2.Assignment
    ) -> agent_pb2.Result | None:
        task_id, attempt = entry.key
        if self.gate is not None and (refused := self.gate.check(assignment)) is not None:
            return refused  # before anything of the task is looked at, let alone run
        executor = self.registry.get(assignment.kind)
        if executor is None:
            # The server matches by capabilities, so another agent may well run it.
            return _failed(
                entry.key,
                f"this agent has no executor for task kind {assignment.kind!r}",
                retryable=True,
            )
        schema: dict[str, Any] | None = None
        if assignment.output_schema:
            try:
                schema = parse_output_schema(assignment.output_schema)
            except PayloadError as err:
                return _failed(entry.key, str(err), retryable=False)
        limit, deadline = _limits(assignment)
        ctx = TaskContext(
            task_id=task_id,
            attempt=attempt,
            kind=assignment.kind,
            payload=assignment.payload,
            deadline=deadline,
            max_cost_micros=max(0, assignment.max_cost_micros),
            output_schema=assignment.output_schema,
            max_output_bytes=self.max_output_bytes,
            on_progress=self._progress_fn(entry.key),
        )
        remaining = ctx.time_remaining()
        when = None if remaining is None else asyncio.get_running_loop().time() + remaining
        log.info("attempt %s#%d (%s) started", task_id, attempt, assignment.kind)
        timeout = asyncio.timeout_at(when)
        entry.started = asyncio.get_running_loop().time()
        try:
            async with timeout:
                outcome = await executor.run(ctx)
        except asyncio.CancelledError:
            if entry.cancel_reason is not None and not entry.abandoned:
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                log.info(
                    "attempt %s#%d cancelled: %s", task_id, attempt, _shown(entry.cancel_reason)
                )
                return agent_pb2.Result(
                    task_id=task_id,
                    attempt=attempt,
                    outcome=agent_pb2.OUTCOME_CANCELLED,
                    error=entry.cancel_reason,
                    usage=_usage(ctx.meter.usage),
                )
            log.info("attempt %s#%d abandoned", task_id, attempt)
            raise
        except TimeoutError as err:
            if not timeout.expired():
                log.warning("attempt %s#%d failed: %s", task_id, attempt, _shown(_message(err)))
                return _failed(entry.key, _message(err), retryable=True, usage=ctx.meter.usage)
            log.warning("attempt %s#%d timed out", task_id, attempt)
            entry.timed_out = True
            return _failed(
                entry.key,
                _timeout_message(limit, deadline, assignment),
                retryable=True,
                usage=ctx.meter.usage,
            )
        except ExecutorError as err:
            log.warning("attempt %s#%d failed: %s", task_id, attempt, _shown(str(err)))
            result = _failed(
                entry.key,
                _message(err),
                retryable=err.retryable,
                usage=err.usage or ctx.meter.usage,
            )
            if err.retryable and err.retry_after is not None and err.retry_after > 0:
                result.retry_after.CopyFrom(_duration(err.retry_after))
            result.rate_limited = err.retryable and err.rate_limited
            return result
        except Exception as err:
            # The traceback stays here; only the message travels to the server.
            log.exception("attempt %s#%d: executor %r raised", task_id, attempt, assignment.kind)
            return _failed(entry.key, _message(err), retryable=True, usage=ctx.meter.usage)
        output: object = outcome
        if isinstance(output, bytes):
            output = ExecutionResult(output=output)
        if not isinstance(output, ExecutionResult):
            return _failed(
                entry.key,
                f"executor {assignment.kind!r} returned {type(output).__name__}, "
                "not an ExecutionResult",
                retryable=False,
            )
        if self.max_output_bytes and len(output.output) > self.max_output_bytes:
            # Not retried: the same work would most likely produce as much again.
            error = (
                f"output of {len(output.output)} bytes exceeds this agent's "
                f"{self.max_output_bytes}-byte limit"
            )
            log.warning("attempt %s#%d failed: %s", task_id, attempt, error)
            return _failed(entry.key, error, retryable=False, usage=output.usage)
        if schema is not None:
            try:
                check_output(schema, output.answer if output.answer is not None else output.output)
            except PayloadError as err:
                # The model answered, so tokens were spent; the same prompt would
                # most likely miss the schema again: do not retry.
                log.warning(
                    "attempt %s#%d failed the output schema: %s", task_id, attempt, _shown(str(err))
                )
                return _failed(entry.key, str(err), retryable=False, usage=output.usage)
        log.info("attempt %s#%d succeeded", task_id, attempt)
        return agent_pb2.Result(
            task_id=task_id,
            attempt=attempt,
            outcome=agent_pb2.OUTCOME_SUCCEEDED,
            output=output.output,
            usage=_usage(output.usage),
        )

    def _count(self, entry: _Running, result: agent_pb2.Result | None) -> None:
        assert self._metrics is not None
        ran = None
        if entry.started is not None:
            ran = asyncio.get_running_loop().time() - entry.started
        kind = entry.kind if entry.kind in self.registry else UNKNOWN_KIND
        self._metrics.attempt_finished(kind, result, ran, timed_out=entry.timed_out)

    def _progress_fn(self, key: AttemptKey) -> ProgressFn:
        async def progress(message: str, percent: int, output_tokens: int) -> None:
            if self._on_progress is not None and key in self._running:
                self._on_progress(key[0], key[1], message, percent, output_tokens)

        return progress


def _limits(
    assignment: agent_pb2.Assignment,
) -> tuple[dt.timedelta | None, dt.datetime | None]:
    """The start-to-close limit and the effective wall-clock deadline (the earlier one)."""
    now = dt.datetime.now(dt.UTC)
    limit: dt.timedelta | None = None
    candidates: list[dt.datetime] = []
    if assignment.HasField("start_to_close_timeout"):
        limit = assignment.start_to_close_timeout.ToTimedelta()
        if limit > dt.timedelta(0):
            candidates.append(now + limit)
        else:
            limit = None
    if assignment.HasField("deadline"):
        candidates.append(assignment.deadline.ToDatetime(tzinfo=dt.UTC))
    return limit, (min(candidates) if candidates else None)


def _timeout_message(
    limit: dt.timedelta | None, deadline: dt.datetime | None, assignment: agent_pb2.Assignment
) -> str:
    if limit is not None and deadline is not None:
        task_deadline = (
            assignment.deadline.ToDatetime(tzinfo=dt.UTC)
            if assignment.HasField("deadline")
            else None
        )
        if task_deadline is None or deadline < task_deadline:
            return f"timed out after {limit.total_seconds():g}s (start-to-close timeout)"
    return "timed out: the task deadline passed"


def _shown(text: str) -> str:
    """Text from a provider, a server or an executor as a log line may show it: one line,
    terminal controls and bidi overrides made visible (model output is untrusted)."""
    return neutralize(text, single_line=True)


def _message(err: BaseException) -> str:
    return str(err).strip() or type(err).__name__


def _failed(
    key: AttemptKey, error: str, *, retryable: bool, usage: Usage | None = None
) -> agent_pb2.Result:
    return agent_pb2.Result(
        task_id=key[0],
        attempt=key[1],
        outcome=agent_pb2.OUTCOME_FAILED,
        error=error[:MAX_ERROR_CHARS],
        retryable=retryable,
        usage=_usage(usage),
    )


def _usage(usage: Usage | None) -> common_pb2.Usage | None:
    """The wire Usage (never money: the server prices tokens); None when nothing is known."""
    if usage is None:
        return None
    return common_pb2.Usage(
        input_tokens=max(0, usage.input_tokens),
        output_tokens=max(0, usage.output_tokens),
        model=usage.model,
        cache_creation_input_tokens=max(0, usage.cache_creation_input_tokens),
        cache_creation_1h_input_tokens=max(0, usage.cache_creation_1h_input_tokens),
        cache_read_input_tokens=max(0, usage.cache_read_input_tokens),
        reported_cost_micros=max(0, usage.reported_cost_micros),
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(dt.timedelta(seconds=min(seconds, 24 * 3600.0)))
    return duration
