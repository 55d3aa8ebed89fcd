"""Dispatch load shared by several scenarios: simulated agents on some replicas, submitters
on the api listeners, and the clock that says how long N no-op tasks took end to end."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import muster
from bench.fleet import Fleet, combined, start_fleets, wait_until, write_creds
from bench.simagent import KIND, Creds, enroll_many
from bench.stack import Replica
from muster import AsyncClient

SUBMIT_CONCURRENCY = 32
BATCH = 100
"""Tasks per SubmitMany call."""
BATCH_CONCURRENCY = 4
"""SubmitMany calls in flight at once."""


@dataclass
class DispatchRun:
    tasks: int
    seconds: float
    submitted: list[tuple[float, str]] = field(default_factory=list)
    """(monotonic send time, task id) per submission."""

    @property
    def throughput(self) -> float:
        return self.tasks / self.seconds


async def enroll_to_file(replica: Replica, count: int, path: Path, prefix: str) -> list[Creds]:
    async with replica.admin() as admin:
        creds = await enroll_many(
            admin, replica.api, replica.bundle_path.read_bytes(), count, prefix=prefix
        )
    write_creds(path, creds)
    return creds


@asynccontextmanager
async def agents_on(
    replicas: Sequence[Replica],
    creds_file: Path,
    count: int,
    workdir: Path,
    *,
    record: bool = False,
    max_concurrency: int = 4,
) -> AsyncIterator[list[Fleet]]:
    """``count`` simulated agents spread round-robin over ``replicas``, all connected."""
    assignments = [(i, replicas[i % len(replicas)].agent) for i in range(count)]
    fleets = await start_fleets(
        creds_file,
        assignments,
        log_dir=workdir,
        name="agents",
        record=record,
        max_concurrency=max_concurrency,
    )
    try:
        await wait_until(fleets, lambda s: s.connected >= count, 120, f"{count} agents to connect")
        yield fleets
    finally:
        await asyncio.gather(*(f.stop() for f in fleets))


@asynccontextmanager
async def clients_for(replicas: Sequence[Replica]) -> AsyncIterator[list[AsyncClient]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(r.client()) for r in replicas]


async def dispatch(
    clients: Sequence[AsyncClient],
    fleets: list[Fleet],
    count: int,
    *,
    concurrency: int = SUBMIT_CONCURRENCY,
    rate: float | None = None,
    timeout: float = 300,
) -> DispatchRun:
    """Submit ``count`` no-op tasks (as fast as ``concurrency`` allows, or at ``rate`` per
    second) and wait until the agents hold an Ack for each: the result is recorded."""
    before = combined(fleets).acked
    submitted: list[tuple[float, str]] = []
    counter = itertools.count()
    started = time.monotonic()

    async def submit(i: int) -> None:
        sent = time.monotonic()
        task = await clients[i % len(clients)].submit(KIND, b"", max_attempts=1)
        submitted.append((sent, task.task_id))

    async def closed_loop() -> None:
        while (i := next(counter)) < count:
            await submit(i)

    if rate is None:
        await asyncio.gather(*(closed_loop() for _ in range(concurrency)))
    else:
        pending: set[asyncio.Task[None]] = set()
        for i in range(count):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(submit(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
    status = await wait_until(
        fleets, lambda s: s.acked >= before + count, timeout, f"{count} results to be acked"
    )
    return DispatchRun(count, status.last_ack - started, submitted)


def schedule_to_start(run: DispatchRun, assigned: dict[str, float]) -> list[float]:
    """Seconds from sending Submit to the agent holding the Assignment, per task."""
    return [assigned[t] - sent for sent, t in run.submitted if t in assigned]


def submit_many_missing() -> str:
    """Why the SubmitMany API cannot be used here, or "" when it can."""
    if getattr(muster, "TaskSpec", None) is None:
        return "muster.TaskSpec is not in this SDK"
    if getattr(AsyncClient, "submit_many", None) is None:
        return "AsyncClient.submit_many is not in this SDK"
    return ""


async def dispatch_many(
    clients: Sequence[AsyncClient],
    fleets: list[Fleet],
    count: int,
    *,
    batch: int = BATCH,
    concurrency: int = BATCH_CONCURRENCY,
    timeout: float = 300,
) -> DispatchRun:
    """Like :func:`dispatch`, with ``batch`` tasks per ``submit_many`` call and ``concurrency``
    calls in flight; a refused item fails the run (nothing here should be refused)."""
    spec: Any = vars(muster)["TaskSpec"]  # looked up so the harness runs on SDKs without it
    before = combined(fleets).acked
    batches = [min(batch, count - i) for i in range(0, count, batch)]
    counter = itertools.count()
    started = time.monotonic()

    async def closed_loop() -> None:
        while (i := next(counter)) < len(batches):
            client: Any = clients[i % len(clients)]
            items = [spec(kind=KIND, payload=b"", max_attempts=1) for _ in range(batches[i])]
            for outcome in await client.submit_many(items):
                if outcome.error is not None:
                    raise RuntimeError(f"submit_many refused an item: {outcome.error}")

    await asyncio.gather(*(closed_loop() for _ in range(concurrency)))
    status = await wait_until(
        fleets, lambda s: s.acked >= before + count, timeout, f"{count} results to be acked"
    )
    return DispatchRun(count, status.last_ack - started)
