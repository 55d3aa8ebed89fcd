"""Load the way users make it: real ``muster agent`` daemons (the executor path, outbox
included) running the shipped no-op executor ``echo``, fed by SDK callers that submit a
task and wait for its result with the blocking ``muster.Client``, one caller per thread."""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import muster
from bench import procs
from bench.stack import Replica

KIND = "echo"
"""The daemon's cheapest executor: returns the payload; an empty payload is a no-op."""
CONCURRENCY = 4
"""Slots per daemon, as the simulated agents have."""
CALLERS = 32
"""Concurrent SDK callers, as many as the simulated path's submitters."""


@asynccontextmanager
async def daemons_on(
    replica: Replica, count: int, workdir: Path, *, concurrency: int = CONCURRENCY
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """``count`` ``muster agent`` processes enrolled through ``replica`` with one bootstrap
    token, each in a state dir of its own, all connected; drained (SIGTERM) on exit."""
    async with replica.admin() as admin:
        _, token = await admin.create_bootstrap_token("default", ttl=3600, max_uses=count)
    workdir.mkdir(parents=True, exist_ok=True)
    names = [f"daemon-{i}" for i in range(count)]
    env = procs.child_env(MUSTER_BOOTSTRAP_TOKEN=token)
    agents = []
    try:
        for name in names:
            argv = [
                procs.PYTHON, "-m", "muster", "agent",
                "--server", replica.api,
                "--ca-file", str(replica.bundle_path),
                "--state-dir", str(workdir / name),
                "--name", name,
                "--concurrency", str(concurrency),
                "--executors", KIND,
                "--log-level", "warning",
            ]  # fmt: skip
            log_path = workdir / f"{name}.log"
            agents.append(await procs.spawn(argv, log_path=log_path, env=env, cwd=workdir))
        await _until_connected(replica, names, agents, workdir, timeout=120)
        yield agents
    finally:
        await asyncio.gather(*(procs.stop(a, signal.SIGTERM, timeout=30) for a in agents))


async def _until_connected(
    replica: Replica,
    names: list[str],
    agents: list[asyncio.subprocess.Process],
    workdir: Path,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    async with replica.admin() as admin:
        while True:
            connected = {a.agent_id for a in await admin.list_agents() if a.connected}
            missing = set(names) - connected
            if not missing:
                return
            for name, proc in zip(names, agents, strict=True):
                if proc.returncode is not None:
                    raise RuntimeError(
                        f"muster agent {name} exited {proc.returncode}: "
                        f"{procs.log_tail(workdir / f'{name}.log')}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(missing)} of {len(names)} daemons not connected after {timeout:.0f}s"
                )
            await asyncio.sleep(0.2)


@dataclass
class CallerRun:
    tasks: int
    seconds: float
    latencies: list[float]
    """Seconds from submit() to wait() returning, per task."""

    @property
    def throughput(self) -> float:
        return self.tasks / self.seconds


class Callers:
    """``count`` blocking SDK clients, one per thread, connected before any timing starts."""

    def __init__(self, config: muster.ClientConfig, count: int = CALLERS) -> None:
        self.count = count
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="caller")
        self._local = threading.local()
        self._config = config
        self._clients: list[muster.Client] = []
        self._lock = threading.Lock()

    def _client(self) -> muster.Client:
        client: muster.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = muster.Client(self._config)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _one(self) -> float:
        started = time.perf_counter()
        client = self._client()
        task = client.submit(KIND, b"", max_attempts=1)
        done = client.wait(task.task_id, timeout=60)
        if done.state is not muster.TaskState.SUCCEEDED:
            raise RuntimeError(f"task {task.task_id} ended {done.state.name}: {done.error}")
        return time.perf_counter() - started

    def run(self, count: int) -> CallerRun:
        """Every caller submits and waits, one task at a time, until ``count`` are done."""
        counter = itertools.count()
        latencies: list[float] = []

        def caller() -> None:
            while next(counter) < count:
                latencies.append(self._one())

        started = time.perf_counter()
        futures = [self._pool.submit(caller) for _ in range(self.count)]
        for f in futures:
            f.result()
        return CallerRun(count, time.perf_counter() - started, latencies)

    def round_trips(self, count: int) -> list[float]:
        """One caller, one task at a time: seconds per submit + wait."""
        return self._pool.submit(lambda: [self._one() for _ in range(count)]).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for client in self._clients:
            client.close()
