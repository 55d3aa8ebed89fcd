"""One writer that drains a queue on demand.

Many places hand work to a single consumer that must never run twice at once: the
messages of one stream (gRPC allows one write at a time), the units of group commit
(one transaction at a time), the slot releases of in-flight limits (one round trip at a
time). The idiom is always the same: append, start a task if none runs, and let that task
drain until the queue is empty. :class:`Drain` writes it once, with what the hand-written
copies each lacked: a bound, a way to wait for the queue, and one place where a crash goes.

What a caller can rely on:

- items reach ``flush`` in the order they were put, and never two ``flush`` calls at once;
- ``put`` never waits: the item is queued when it returns, or ``put`` raises
  (:class:`DrainFull` past the bound, :class:`DrainClosed` after ``close``/``abort``/a crash);
- an error ``flush`` raises (or the writer task cancelled by anyone but :meth:`Drain.abort`)
  goes to ``on_error``, once; the drain is then *broken*: it writes nothing more, refuses
  new items and keeps the ones not yet written (:meth:`Drain.abort` hands them back).
  ``flush`` should handle the errors it expects (retry, fail a caller's future); what
  reaches ``on_error`` is a crash, and the owner decides what that means (the server's
  supervisor shuts the server down; a stream closes).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

Flush = Callable[[list[T]], Awaitable[None]]
"""Writes a batch of items, in order; raising means the writer crashed."""
OnError = Callable[[BaseException], None]
"""Told of a crash (an error of ``flush``, or the writer cancelled from outside)."""


class DrainError(Exception):
    """An item cannot be queued."""


class DrainFull(DrainError):
    """The queue holds as many items as its bound allows: the caller must not grow it."""


class DrainClosed(DrainError):
    """The drain was closed, aborted or crashed: it takes no more items."""


class Drain(Generic[T]):
    """A queue and, while it holds anything, the one task that hands it to ``flush``.

    ``bound`` limits the items waiting (those not yet handed to ``flush``); ``None`` means
    no limit. ``max_batch`` limits what one ``flush`` call gets, counted by ``weight``
    (1 per item unless given): a batch takes items while it weighs less than
    ``max_batch``, so one item always fits. ``paused`` drains start writing only at
    :meth:`resume` (items put meanwhile wait, in order).
    """

    def __init__(
        self,
        flush: Flush[T],
        *,
        name: str,
        bound: int | None = None,
        max_batch: int | None = None,
        weight: Callable[[T], int] | None = None,
        on_error: OnError | None = None,
        paused: bool = False,
    ) -> None:
        if bound is not None and bound < 1:
            raise ValueError(f"bound must be at least 1, not {bound}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.name = name
        self._flush = flush
        self._bound = bound
        self._max_batch = max_batch
        self._weight = weight
        self.on_error = on_error
        """Told of a crash; may be set after construction (by a supervisor)."""
        self._queue: deque[T] = deque()
        self._task: asyncio.Task[None] | None = None
        self._paused = paused
        self._closed = False
        self._aborted: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        """What crashed the writer; None while it has not."""

    # -- putting -------------------------------------------------------------------------

    def put(self, item: T) -> None:
        """Queue ``item`` and make sure a writer runs; never waits.

        Raises :class:`DrainFull` when ``bound`` items already wait (nothing is queued:
        the caller decides, e.g. a stream that cannot keep up is closed), and
        :class:`DrainClosed` once the drain is closed, aborted or broken."""
        if self._closed or self.error is not None:
            raise DrainClosed(f"{self.name} is {'broken' if self.error else 'closed'}")
        if self._bound is not None and len(self._queue) >= self._bound:
            raise DrainFull(f"{self.name} already holds {self._bound} items waiting")
        self._queue.append(item)
        self._start()

    def offer(self, item: T) -> bool:
        """:meth:`put` that answers False instead of raising."""
        try:
            self.put(item)
        except DrainError:
            return False
        return True

    def resume(self) -> None:
        """Start writing (a drain made with ``paused=True``)."""
        self._paused = False
        self._start()

    # -- state ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Items waiting (not yet handed to ``flush``)."""
        return len(self._queue)

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The writer while one runs (a supervisor or a test may watch or cancel it)."""
        return self._task

    @property
    def idle(self) -> bool:
        """Nothing waits and nothing is being written."""
        return (self._task is None or self._task.done()) and not self._queue

    @property
    def closed(self) -> bool:
        return self._closed

    # -- ending --------------------------------------------------------------------------

    async def wait(self) -> None:
        """Return once everything queued so far is written, or the writer has crashed
        (see :attr:`error`), or the drain is paused with nothing being written.

        Cancelling the caller does not cancel the writer."""
        while (task := self._task) is not None and not task.done():
            await asyncio.wait([task])

    async def close(self) -> None:
        """Take no more items, then :meth:`wait` for those already queued."""
        self._closed = True
        self._paused = False
        self._start()
        await self.wait()

    def abort(self) -> list[T]:
        """Stop now: take no more items, cancel a write in progress (not a crash: not
        reported) and return the items that were still waiting, in order."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._aborted = self._task
            self._task.cancel()
        left = list(self._queue)
        self._queue.clear()
        return left

    # -- the writer ----------------------------------------------------------------------

    def _start(self) -> None:
        running = self._task is not None and not self._task.done()
        if not running and self._queue and not self._paused and self.error is None:
            task = asyncio.create_task(self._run(), name=self.name)
            task.add_done_callback(self._ended)
            self._task = task

    def _batch(self) -> list[T]:
        queue = self._queue
        if self._max_batch is None:
            everything = list(queue)
            queue.clear()
            return everything
        if self._weight is None:
            count = min(self._max_batch, len(queue))
            return [queue.popleft() for _ in range(count)]
        batch: list[T] = []
        size = 0
        while queue and size < self._max_batch:
            item = queue.popleft()
            size += self._weight(item)
            batch.append(item)
        return batch

    async def _run(self) -> None:
        try:
            while self._queue and not self._paused:
                # No await between taking the batch and calling flush: flush's synchronous
                # start (e.g. closing what the batch took) runs before any other put.
                await self._flush(self._batch())
        except Exception as err:
            self._crashed(err)

    def _ended(self, task: asyncio.Task[None]) -> None:
        # A done callback rather than ``finally``: a task cancelled before its first step
        # never enters its body.
        if task.cancelled() and task is not self._aborted and self.error is None:
            self._crashed(asyncio.CancelledError(f"{self.name} was cancelled"))
        if self._task is task:
            self._task = None

    def _crashed(self, err: BaseException) -> None:
        self.error = err
        if self.on_error is None:
            log.error("%s crashed", self.name, exc_info=err)
            return
        try:
            self.on_error(err)
        except Exception:
            log.exception("the error hook of %s failed", self.name)
