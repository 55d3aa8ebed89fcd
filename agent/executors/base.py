"""What an executor is: the small interface a task kind plugs into the daemon through."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

ProgressFn = Callable[[str, int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Usage:
    """Resources an attempt consumed, reported with its Result (LLM tokens, spend)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0


@dataclass(frozen=True, slots=True)
class ExecutionResult:
    """A successful run: the output bytes and, optionally, what it cost."""

    output: bytes = b""
    usage: Usage = field(default_factory=Usage)


class ExecutorError(Exception):
    """Raise to fail an attempt with a clean message; ``retryable=False`` stops retries.

    Any other exception also fails the attempt (as retryable), but only its
    message reaches the server; the traceback stays in the local log.
    """

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class TaskContext:
    """One attempt as an executor sees it."""

    task_id: str
    attempt: int
    kind: str
    payload: bytes
    deadline: dt.datetime | None = None
    """When the attempt will be stopped (the earlier of start-to-close and the task deadline)."""
    on_progress: ProgressFn | None = field(default=None, repr=False, compare=False)
    """Set by the daemon; executors call :meth:`progress` instead."""

    async def progress(self, message: str, percent: int = -1) -> None:
        """Tell the server how far along we are (0-100, or -1 if unknown); it renews the lease."""
        if self.on_progress is not None:
            await self.on_progress(message, max(-1, min(100, percent)))

    def time_remaining(self) -> float | None:
        """Seconds until the attempt is stopped, or None without a limit."""
        if self.deadline is None:
            return None
        return max(0.0, (self.deadline - dt.datetime.now(dt.UTC)).total_seconds())


@runtime_checkable
class Executor(Protocol):
    """Runs one kind of task. Cancellation arrives as ``asyncio.CancelledError``."""

    kind: str

    async def run(self, ctx: TaskContext) -> ExecutionResult: ...
