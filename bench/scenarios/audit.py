"""Audit: security events through Muster's batch writer into Postgres, against raw COPY of
the same rows in batches of the same size, and a count of what was lost (must be none)."""

from __future__ import annotations

import os
import secrets
import time

import asyncpg
from sqlalchemy import func, select

from bench.profiling import sampled
from bench.results import Context, Figure, ScenarioResult, Summary
from bench.stack import PG_ADMIN_URL, Stack
from muster.server.audit import AuditRecord, AuditWriter
from muster.server.audit.chain import COLUMNS, GENESIS, link
from muster.server.audit.verify import verify
from muster.server.audit.writer import MAX_BATCH
from muster.server.storage.database import Database
from muster.server.storage.models import AuditEvent

BATCH = MAX_BATCH
"""The writer's batch size when a backlog builds up (as here), used for COPY too: one
transaction per batch either way."""


def _events(count: int) -> list[AuditRecord]:
    """Security events as the server writes them: authentication and certificate actions."""
    actions = ("auth.failure", "certificate.issue", "agent.enroll", "bootstrap_token.redeem")
    return [
        AuditRecord(
            actor=f"spiffe://muster.local/agent/bench-{i % 1000}",
            action=actions[i % len(actions)],
            target=f"serial-{secrets.token_hex(8)}",
            outcome="ok" if i % 4 else "denied",
            peer="127.0.0.1",
            request_id=secrets.token_hex(8),
            details={"serial": secrets.token_hex(16), "reason": "bench", "attempt": i},
        )
        for i in range(count)
    ]


async def _writer_run(url: str, chain: str, count: int, spool: object) -> tuple[float, int, bool]:
    """(events/s, lost, chain verifies) for ``count`` events through one AuditWriter."""
    db = Database(url, audit_chain=chain)
    try:
        events = _events(count)
        writer = AuditWriter(db, spool_path=spool)  # type: ignore[arg-type]
        writer.start()
        started = time.perf_counter()
        for event in events:
            await writer.submit(event)
        await writer.flush()
        elapsed = time.perf_counter() - started
        await writer.close()
        async with db.transaction() as session:
            stored = await session.scalar(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.chain == chain)
            )
        report = await verify(db, chain)
        return count / elapsed, count - int(stored or 0), report.ok
    finally:
        await db.close()


async def _copy_run(dsn: str, table: str, count: int) -> float:
    chain = f"copy-{secrets.token_hex(4)}"
    records = link([e.content() for e in _events(count)], chain, (0, GENESIS))
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        for i in range(0, len(records), BATCH):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    table, records=records[i : i + BATCH], columns=COLUMNS
                )
        return count / (time.perf_counter() - started)
    finally:
        await conn.close()


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("audit", "audit: sustained security events to Postgres")
    count = ctx.scale(20000, 2000)
    result.notes.append(
        f"{count} events per run submitted as fast as the writer takes them (its bounded "
        "buffer pushes back), then flushed; events/s from the first submit to the flush. "
        f"Reference: the same rows, hashes precomputed, COPYed in transactions of {BATCH} rows "
        "into a copy of audit_events with the same indexes. Lost = submitted minus rows "
        "stored in the run's chain, and the chain must verify."
    )
    writer_rates: list[float] = []
    copy_rates: list[float] = []
    lost: list[float] = []
    async with Stack.create(ctx.workdir) as stack:
        dsn = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + stack.database
        table = "bench_copy"
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                f"CREATE TABLE {table} (LIKE audit_events INCLUDING DEFAULTS INCLUDING INDEXES "
                "INCLUDING CONSTRAINTS)"
            )
        finally:
            await conn.close()
        for i in range(ctx.runs):
            rate, missing, ok = await _writer_run(
                stack.database_url, f"bench-{i}", count, ctx.workdir / f"spool-{i}"
            )
            if not ok:
                raise RuntimeError(f"run {i}: the audit chain does not verify")
            writer_rates.append(rate)
            lost.append(float(missing))
            copy_rates.append(await _copy_run(dsn, table, count))
        ratio = [w / c for w, c in zip(writer_rates, copy_rates, strict=True)]
        result.figures += [
        Figure("audit", "events/s", "events/s", writer_rates, "Postgres COPY rows/s",
               copy_rates, "Muster / COPY", ratio, ">= 0.5x COPY",
               Summary.of(ratio).median >= 0.5),
        Figure("audit", "lost events", "events", lost, target="0 lost",
               met=max(lost, default=1) == 0),
    ]  # fmt: skip
        if not result.figures[0].met and ctx.profile:
            # The writer runs in this process, so this process is the one to sample.
            async with sampled(os.getpid(), ctx.workdir / "profile.txt") as prof:
                await _writer_run(stack.database_url, "bench-profile", count, ctx.workdir / "sp")
            result.profile = prof.markdown("the audit writer (harness process) in one extra run")
    return result
