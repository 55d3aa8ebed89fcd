"""Concurrent quota decisions that share one round trip.

Why: every Submit asks Redis about its rate limit, every dispatched attempt about its
in-flight slots; one round trip each costs this process more CPU (a pooled connection,
encoding, parsing) than the decision itself. Callers that ask while a call is on its way
wait for it to return, then go together in the next one: under load a round trip answers
many decisions, when idle a caller goes at once and by itself (no timer, no added
latency, no task).

Each caller still gets its own answer, as if it had asked alone: a batch is decided in
the order its requests were made, one after another (the one script per batch does
that). Between a lone call and the batch behind it there is no order, as between any
two concurrent calls. A batch that fails fails each caller with its own copy of the error.

The writer is a :class:`~muster.server.drain.Drain`: should it crash (cancelled from
outside, or a bug past the per-batch error handling), the callers queued behind it fail at
once with :class:`WriterCrashed` instead of waiting out their patience, and ``on_crash``
(the server's supervisor) is told; the next caller starts a new writer.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

from muster.server.drain import Drain, OnError

__all__ = ["Coalescer", "WriterCrashed"]

log = logging.getLogger(__name__)

R = TypeVar("R")
A = TypeVar("A")


class WriterCrashed(RuntimeError):
    """The writer crashed before this caller's request was sent."""


@dataclass(slots=True)
class _Pending(Generic[R, A]):
    request: R
    answer: asyncio.Future[A] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Coalescer(Generic[R, A]):
    """Hands concurrent :meth:`ask` calls to ``call`` in batches.

    A caller that finds nothing on its way calls alone, at once; callers that come while
    a call is on its way queue, and one writer sends them in batches, one at a time (so
    at most two calls are on their way: a lone caller's and the writer's).

    ``call`` gets the requests in the order they were asked and must answer each, in
    the same order (one answer per request), or raise. ``max_batch`` bounds one call,
    counted by ``weight`` (1 per request unless given). A queued caller waits at most
    ``patience`` seconds for its answer (then TimeoutError; None: no limit), counted from
    its request as a call of its own would be. A caller that gives up (it is
    cancelled, or its patience ends) is left out of a batch not yet sent; once
    sent, its request is decided like the others, its answer unread.
    """

    def __init__(
        self,
        call: Callable[[list[R]], Awaitable[Sequence[A]]],
        *,
        name: str,
        max_batch: int,
        weight: Callable[[R], int] | None = None,
        patience: float | None = None,
    ) -> None:
        self._call = call
        self._name = name
        self._max_batch = max_batch
        self._weight = weight
        self._patience = patience
        self._drain: Drain[_Pending[R, A]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._alone = False
        """A caller is making a call of its own (see :meth:`ask`)."""
        self.calls = 0
        """Calls made (batches sent), for tests and measurements."""
        self.on_crash: OnError | None = None
        """Told when a writer crashes (after its queued callers have failed)."""

    async def ask(self, request: R) -> A:
        """The answer to ``request``; raises what ``call`` raised for its batch."""
        writer = self._writer()
        if not self._alone and writer.idle:
            # Nothing on its way: this caller makes the call itself, at once (a task and a
            # future per call would cost a lone caller more than the round trip). Callers
            # that come meanwhile queue for the writer, as behind any call.
            self._alone = True
            self.calls += 1
            try:
                answers = await self._call([request])
            finally:
                self._alone = False
            if len(answers) != 1:
                raise RuntimeError(f"{self._name}: {len(answers)} answers to 1 request")
            return answers[0]
        pending: _Pending[R, A] = _Pending(request)
        writer.put(pending)
        async with asyncio.timeout(self._patience):
            return await pending.answer  # cancelling the caller cancels the future

    async def ask_all(self, requests: Sequence[R]) -> list[A]:
        """:meth:`ask` for each of ``requests`` at once: they go in the same batch (or
        consecutive ones, past ``max_batch``), in order. Raises the first error."""
        writer = self._writer()
        answers: list[asyncio.Future[A]] = []
        for request in requests:
            pending: _Pending[R, A] = _Pending(request)
            writer.put(pending)
            answers.append(pending.answer)
        if not answers:
            return []
        # Every answer is read (an error too), so none is left unretrieved in the loop.
        async with asyncio.timeout(self._patience):
            results = await asyncio.gather(*answers, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return cast(list[A], results)

    async def close(self) -> None:
        """Wait for the batches queued so far."""
        if self._drain is not None and self._loop is asyncio.get_running_loop():
            await self._drain.close()
        self._drain = None

    @property
    def drain(self) -> Drain[_Pending[R, A]]:
        """The writer of this event loop's batches (a supervisor watches its crashes)."""
        return self._writer()

    def _writer(self) -> Drain[_Pending[R, A]]:
        loop = asyncio.get_running_loop()
        # A store may outlive an event loop (tests open one per test): the writer task
        # belongs to a loop, so each loop gets its own drain.
        if self._drain is None or self._loop is not loop or self._drain.error is not None:
            weight = self._weight
            drain: Drain[_Pending[R, A]] = Drain(
                self._flush,
                name=self._name,
                max_batch=self._max_batch,
                weight=None if weight is None else (lambda p: weight(p.request)),
            )
            drain.on_error = lambda err: self._crashed(drain, err)
            self._drain, self._loop = drain, loop
        return self._drain

    def _crashed(self, drain: Drain[_Pending[R, A]], err: BaseException) -> None:
        for pending in drain.abort():  # queued, never to be sent
            if not pending.answer.done():
                pending.answer.set_exception(WriterCrashed(f"{self._name}: its writer crashed"))
        if self.on_crash is None:
            log.error("%s crashed", self._name, exc_info=err)
            return
        self.on_crash(err)

    async def _flush(self, batch: list[_Pending[R, A]]) -> None:
        waiting = [p for p in batch if not p.answer.done()]
        if not waiting:
            return
        self.calls += 1
        try:
            answers = await self._call([p.request for p in waiting])
            if len(answers) != len(waiting):
                raise RuntimeError(
                    f"{self._name}: {len(answers)} answers to {len(waiting)} requests"
                )
        except asyncio.CancelledError:
            for p in waiting:
                p.answer.cancel()
            raise
        except Exception as err:
            # Each caller raises its own copy: one exception object raised in many tasks
            # would collect all their tracebacks.
            for p in waiting:
                if not p.answer.done():
                    mine = copy.copy(err)
                    mine.__cause__ = err.__cause__
                    p.answer.set_exception(mine)
            return
        for p, answer in zip(waiting, answers, strict=True):
            if not p.answer.done():
                p.answer.set_result(answer)
