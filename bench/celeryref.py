"""The peers a user would pick instead: Celery with a Redis broker and result backend, and
Celery with a durable RabbitMQ setup (``bench/celeryapp.py`` says which settings); no-op
tasks, a prefork worker of concurrency 2 each. Measured from the harness through Celery's
own client API, in a worker thread, because that API is synchronous."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.stack import REDIS_URL, delete_redis_prefix

LABELS = {"redis": "Celery + Redis", "rabbitmq": "Celery + RabbitMQ"}


@dataclass
class CeleryRef:
    peer: str
    prefix: str
    app: Any
    noop: Any

    @property
    def label(self) -> str:
        return LABELS[self.peer]

    def throughput(self, count: int) -> float:
        """Tasks/s from the first submission until every result is in the backend."""
        from celery.result import ResultSet  # type: ignore[import-untyped]

        started = time.perf_counter()
        results = [self.noop.apply_async() for _ in range(count)]
        ResultSet(results, app=self.app).join_native(timeout=600, interval=0.005)
        elapsed = time.perf_counter() - started
        self._forget(results)
        return count / elapsed

    def round_trips(self, count: int) -> list[float]:
        """Seconds for ``delay().get()`` of one task at a time."""
        out = []
        for _ in range(count):
            started = time.perf_counter()
            r = self.noop.delay()
            r.get(timeout=30)
            out.append(time.perf_counter() - started)
            self._forget([r])
        return out

    def _forget(self, results: list[Any]) -> None:
        # Redis keeps results until they expire; the rpc backend has nothing to forget
        # (the result was a message, consumed by get/join).
        if self.peer == "redis":
            for r in results:
                r.forget()


async def rabbitmqctl(*args: str) -> str:
    """``rabbitmqctl`` (the broker's own admin tool; vhosts have no AMQP verb)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise RuntimeError("rabbitmqctl not found: the RabbitMQ peer needs a local RabbitMQ")
    return await procs.run([ctl, "-q", *args], timeout=60)


@asynccontextmanager
async def celery_reference(workdir: Path, peer: str = "redis") -> AsyncIterator[CeleryRef]:
    """A Celery worker (``-c 2``, prefork) for ``peer`` on a queue (and, for RabbitMQ, a
    virtual host) of its own; stopped and cleaned up after."""
    from bench import celeryapp

    prefix = f"{celeryapp.PREFIX}-{peer}"
    vhost = prefix if peer == "rabbitmq" else ""
    if vhost:
        await rabbitmqctl("add_vhost", vhost)
    try:
        app = celeryapp.make_app(peer, prefix, vhost)
        env = procs.child_env(
            BENCH_CELERY_PEER=peer,
            BENCH_CELERY_PREFIX=prefix,
            BENCH_CELERY_VHOST=vhost,
            BENCH_REDIS_URL=REDIS_URL,
            BENCH_RABBITMQ_URL=celeryapp.RABBITMQ_URL,
        )
        if vhost:
            await rabbitmqctl("set_permissions", "-p", vhost, _amqp_user(), ".*", ".*", ".*")
        log_path = workdir / f"celery-{peer}-worker.log"
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
            log_path=log_path,
            env=env,
        )
        try:
            ref = CeleryRef(peer, prefix, app, app.tasks["bench.noop"])
            # Ready when a task goes through; the first also warms both connections.
            await asyncio.to_thread(_wait_ready, ref, worker, log_path)
            yield ref
        finally:
            await procs.stop(worker, timeout=20)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(app.close)
    finally:
        if vhost:
            await rabbitmqctl("delete_vhost", vhost)
        else:
            await delete_redis_prefix(prefix)


def _amqp_user() -> str:
    from urllib.parse import urlsplit

    from bench import celeryapp

    return urlsplit(celeryapp.RABBITMQ_URL).username or "guest"


def _wait_ready(ref: CeleryRef, worker: Any, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if worker.returncode is not None:
            raise RuntimeError(f"celery worker exited: {procs.log_tail(log_path)}")
        try:
            ref.noop.delay().get(timeout=5)
            ref.round_trips(20)
            return
        except Exception:  # not ready yet: keep trying until the deadline
            time.sleep(0.2)
    raise TimeoutError(f"the {ref.label} worker did not answer within 60s")


@asynccontextmanager
async def celery_references(workdir: Path) -> AsyncIterator[list[CeleryRef]]:
    """Both peers, Redis first, each with its own worker; both cleaned up after."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(celery_reference(workdir, p)) for p in LABELS]
