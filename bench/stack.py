"""What a scenario runs against: a fresh Postgres database, a Redis key prefix of its own,
one CA shared by every replica, and Muster server processes started and stopped on demand.

``async with Stack.create(workdir) as stack:`` drops the database and deletes the Redis
keys on exit, and stops every server it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench import procs
from muster import AsyncAdminClient, AsyncClient, ClientConfig

PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
ENROLLMENT_RATE = "1000000"
SERVER_SETTINGS: dict[str, str] = {}
"""Extra ``MUSTER_*`` settings for every bench server (``--server-setting NAME=VALUE``),
so a lever that has a switch (eager dispatch, say) can be measured on and off."""
"""Per-peer enrollment limit for bench servers (all agents enroll from 127.0.0.1)."""


def _sqlalchemy_url(name: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def pg_execute(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def delete_redis_prefix(prefix: str) -> None:
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i : i + 1000])
    finally:
        await client.aclose()


@dataclass
class Replica:
    """One running ``bench.serve`` process and what clients need to reach it."""

    name: str
    data_dir: Path
    proc: asyncio.subprocess.Process
    api: str
    agent: str
    metrics: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def bundle_path(self) -> Path:
        return self.data_dir / "ca" / "bundle.pem"

    def client_config(self) -> ClientConfig:
        token = (self.data_dir / "admin.token").read_text().strip()
        return ClientConfig(address=self.api, token=token, ca_file=self.bundle_path)

    def client(self) -> AsyncClient:
        return AsyncClient(self.client_config())

    def admin(self) -> AsyncAdminClient:
        return AsyncAdminClient(self.client_config())

    def rss(self) -> int:
        return procs.rss_bytes(self.pid)

    def cpu(self) -> float:
        return procs.cpu_seconds(self.pid)

    def tree_cpu(self) -> float:
        """CPU seconds of the server and any worker processes it started."""
        return procs.tree_cpu_seconds(self.pid)

    async def stop(self, timeout: float = 30.0) -> None:
        await procs.stop(self.proc, timeout=timeout)


@dataclass
class Stack:
    workdir: Path
    database: str
    prefix: str
    replicas: list[Replica] = field(default_factory=list)
    workers: int = 1
    """Server processes per replica (``MUSTER_WORKERS``; more than one needs Redis)."""
    fanout_secret: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    """The key the replicas sign their Redis fan-out with (required with Redis)."""

    @property
    def database_url(self) -> str:
        return _sqlalchemy_url(self.database)

    @classmethod
    @asynccontextmanager
    async def create(cls, workdir: Path, *, workers: int = 1) -> AsyncIterator[Stack]:
        """A fresh database migrated by ``muster db upgrade``, a CA made by ``muster ca init``;
        with ``workers`` > 1 every replica started with Redis runs that many processes."""
        workdir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(5)
        stack = cls(
            workdir=workdir,
            database=f"muster_bench_{token}",
            prefix=f"muster-bench-{token}",
            workers=workers,
        )
        await pg_execute(f'CREATE DATABASE "{stack.database}"')
        try:
            env = procs.child_env(MUSTER_DATABASE_URL=stack.database_url)
            await procs.run([procs.PYTHON, "-m", "muster", "db", "upgrade"], env=env)
            await procs.run(
                [procs.PYTHON, "-m", "muster", "ca", "init", "--data-dir", str(workdir / "ca-src")]
            )
            yield stack
        finally:
            await asyncio.gather(*(r.stop() for r in stack.replicas), return_exceptions=True)
            await pg_execute(f'DROP DATABASE IF EXISTS "{stack.database}" WITH (FORCE)')
            await delete_redis_prefix(stack.prefix)

    async def start(
        self,
        name: str,
        *,
        redis: bool = True,
        api_port: int = 0,
        agent_port: int = 0,
        **settings: str,
    ) -> Replica:
        """Start (or restart, keeping its data dir) replica ``name``; wait for endpoints.json."""
        data_dir = self.workdir / name
        if not (data_dir / "ca").exists():
            shutil.copytree(self.workdir / "ca-src" / "ca", data_dir / "ca")
        endpoints = data_dir / "endpoints.json"
        endpoints.unlink(missing_ok=True)
        env = procs.child_env(
            MUSTER_DATA_DIR=str(data_dir),
            MUSTER_API_ADDR=f"127.0.0.1:{api_port}",
            MUSTER_AGENT_ADDR=f"127.0.0.1:{agent_port}",
            MUSTER_METRICS_ADDR="127.0.0.1:0",
            MUSTER_DATABASE_URL=self.database_url,
            MUSTER_MIGRATE="no",
            MUSTER_REPLICA_ID=name,
            MUSTER_REDIS_URL=REDIS_URL if redis else "",
            MUSTER_REDIS_PREFIX=self.prefix,
            MUSTER_FANOUT_SECRET=self.fanout_secret,
            # Quotas are checked on every submission; the rate is set so they never refuse.
            MUSTER_SUBMISSION_RATE="1000000",
            MUSTER_SUBMISSION_BURST="1000000",
            MUSTER_SHUTDOWN_GRACE="2s",
            # Every simulated agent enrolls from 127.0.0.1: the per-peer limit would refuse.
            MUSTER_ENROLLMENT_RATE=ENROLLMENT_RATE,
            MUSTER_ENROLLMENT_BURST=ENROLLMENT_RATE,
            MUSTER_WORKERS=str(self.workers if redis else 1),
            **{f"MUSTER_{k.upper()}": v for k, v in (SERVER_SETTINGS | settings).items()},
        )
        log_path = self.workdir / f"{name}.log"
        proc = await procs.spawn([procs.PYTHON, "-m", "bench.serve"], log_path=log_path, env=env)
        info = await _wait_for_endpoints(endpoints, proc, log_path)
        replica = Replica(
            name, data_dir, proc, info["api"], info["agent"], info["metrics"], log_path
        )
        self.replicas = [r for r in self.replicas if r.name != name] + [replica]
        return replica


async def _wait_for_endpoints(
    path: Path, proc: asyncio.subprocess.Process, log_path: Path, timeout: float = 60.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {procs.log_tail(log_path)}")
        if path.exists():
            try:
                return json.loads(path.read_text())  # type: ignore[no-any-return]
            except json.JSONDecodeError:
                pass  # written atomically, but be patient anyway
        await asyncio.sleep(0.01)
    await procs.stop(proc)
    raise TimeoutError(f"server did not start within {timeout:.0f}s: {procs.log_tail(log_path)}")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])
