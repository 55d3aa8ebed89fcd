"""Group commit: the small writes of many concurrent callers share one transaction.

A no-op task is a handful of one-row changes (insert, claim, accept, finish), each too
small to be worth what every transaction costs: a pooled connection, BEGIN, COMMIT and
its WAL flush, the driver's round trips. Callers hand their work to :class:`GroupCommit`
instead; while one transaction runs, the work that arrives meanwhile waits and then
goes into the next one together. An idle server pays one transaction per change, as
before; a busy one pays one per batch, and batches grow with the load.

Work of one kind can also share a statement: :meth:`GroupCommit.run_many` gathers the
items handed in for the same key into one call of a function that changes them all
(one multi-row UPDATE instead of one UPDATE per row).

Work reads and writes only through the connection it is given and does nothing else
that cannot be undone: when a shared transaction fails, each of its units runs again
alone (a gathered call item by item), so one caller's error reaches only that caller.

Audit that survives a crash: a caller may hand in, with its item, a function that says
what its result is to leave in the audit trail. The records of every unit are appended
(through ``trail``, on this replica's hash chain) as the last statement of the same
transaction, so a transition commits with its audit rows or not at all, and a caller
learns of its transition only once both are durable. Last, because appending locks the
chain until the commit: a transaction holding that lock never waits for a row lock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from muster.server.drain import Drain, OnError

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - an item of gathered work
Work = Callable[[AsyncConnection], Awaitable[T]]
ManyWork = Callable[[AsyncConnection, Sequence[I]], Awaitable[Sequence[T]]]
"""Changes every item in one go; returns one result per item, in order."""
Audit = Callable[[T], Sequence[Any]]
"""What one item's result leaves in the audit trail (audit records; often none)."""
Trail = Callable[[AsyncConnection, list[Any]], Awaitable[None]]
"""Appends audit records on the connection of the transaction about to commit."""

MAX_BATCH = 256
"""Units per transaction: bounds how long one batch holds its row locks."""

log = logging.getLogger(__name__)

_RECORD = ("audit-record",)
"""The gathering key of :meth:`GroupCommit.record`."""


async def _nothing(_conn: AsyncConnection, items: Sequence[None]) -> list[None]:
    return [None] * len(items)


class _Unit(Generic[I, T]):
    """Items for one function, applied together, each with the future of its caller."""

    __slots__ = ("audited", "audits", "futures", "items", "key", "work")

    def __init__(self, work: ManyWork[I, T], key: Hashable = None) -> None:
        self.work = work
        self.key = key
        self.items: list[I] = []
        self.futures: list[asyncio.Future[T]] = []
        self.audits: list[Audit[T] | None] = []
        self.audited = False
        """Some item leaves audit records: the unit needs a transaction."""

    def add(self, item: I, audit: Audit[T] | None = None) -> asyncio.Future[T]:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.items.append(item)
        self.futures.append(future)
        self.audits.append(audit)
        self.audited = self.audited or audit is not None
        return future

    def records(self, results: Sequence[T]) -> list[Any]:
        """The audit records of these results, in item order."""
        if not self.audited:
            return []
        records: list[Any] = []
        for audit, result in zip(self.audits, results, strict=True):
            if audit is not None:
                records.extend(audit(result))
        return records

    @property
    def abandoned(self) -> bool:
        return all(f.cancelled() for f in self.futures)

    async def apply(self, conn: AsyncConnection) -> Sequence[T]:
        results = await self.work(conn, self.items)
        if len(results) != len(self.items):
            raise RuntimeError(f"{self.work!r} returned {len(results)} results for {len(self)}")
        return results

    def split(self) -> list[_Unit[I, T]]:
        """One unit per item, to find out whose item fails."""
        units = []
        for item, future, audit in zip(self.items, self.futures, self.audits, strict=True):
            unit: _Unit[I, T] = _Unit(self.work)
            unit.items.append(item)
            unit.futures.append(future)
            unit.audits.append(audit)
            unit.audited = audit is not None
            units.append(unit)
        return units

    def settle(self, results: Sequence[T]) -> None:
        for future, result in zip(self.futures, results, strict=True):
            if not future.done():
                future.set_result(result)

    def fail(self, err: BaseException) -> None:
        for future in self.futures:
            if not future.done():
                future.set_exception(err)

    def __len__(self) -> int:
        return len(self.items)


