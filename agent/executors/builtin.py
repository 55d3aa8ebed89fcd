"""Executors shipped with the daemon: ``echo`` and ``sleep``, for smoke tests and demos."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from muster.agent.executors.base import ExecutionResult, ExecutorError, TaskContext


class EchoExecutor:
    """Returns the payload unchanged: the cheapest proof that dispatch works end to end."""

    kind = "echo"

    async def run(self, ctx: TaskContext) -> ExecutionResult:
        return ExecutionResult(output=ctx.payload)


class SleepExecutor:
    """Sleeps for ``{"seconds": N}`` and reports it; cancellable, for timeout and drain tests."""

    kind = "sleep"
    max_seconds = 24 * 3600.0

    async def run(self, ctx: TaskContext) -> ExecutionResult:
        seconds = self.parse(ctx.payload)
        started = time.monotonic()
        await asyncio.sleep(seconds)
        slept = round(time.monotonic() - started, 3)
        return ExecutionResult(output=json.dumps({"slept": slept}).encode())

    def parse(self, payload: bytes) -> float:
        """The requested seconds; a malformed payload fails for good (a retry cannot fix it)."""
        try:
            doc: Any = json.loads(payload or b"{}")
        except (ValueError, UnicodeDecodeError) as err:
            raise ExecutorError("sleep payload is not JSON", retryable=False) from err
        value = doc.get("seconds") if isinstance(doc, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ExecutorError('sleep payload must be {"seconds": <number>}', retryable=False)
        seconds = float(value)
        if not math.isfinite(seconds) or not 0 <= seconds <= self.max_seconds:
            raise ExecutorError(
                f"sleep seconds must be between 0 and {self.max_seconds:g}", retryable=False
            )
        return seconds
