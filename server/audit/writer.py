"""A bounded batch writer for audit events that need not hold up their source, losing none
while the process lives.

Task and stream transitions do not come here: they are committed with the transition
(see :mod:`muster.server.storage.batch`). What does (authentication failures, lockouts,
suspicious agents, other notices) is held in memory for up to ``flush_interval`` before
it is written, so a process killed meanwhile (SIGKILL, OOM, power) loses what it held;
:meth:`AuditWriter.keep` waits until one event is durable instead.

Events are encoded once when submitted (canonical JSON for the hash chain, the column
values), buffered without blocking the hot path and written in batches, each in one
transaction (on Postgres with COPY); a retry skips event ids already stored (so a retry
after a lost commit acknowledgement inserts nothing twice). A backlog is written in
bigger batches (up to ``max_batch``). When a batch cannot be written, it goes to an
fsynced spool on local disk (:mod:`muster.server.audit.spool`) and so does every later event,
until a replay has moved the whole spool, oldest first, into the database: the order of
the batch-written events in the chain is the order they were submitted. A spool left
by an earlier run is replayed at start. The buffer is bounded: when it is full,
``submit`` waits, so back-pressure reaches the producer instead of events being dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from muster.server.audit import spool
from muster.server.audit.record import AuditRecord, append_new
from muster.server.audit.spool import Segment
from muster.server.storage.database import Database

log = logging.getLogger(__name__)

MAX_RETRY_DELAY = 2.0
"""Longest pause between attempts to reach the database again (a refused attempt is cheap)."""
MAX_BATCH = 2000
"""Default for the most events written in one transaction when a backlog has built up."""


class AuditWriter:
    """Buffers audit events and writes them in batches; spools them while the database is away.

    Without ``spool_path`` a batch that cannot be written is retried in memory (the
    buffer then fills and ``submit`` waits). A write still pending after
    ``stall_timeout`` while the buffer is half full counts as a hanging database: the
    batch and what follows go to the spool.
    """

    def __init__(
        self,
        db: Database,
        *,
        spool_path: Path | None = None,
        max_queue: int = 10_000,
        batch_size: int = 500,
        max_batch: int = MAX_BATCH,
        flush_interval: float = 0.1,
        db_timeout: float = 5.0,
        stall_timeout: float = 2.0,
    ) -> None:
        self._db = db
        self._spool_dir = spool_path
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._max_batch = max(batch_size, max_batch)
        self._flush_interval = flush_interval
        self._db_timeout = db_timeout
        self._stall_timeout = stall_timeout
        self._buffer: collections.deque[AuditRecord] = collections.deque()
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._progress = asyncio.Event()
        self._submitted = 0
        """Events accepted so far, numbered in order from 1."""
        self._stored = 0
        """Every event numbered up to this one is in the database."""
        self._kept = 0
        """Every event numbered up to this one is in the database or fsynced in the spool."""
        self._taken = 0
        """Every event numbered up to this one has left the buffer."""
        self._segments: collections.deque[Segment] = collections.deque()
        """Spooled events not yet replayed, oldest segment first."""
        self._active: Segment | None = None
        """This run's segment, the one new events are appended to (always the last)."""
        self._marks: collections.deque[tuple[Segment, int, int]] = collections.deque()
        """(segment, end offset, last event number) per batch spooled by this run."""
        self._next_replay = 0.0
        self._replay_delay = 0.0
        self._flush_waiters = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        """Events waiting in memory (the buffer and the batch being written)."""
        return len(self._buffer) + self._in_flight

    @property
    def spool_bytes(self) -> int:
        """Bytes of events in the spool, waiting for the database."""
        return sum(segment.size for segment in self._segments)

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The writing loop once started: it ends only at :meth:`close` (the server's
        supervisor watches it)."""
        return self._task

    def start(self) -> None:
        """Adopt an earlier run's spool (replayed first) and start writing."""
        if self._spool_dir is not None:
            self._segments.extend(spool.adopt_all(self._spool_dir))
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def submit(self, record: AuditRecord) -> None:
        """Queue one event; waits only when the buffer is full.

        Raises ValueError or TypeError at once for a record that could never be stored.
        """
        if self._closing:
            raise RuntimeError("audit writer is closed")
        record.check()
        while len(self._buffer) >= self._max_queue:
            self._space.clear()
            await self._space.wait()
        if self._closing and (self._task is None or self._task.done()):
            raise RuntimeError("audit writer is closed")  # nobody left to write it
        self._buffer.append(record)
        self._submitted += 1
        if len(self._buffer) >= self._batch_size or len(self._buffer) == 1:
            self._wake.set()

    async def keep(self, record: AuditRecord) -> None:
        """Queue one event and wait until it is durable: in the database or, while that is
        unreachable, fsynced in the spool (without a spool: in the database)."""
        await self.submit(record)
        await self._wait_for(self._submitted, spooled=self._spool_dir is not None)

    async def flush(self) -> None:
        """Wait until every event submitted so far is in the database (spooled ones too)."""
        await self._wait_for(self._submitted, spooled=False)

    async def _wait_for(self, target: int, *, spooled: bool) -> None:
        """Wait until the events numbered up to ``target`` are stored (or ``spooled``)."""
        self._flush_waiters += 1
        try:
            while (self._kept if spooled else self._stored) < target:
                if self._task is None or self._task.done():
                    raise RuntimeError("audit writer is not running")
                self._wake.set()
                await self._progress.wait()
        finally:
            self._flush_waiters -= 1

    async def close(self) -> None:
        """Write what is buffered to the database or, failing that, to the spool; then stop."""
        self._closing = True
        self._wake.set()
        self._space.set()
        if self._task is not None:
            await asyncio.wait([self._task])  # a crash was the supervisor's to report
            crashed = self._task.cancelled() or self._task.exception() is not None
            if crashed and (self._buffer or self._segments):
                # Its last pass, here: what is buffered goes to the database or spool.
                log.warning("the audit writer had stopped; writing what it held")
                await self._run()
        for segment in self._segments:
            segment.close()
        self._segments.clear()
        self._active = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    batch = await self._collect()
                    if batch:
                        await self._handle(batch)
                    if self._segments and (self._closing or loop.time() >= self._next_replay):
                        await self._replay(drain=True)
                    if self._closing and not self._buffer:
                        return
                except Exception:  # a bug must not end audit writing; events stay buffered
                    log.exception("audit writer pass failed")
                    await asyncio.sleep(1.0)
        finally:
            self._progress.set()  # flush() waiters see that the writer is gone

    async def _collect(self) -> list[AuditRecord]:
        """The next batch: up to ``batch_size`` events, waiting ``flush_interval`` for more;
        everything waiting (up to ``max_batch``) when there is more than that."""
        loop = asyncio.get_running_loop()
        if not self._buffer and not self._closing:
            timeout = None
            if self._segments:
                timeout = max(0.0, self._next_replay - loop.time())
            self._wake.clear()
            await _wait(self._wake, timeout)
        if not self._buffer:
            return []
        deadline = loop.time() + self._flush_interval
        while (
            len(self._buffer) < self._batch_size
            and not self._closing
            and not self._flush_waiters
            and loop.time() < deadline
        ):
            self._wake.clear()
            await _wait(self._wake, deadline - loop.time())
        return self._take(min(max(len(self._buffer), self._batch_size), self._max_batch))

    def _take(self, count: int) -> list[AuditRecord]:
        batch = [self._buffer.popleft() for _ in range(min(count, len(self._buffer)))]
        self._in_flight += len(batch)
        self._taken += len(batch)
        self._space.set()
        return batch

    async def _handle(self, batch: list[AuditRecord]) -> None:
        """Get one batch into the database or the spool, in order; keep trying till one takes it."""
        last = self._taken
        delay = 0.1
        attempts = 0
        while True:
            if not self._segments:
                try:
                    await self._guarded_store(batch, spool_meanwhile=False, unseen=not attempts)
                except Exception as err:
                    failed: BaseException | None = err
                else:
                    self._in_flight -= len(batch)
                    self._advance(last)
                    return
            else:
                failed = None  # spooled events go first: this batch queues behind them
            if self._spool_dir is not None:
                try:
                    await self._append(batch, last)
                except Exception:  # a full or failing disk: hold the batch, try both again
                    log.exception("cannot spool %d audit events; holding them", len(batch))
                else:
                    self._in_flight -= len(batch)
                    self._keep_to(last)
                    if failed is not None:
                        log.warning(
                            "audit batch of %d events not written (%s); spooling to %s",
                            len(batch),
                            describe_error(failed),
                            self._spool_dir,
                        )
                        self._schedule_replay(failed=True)
                    return
            elif failed is not None:
                log.warning(
                    "audit batch of %d events not written (%s); retrying",
                    len(batch),
                    describe_error(failed),
                )
            attempts += 1
            if self._closing and attempts >= 3:
                self._last_resort(batch)
                self._in_flight -= len(batch)
                self._advance(last)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)
            if self._segments:
                await self._replay(drain=False)  # nothing may overtake this batch

    async def _guarded_store(
        self, records: Sequence[AuditRecord], *, spool_meanwhile: bool, unseen: bool = False
    ) -> None:
        """:meth:`_store`, without letting a hanging database stop events from being accepted.

        While the insert is pending, new events are spooled behind it (``spool_meanwhile``,
        when ``records`` come from the spool), or else, once the buffer is half full and the
        insert has taken ``stall_timeout``, it is abandoned (TimeoutError) so the caller
        spools ``records`` and what follows.
        An abandoned insert may still commit: replaying skips what is already stored.
        ``unseen``: no attempt to store ``records`` was made before (see :func:`append_new`).
        """
        task = asyncio.ensure_future(self._store(records, unseen))
        stalled = asyncio.get_running_loop().time() + self._stall_timeout
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=self._flush_interval)
                if task.done() or self._spool_dir is None:
                    continue
                if spool_meanwhile and self._buffer:
                    await self._spool_buffer()
                elif (
                    not spool_meanwhile
                    and len(self._buffer) >= self._max_queue // 2
                    and asyncio.get_running_loop().time() >= stalled
                ):
                    raise TimeoutError("database too slow while events pile up")
            task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _spool_buffer(self) -> None:
        """Spool everything buffered, behind what is spooled already."""
        batch = self._take(len(self._buffer))
        try:
            await self._append(batch, self._taken)
        except BaseException:
            self._buffer.extendleft(reversed(batch))  # back, in order
            self._taken -= len(batch)
            raise
        finally:
            self._in_flight -= len(batch)
        self._keep_to(self._taken)  # nothing numbered lower is in limbo: callers see to it

    async def _store(self, records: Sequence[AuditRecord], unseen: bool) -> None:
        """Insert in one transaction; events the database refuses as invalid are set aside.

        Raises when the database is unreachable (or too slow): the caller spools or retries.
        """
        if not records:
            return
        try:
            await self._insert(records, unseen=unseen)
        except Exception as err:
            if not _is_bad_data(err):
                raise
        else:
            return
        for record in records:  # find the refused ones; keep the rest, in order
            for attempt in (1, 2):
                try:
                    await self._insert([record])
                    break
                except Exception as err:
                    if not _is_bad_data(err) or not await self._reachable():
                        raise
                    if attempt == 2:
                        self._set_aside(record, err)

    async def _insert(self, records: Sequence[AuditRecord], *, unseen: bool = False) -> None:
        async def attempt() -> None:
            async with self._db.transaction() as session:
                await append_new(session, records, unseen=unseen)

        await asyncio.wait_for(attempt(), self._db_timeout)

    async def _reachable(self) -> bool:
        """Whether the database answers at all (so a refusal is about the data, not an outage)."""

        async def probe() -> None:
            async with self._db.transaction() as session:
                await session.execute(text("SELECT 1"))

        try:
            await asyncio.wait_for(probe(), self._db_timeout)
        except Exception:
            return False
        return True

    def _set_aside(self, record: AuditRecord, err: BaseException) -> None:
        log.error(
            "audit event %s (%s) refused by the database as invalid (%s); kept in %s",
            record.event_id,
            record.action,
            describe_error(err),
            self._spool_dir / spool.REJECTED if self._spool_dir else "this log",
        )
        if self._spool_dir is None:
            log.error("refused audit event: %s", spool.encode(record).decode().strip())
            return
        try:
            spool.reject(self._spool_dir, [record])
        except OSError:
            log.exception("cannot keep it; the event: %s", spool.encode(record).decode().strip())

    async def _append(self, records: list[AuditRecord], last: int) -> None:
        """Spool ``records`` (numbered up to ``last``) behind everything spooled before."""
        assert self._spool_dir is not None
        if self._active is None:
            self._active = await asyncio.to_thread(Segment.create, self._spool_dir)
            self._segments.append(self._active)
        segment = self._active
        await asyncio.to_thread(segment.append, records)
        self._marks.append((segment, segment.size, last))

    async def _replay(self, *, drain: bool) -> None:
        """Move the spool into the database, oldest first; on failure try again later.

        With ``drain``, a buffer filling up meanwhile is spooled behind what is replayed.
        """
        replayed = 0
        try:
            while self._segments:
                segment = self._segments[0]
                while segment.read_offset < segment.size:
                    records, end = await asyncio.to_thread(
                        segment.read, segment.read_offset, self._max_batch
                    )
                    await self._guarded_store(records, spool_meanwhile=drain)
                    segment.read_offset = end
                    replayed += len(records)
                    self._replayed_to(segment, end)
                    if drain and len(self._buffer) >= self._max_queue // 2:
                        await self._spool_buffer()  # keep producers moving during a long replay
                await asyncio.to_thread(segment.remove)
                self._segments.popleft()
                if segment is self._active:
                    self._active = None
        except Exception as err:
            self._schedule_replay(failed=True)
            log.log(
                logging.WARNING if self._replay_delay >= MAX_RETRY_DELAY else logging.DEBUG,
                "audit spool replay paused after %d events (%s); next try in %.1fs",
                replayed,
                describe_error(err),
                self._replay_delay,
            )
            return
        self._schedule_replay(failed=False)
        log.info("audit spool replayed: %d events are in the database", replayed)

    def _replayed_to(self, segment: Segment, offset: int) -> None:
        while self._marks and self._marks[0][0] is segment and self._marks[0][1] <= offset:
            self._advance(self._marks.popleft()[2])

    def _advance(self, last: int) -> None:
        if last > self._stored:
            self._stored = last
            self._keep_to(last)

    def _keep_to(self, last: int) -> None:
        self._kept = max(self._kept, last)
        self._progress.set()
        self._progress = asyncio.Event()

    def _schedule_replay(self, *, failed: bool) -> None:
        loop = asyncio.get_running_loop()
        if failed:
            self._replay_delay = min(max(self._replay_delay * 2, 0.1), MAX_RETRY_DELAY)
        else:
            self._replay_delay = 0.0
        self._next_replay = loop.time() + self._replay_delay

    def _last_resort(self, batch: list[AuditRecord]) -> None:
        """Closing with neither database nor spool: the log is the only place left."""
        log.error("audit writer closing with %d events it could not store:", len(batch))
        for record in batch:
            log.error("unstored audit event: %s", spool.encode(record).decode().strip())


async def _wait(event: asyncio.Event, seconds: float | None) -> None:
    """Wait for ``event`` at most ``seconds`` (None: no limit)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _is_bad_data(err: BaseException) -> bool:
    """The database refused the data itself: retrying the same rows can never succeed."""
    if isinstance(err, sa_exc.DBAPIError):
        return isinstance(err, sa_exc.DataError | sa_exc.IntegrityError)
    if isinstance(err, asyncpg.PostgresError):  # from COPY, which bypasses SQLAlchemy
        return isinstance(err, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError)
    return isinstance(err, sa_exc.StatementError | TypeError | ValueError)


def describe_error(err: BaseException) -> str:
    """A short account of a database error: no SQL, no parameters."""
    cause = err.orig if isinstance(err, sa_exc.DBAPIError) and err.orig is not None else err
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    name = type(cause).__name__
    return f"{name}: {text[:200]}" if text else name
