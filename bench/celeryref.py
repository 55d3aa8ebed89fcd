"""The peer a user would pick instead: Celery with Redis broker and result backend, no-op
tasks, a prefork worker of concurrency 2. Measured from the harness through Celery's own
client API, in a worker thread, because that API is synchronous."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.stack import REDIS_URL, delete_redis_prefix


@dataclass
class CeleryRef:
    prefix: str
    app: Any
    noop: Any

    def throughput(self, count: int) -> float:
        """Tasks/s from the first submission until every result is in the backend."""
        from celery.result import ResultSet  # type: ignore[import-untyped]

        started = time.perf_counter()
        results = [self.noop.apply_async() for _ in range(count)]
        ResultSet(results, app=self.app).join_native(timeout=600, interval=0.005)
        elapsed = time.perf_counter() - started
        for r in results:
            r.forget()
        return count / elapsed

    def round_trips(self, count: int) -> list[float]:
        """Seconds for ``delay().get()`` of one task at a time."""
        out = []
        for _ in range(count):
            started = time.perf_counter()
            r = self.noop.delay()
            r.get(timeout=30)
            out.append(time.perf_counter() - started)
            r.forget()
        return out


@asynccontextmanager
async def celery_reference(workdir: Path) -> AsyncIterator[CeleryRef]:
    """A Celery worker (``-c 2``, prefork) on a queue of its own; stopped and cleaned up after."""
    from bench import celeryapp

    prefix = celeryapp.PREFIX
    env = procs.child_env(BENCH_CELERY_PREFIX=prefix, BENCH_REDIS_URL=REDIS_URL)
    worker = await procs.spawn(
        [
            procs.PYTHON,
            "-m",
            "celery",
            "-A",
            "bench.celeryapp",
            "worker",
            "--concurrency",
            "2",
            "--pool",
            "prefork",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--hostname",
            f"{prefix}@%h",
        ],
        log_path=workdir / "celery-worker.log",
        env=env,
    )
    try:
        ref = CeleryRef(prefix, celeryapp.app, celeryapp.noop)
        # Ready when a task goes through; the first also warms both connections.
        await asyncio.to_thread(_wait_ready, ref, worker, workdir)
        yield ref
    finally:
        await procs.stop(worker, timeout=20)
        await delete_redis_prefix(prefix)


def _wait_ready(ref: CeleryRef, worker: Any, workdir: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if worker.returncode is not None:
            raise RuntimeError(
                f"celery worker exited: {procs.log_tail(workdir / 'celery-worker.log')}"
            )
        try:
            ref.noop.delay().get(timeout=5)
            ref.round_trips(20)
            return
        except Exception:  # not ready yet: keep trying until the deadline
            time.sleep(0.2)
    raise TimeoutError("the celery worker did not answer within 60s")
