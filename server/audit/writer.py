"""A bounded batch writer for high-volume audit events (stream and task lifecycle).

Events are queued without blocking the hot path and inserted in batches. The queue is
bounded: when it is full, ``submit`` waits, so back-pressure reaches the producer instead
of events being dropped. ``close`` flushes what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from server.audit.record import AuditRecord, record_in
from server.storage.database import Database

log = logging.getLogger(__name__)


class AuditWriter:
    def __init__(
        self,
        db: Database,
        *,
        max_queue: int = 10_000,
        batch_size: int = 500,
        flush_interval: float = 0.1,
    ) -> None:
        self._db = db
        self._queue: asyncio.Queue[AuditRecord] = asyncio.Queue(max_queue)
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def submit(self, record: AuditRecord) -> None:
        """Queue one event; waits only when the queue is full."""
        if self._closing:
            raise RuntimeError("audit writer is closed")
        await self._queue.put(record)

    async def flush(self) -> None:
        """Wait until everything queued so far is written."""
        await self._queue.join()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            await self.flush()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self._flush_interval
            while len(batch) < self._batch_size:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            await self._write(batch)
            for _ in batch:
                self._queue.task_done()

    async def _write(self, batch: list[AuditRecord]) -> None:
        delay = 0.1
        while True:
            try:
                async with self._db.transaction() as session:
                    await record_in(session, *batch)
                return
            except Exception:  # the database may be briefly away; keep the events and retry
                log.exception("audit batch of %d events not written; retrying", len(batch))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
