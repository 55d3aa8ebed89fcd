"""What a task costs the stores, counted by the stores themselves: Postgres transactions
of the bench database and commands Redis ran. Unlike times, these counts do not move
with the machine's load, so a change to the hot path shows in them exactly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
import redis.asyncio as aioredis

from bench.results import Figure, ScenarioResult
from bench.stack import PG_ADMIN_URL, REDIS_URL

T = TypeVar("T")

SETTLE_POLL = 0.5
SETTLE_LIMIT = 15.0
"""Postgres publishes a backend's counts when it goes idle, within about a second (at
most ten under contention): a count is read until two reads agree, up to this long."""


async def redis_commands() -> int:
    """Commands the Redis server has run since it started (every client's: the Celery
    worker's idle polling adds about one a second), Lua's own calls included."""
    client = aioredis.from_url(REDIS_URL)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return sum(int(entry["calls"]) for entry in stats.values())


async def pg_transactions(database: str) -> int:
    """Transactions (committed and rolled back; an autocommit statement is one) of
    ``database`` once the counts stopped moving."""
    conn = await asyncpg.connect(PG_ADMIN_URL)
    query = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1"
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_LIMIT
        last = -1
        while True:
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            count = int(await conn.fetchval(query, database) or 0)
            if count == last or loop.time() > deadline:
                return count
            last = count
            await asyncio.sleep(SETTLE_POLL)
    finally:
        await conn.close()


@dataclass
class StoreCosts:
    """Postgres transactions and Redis commands per task, over measured runs."""

    database: str
    transactions: list[float] = field(default_factory=list)
    commands: list[float] = field(default_factory=list)

    async def around(self, tasks: int, work: Awaitable[T]) -> T:
        """Run ``work`` (``tasks`` tasks of Muster's, nothing else of the bench's) and
        count what it cost the stores."""
        t0, r0 = await pg_transactions(self.database), await redis_commands()
        out = await work
        r1, t1 = await redis_commands(), await pg_transactions(self.database)
        self.transactions.append((t1 - t0) / tasks)
        self.commands.append((r1 - r0) / tasks)
        return out

    def report(self, result: ScenarioResult) -> None:
        result.figures += [
            Figure(result.name, "Postgres transactions per task", "", self.transactions),
            Figure(result.name, "Redis commands per task", "", self.commands),
        ]
        result.notes.append(
            "Postgres transactions: of the bench database (pg_stat_database, read once the "
            "counts settle; autocommit reads count, and so does the server's background "
            "work meanwhile, about one poll a second). Redis commands: INFO commandstats "
            "over the same tasks (Lua scripts' own calls included, and the idle Celery "
            "worker's polling)."
        )