class GroupCommit:
    """Runs units of work in shared transactions, one transaction at a time.

    The transactions are written by one :class:`~muster.server.drain.Drain`. Should its
    writer crash (a bug outside the per-unit error handling, or its task cancelled), the
    units still queued fail, later work is refused, and ``on_crash`` (the server's
    supervisor) is told: nothing waits forever on a group commit that no longer runs."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        trail: Trail | None = None,
        max_batch: int = MAX_BATCH,
        on_crash: OnError | None = None,
    ) -> None:
        self._engine = engine
        self._trail = trail
        self._lone_autocommit = engine.dialect.name == "postgresql"
        """A lone gathered unit runs without BEGIN and COMMIT (see run_many)."""
        self._max_batch = max_batch
        self.on_crash = on_crash
        """Told when the writer crashes (after the queued units have failed)."""
        self._runner: Drain[_Unit[Any, Any]] = Drain(
            self._flush,
            name="group-commit",
            max_batch=max_batch,
            weight=len,
            on_error=self._crashed,
        )
        self._gathering: dict[Hashable, _Unit[Any, Any]] = {}
        """Units of run_many still open for more items (not yet taken into a batch)."""
        self.transactions = 0
        self.items = 0
        """Committed so far: items per transaction = items / transactions."""

    @property
    def drain(self) -> Drain[_Unit[Any, Any]]:
        """The single writer of the transactions (a supervisor watches its crashes)."""
        return self._runner

    async def run(self, work: Work[T], *, audit: Audit[T] | None = None) -> T:
        """Run ``work`` in the next shared transaction; its result once that has committed
        (with the audit records ``audit`` makes of it)."""

        async def one(conn: AsyncConnection, _: Sequence[None]) -> list[T]:
            return [await work(conn)]

        self._check(audit)
        unit: _Unit[None, T] = _Unit(one)
        future: asyncio.Future[T] = unit.add(None, audit)
        self._runner.put(unit)
        return await future

    async def run_many(
        self, key: Hashable, work: ManyWork[I, T], item: I, *, audit: Audit[T] | None = None
    ) -> T:
        """Hand ``item`` to the call of ``work`` gathering items for ``key`` in the next
        transaction; the result ``work`` returned for it once that has committed, with the
        audit records ``audit`` makes of that result.

        ``work`` must be correct without a transaction around it: one statement, or
        statements each safe alone. On Postgres a transaction that would hold nothing but
        this one call, and no audit records, runs it in autocommit instead, saving BEGIN
        and COMMIT (two of its three round trips): an idle server answers sooner."""
        return await self.submit_many(key, work, item, audit=audit)

    def submit_many(
        self, key: Hashable, work: ManyWork[I, T], item: I, *, audit: Audit[T] | None = None
    ) -> asyncio.Future[T]:
        """:meth:`run_many` without waiting: the item is queued before this returns, so
        work handed in afterwards runs after it (in the same transaction or a later one)."""
        self._check(audit)
        unit = self._gathering.get(key)
        if unit is None or len(unit) >= self._max_batch:
            unit = _Unit(work, key)
            self._runner.put(unit)
            self._gathering[key] = unit
        future: asyncio.Future[T] = unit.add(item, audit)
        return future

    async def record(self, records: Sequence[Any]) -> None:
        """Append audit records alone (no other change), in the next shared transaction;
        returns once they are committed."""
        await self.run_many(_RECORD, _nothing, None, audit=lambda _: records)

    def _check(self, audit: Audit[Any] | None) -> None:
        if audit is not None and self._trail is None:
            raise RuntimeError("this group commit has no audit trail to append to")

    async def close(self) -> None:
        """Wait for the work already handed in."""
        await self._runner.wait()

    async def _flush(self, batch: list[_Unit[Any, Any]]) -> None:
        # Runs at once when the drain takes the batch: later items go to new units.
        for unit in batch:
            if unit.key is not None and self._gathering.get(unit.key) is unit:
                del self._gathering[unit.key]
        batch = [unit for unit in batch if not unit.abandoned]
        if batch:
            await self._commit(batch)

    def _crashed(self, err: BaseException) -> None:
        self._gathering.clear()
        stopped = RuntimeError("the group commit stopped: its writer crashed")
        stopped.__cause__ = err
        for unit in self._runner.abort():
            unit.fail(stopped)
        if self.on_crash is not None:
            self.on_crash(err)
        else:
            log.error("the group commit's writer crashed", exc_info=err)

    async def _commit(self, batch: list[_Unit[Any, Any]]) -> None:
        results: list[Sequence[Any]] = []
        try:
            if (
                self._lone_autocommit
                and len(batch) == 1
                and batch[0].key is not None
                and not batch[0].audited
            ):
                async with self._engine.connect() as conn:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                    results.append(await batch[0].apply(conn))
            else:
                async with self._engine.begin() as conn:
                    for unit in batch:
                        results.append(await unit.apply(conn))
                    records = [
                        record
                        for unit, result in zip(batch, results, strict=True)
                        for record in unit.records(result)
                    ]
                    if records:
                        assert self._trail is not None  # _check saw to it
                        await self._trail(conn, records)
        except Exception as err:
            if len(batch) == 1 and len(batch[0]) == 1:
                batch[0].fail(err)
                return
            # Someone's item failed (or the commit did): nothing of the batch is written.
            # Each item runs again alone, so only a failing one sees its error.
            log.debug("shared transaction of %d units failed (%s); retrying alone", len(batch), err)
            for unit in batch:
                for single in unit.split():
                    await self._commit([single])
            return
        except BaseException as err:  # cancelled while committing: callers must not hang
            for unit in batch:
                unit.fail(err)
            raise
        self.transactions += 1
        for unit, result in zip(batch, results, strict=True):
            self.items += len(unit)
            unit.settle(result)
