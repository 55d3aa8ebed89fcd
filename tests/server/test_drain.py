"""The one helper for "a single writer that drains a queue on demand" (server/drain.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from muster.server.drain import Drain, DrainClosed, DrainFull


class Recorder:
    """A flush that records its batches and notices two writers at once."""

    def __init__(self, *, gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.active = 0
        self.overlap = False
        self.gate = gate

    async def __call__(self, items: list[int]) -> None:
        self.active += 1
        self.overlap = self.overlap or self.active > 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)  # yield: puts and other writers would get in here
            self.batches.append(list(items))
        finally:
            self.active -= 1

    @property
    def written(self) -> list[int]:
        return [item for batch in self.batches for item in batch]


async def test_items_reach_flush_in_order_and_batch_while_a_write_runs() -> None:
    gate = asyncio.Event()
    flush = Recorder(gate=gate)
    drain: Drain[int] = Drain(flush, name="test")
    drain.put(0)
    await asyncio.sleep(0)  # the writer takes [0] and waits at the gate
    for item in range(1, 6):
        drain.put(item)
    assert len(drain) == 5
    gate.set()
    await drain.wait()
    assert flush.batches == [[0], [1, 2, 3, 4, 5]]
    assert drain.idle and drain.task is None


async def test_one_writer_under_concurrent_puts() -> None:
    flush = Recorder()
    drain: Drain[int] = Drain(flush, name="test", max_batch=3)

    async def producer(start: int) -> None:
        for item in range(start, start + 50):
            drain.put(item)
            if random.random() < 0.3:
                await asyncio.sleep(0)

    await asyncio.gather(*(producer(n * 1000) for n in range(8)))
    await drain.wait()
    assert not flush.overlap
    assert all(len(batch) <= 3 for batch in flush.batches)
    written = flush.written
    assert len(written) == 400
    for n in range(8):  # each producer's items in its own order
        mine = [item for item in written if n * 1000 <= item < n * 1000 + 50]
        assert mine == list(range(n * 1000, n * 1000 + 50))


async def test_max_batch_by_weight_takes_while_lighter_than_the_limit() -> None:
    flush = Recorder(gate=asyncio.Event())
    drain: Drain[int] = Drain(flush, name="test", max_batch=5, weight=lambda item: item)
    for item in (1, 3, 4, 9, 1):
        drain.put(item)
    assert flush.gate is not None
    flush.gate.set()
    await drain.wait()
    # 1+3 < 5 takes 4 too; 9 alone is over the limit but always fits; then 1.
    assert flush.batches == [[1, 3, 4], [9], [1]]


async def test_bound_refuses_past_it_and_counts_only_waiting_items() -> None:
    gate = asyncio.Event()
    flush = Recorder(gate=gate)
    drain: Drain[int] = Drain(flush, name="outbox", bound=2)
    drain.put(0)
    await asyncio.sleep(0)  # [0] is being written: it no longer counts
    drain.put(1)
    drain.put(2)
    with pytest.raises(DrainFull, match="outbox already holds 2 items"):
        drain.put(3)
    assert drain.offer(3) is False
    assert len(drain) == 2  # nothing of the refused items was queued
    gate.set()
    await drain.wait()
    assert flush.written == [0, 1, 2]
    assert drain.offer(4) is True
    await drain.wait()
    assert flush.written == [0, 1, 2, 4]


async def test_a_flush_error_goes_to_the_hook_once_and_breaks_the_drain() -> None:
    errors: list[BaseException] = []
    written: list[list[int]] = []
    gate = asyncio.Event()

    async def flush(items: list[int]) -> None:
        await gate.wait()
        if 2 in items:
            raise RuntimeError("disk on fire")
        written.append(items)

    drain: Drain[int] = Drain(flush, name="test", max_batch=1, on_error=errors.append)
    for item in range(5):
        drain.put(item)
    gate.set()
    await drain.wait()
    assert written == [[0], [1]]
    assert [str(err) for err in errors] == ["disk on fire"]
    assert isinstance(drain.error, RuntimeError)
    assert len(drain) == 2  # 3 and 4 were never handed to flush
    with pytest.raises(DrainClosed, match="broken"):
        drain.put(5)
    assert drain.abort() == [3, 4]
    assert len(errors) == 1


async def test_without_a_hook_a_crash_is_logged_with_the_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def flush(items: list[int]) -> None:
        raise ValueError("bad")

    drain: Drain[int] = Drain(flush, name="inflight-release")
    drain.put(1)
    await drain.wait()
    assert "inflight-release crashed" in caplog.text
    assert isinstance(drain.error, ValueError)


async def test_a_writer_cancelled_from_outside_is_a_crash() -> None:
    errors: list[BaseException] = []
    drain: Drain[int] = Drain(Recorder(gate=asyncio.Event()), name="test", on_error=errors.append)
    drain.put(1)
    await asyncio.sleep(0)
    task = drain.task
    assert task is not None
    task.cancel()
    await drain.wait()
    assert len(errors) == 1 and isinstance(errors[0], asyncio.CancelledError)
    assert drain.task is None
    assert drain.offer(2) is False


async def test_a_writer_cancelled_before_its_first_step_is_a_crash_too() -> None:
    errors: list[BaseException] = []
    drain: Drain[int] = Drain(Recorder(), name="test", on_error=errors.append)
    drain.put(1)
    task = drain.task
    assert task is not None
    task.cancel()  # the body never runs
    await drain.wait()
    assert len(errors) == 1 and drain.error is not None
    assert len(drain) == 1


async def test_cancelling_a_waiter_leaves_the_writer_alone() -> None:
    gate = asyncio.Event()
    flush = Recorder(gate=gate)
    drain: Drain[int] = Drain(flush, name="test")
    drain.put(1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(drain.wait(), 0.01)
    assert drain.task is not None and not drain.task.done()
    gate.set()
    await drain.wait()
    assert flush.written == [1] and drain.error is None


async def test_close_writes_what_is_queued_then_refuses() -> None:
    flush = Recorder()
    drain: Drain[int] = Drain(flush, name="test")
    for item in range(3):
        drain.put(item)
    await drain.close()
    assert flush.written == [0, 1, 2]
    assert drain.closed and drain.idle
    with pytest.raises(DrainClosed, match="closed"):
        drain.put(3)


async def test_abort_cancels_the_write_without_reporting_and_returns_the_rest() -> None:
    errors: list[BaseException] = []
    flush = Recorder(gate=asyncio.Event())
    drain: Drain[int] = Drain(flush, name="test", max_batch=1, on_error=errors.append)
    for item in range(3):
        drain.put(item)
    await asyncio.sleep(0)  # 0 is being written, stuck at the gate
    assert drain.abort() == [1, 2]
    await drain.wait()
    assert errors == [] and drain.error is None
    assert flush.written == []
    assert drain.offer(3) is False


async def test_a_paused_drain_queues_until_resumed() -> None:
    flush = Recorder()
    drain: Drain[int] = Drain(flush, name="test", paused=True)
    drain.put(1)
    drain.put(2)
    await drain.wait()  # returns: nothing is being written
    assert flush.written == [] and drain.task is None
    drain.resume()
    await drain.wait()
    assert flush.written == [1, 2]


async def test_put_from_inside_flush_is_written_after_by_the_same_writer() -> None:
    seen: list[list[int]] = []
    drain: Drain[int]

    async def flush(items: list[int]) -> None:
        seen.append(items)
        if items == [1]:
            drain.put(2)

    drain = Drain(flush, name="test")
    drain.put(1)
    await drain.wait()
    assert seen == [[1], [2]]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="bound"):
        Drain(Recorder(), name="test", bound=0)
    with pytest.raises(ValueError, match="max_batch"):
        Drain(Recorder(), name="test", max_batch=0)
