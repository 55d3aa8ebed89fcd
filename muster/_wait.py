"""Bookkeeping for ``wait()``, shared by the sync and asyncio clients.

``wait`` rides on Watch streams. A stream that ends before a terminal state, or
fails with UNAVAILABLE (a replica draining or restarting), is reopened after a
short, growing pause; anything else, or too many failures in a row, is raised.
"""

from __future__ import annotations

import logging
import time

import grpc

from muster._convert import task_from_proto
from muster._errors_map import error_code, translate
from muster._types import Task
from muster.errors import InvalidArgumentError, WaitTimeoutError
from muster.v1 import common_pb2

logger = logging.getLogger(__name__)

REWATCH_DELAY = 0.5
"""First pause before reopening a Watch stream; doubles per failure in a row."""
MAX_REWATCH_DELAY = 4.0
MAX_UNAVAILABLE = 4
"""UNAVAILABLE failures in a row tolerated before wait() gives up with UnavailableError."""


class Waiter:
    """One wait(): its deadline, the last state seen, and the failures in a row."""

    def __init__(self, task_id: str, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            raise InvalidArgumentError("timeout: must be positive")
        self.task_id = task_id
        self.timeout = timeout
        self._give_up = None if timeout is None else time.monotonic() + timeout
        self.last: Task | None = None
        self._failures = 0

    def remaining(self) -> float | None:
        """Seconds left for the next Watch call (None: no limit); raises once none are."""
        if self._give_up is None:
            return None
        left = self._give_up - time.monotonic()
        if left <= 0:
            raise self.timed_out()
        return left

    def seen(self, message: common_pb2.Task) -> Task | None:
        """Record a state from the stream; the task when it is terminal, else None."""
        self._failures = 0
        self.last = task_from_proto(message)
        return self.last if self.last.is_terminal else None

    def failed(self, err: grpc.RpcError) -> None:
        """Raise the error for ``err`` unless it is worth watching again."""
        code = error_code(err)
        if self.timeout is not None and code is grpc.StatusCode.DEADLINE_EXCEEDED:
            raise self.timed_out() from err
        if code is not grpc.StatusCode.UNAVAILABLE or self._failures >= MAX_UNAVAILABLE:
            raise translate(err) from err
        self._failures += 1
        logger.info("watch on task %s unavailable; retrying (%d)", self.task_id, self._failures)

    def pause(self) -> float:
        """How long to sleep before reopening the stream, never past the deadline."""
        delay = min(REWATCH_DELAY * 2.0**self._failures, MAX_REWATCH_DELAY)
        left = self.remaining()
        logger.debug("watch on task %s ended early; reopening in %.2fs", self.task_id, delay)
        return delay if left is None else min(delay, left)

    def timed_out(self) -> WaitTimeoutError:
        state = f" (last state {self.last.state})" if self.last is not None else ""
        return WaitTimeoutError(
            f"task {self.task_id} did not finish within {self.timeout}s{state}", task=self.last
        )
