"""Soak: echo tasks at a steady rate through one server for a long time, with real agents;
the server's RSS must stay flat after warm-up and every task must finish.

A leak that costs a few hundred bytes per task is invisible in a one-minute benchmark and
tens of MiB a day in production, so this scenario measures a slope, not a level.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench import procs
from bench.results import Context, Figure, ScenarioResult
from bench.stack import PG_ADMIN_URL, Replica, Stack
from muster import AsyncClient, MusterError
from muster.states import TERMINAL, State

log = logging.getLogger(__name__)

AGENTS = 8
CONCURRENCY = 4
KIND = "echo"
FULL_MINUTES = 30.0
QUICK_MINUTES = 3.0
RATE = 20.0
"""Tasks per second: the rate of the one-hour run that found issue 10's leak."""
SAMPLE_EVERY = 5.0
WARMUP_SHARE = 0.2
MAX_WARMUP = 300.0
"""Warm-up is a fifth of the run, at most five minutes: caches, pools and the allocator
settle in it, and what grows after it is what grows for ever."""
DRAIN_TIMEOUT = 120.0
SLOPE_TARGET = 0.5
"""MiB per 10 minutes (issue 10)."""


def slope_per_10_minutes(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, RSS bytes) in MiB per 10 minutes; nan under 3 points."""
    if len(samples) < 3:
        return float("nan")
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return float("nan")
    cov = sum((t - mean_t) * (r - mean_r) for t, r in samples)
    return cov / var * 600 / 2**20


def heap_bytes(pid: int) -> int:
    """Size of the process's brk heap (glibc's main arena), 0 if it has none: it grows with
    the allocator's free holes before RSS does, since a hole's pages are touched later."""
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.endswith("[heap]"):
            for detail in lines[i + 1 :]:
                if detail.startswith("Size:"):
                    return int(detail.split()[1]) * 1024
    return 0


@dataclass
class Submitted:
    ok: int = 0
    failed: int = 0
    last_error: str = ""


@contextlib.asynccontextmanager
async def real_agents(replica: Replica, workdir: Path, count: int) -> AsyncIterator[None]:
    """``count`` ``muster agent`` daemons enrolled with ``replica``, all connected; they are
    stopped with SIGTERM (they drain) on exit."""
    async with replica.admin() as admin:
        _, token = await admin.create_bootstrap_token("default", ttl=3600, max_uses=count)
    agents = []
    try:
        for i in range(count):
            name = f"soak-{i}"
            argv = [
                procs.PYTHON, "-m", "muster", "agent",
                "--server", replica.api,
                "--ca-file", str(replica.bundle_path),
                "--state-dir", str(workdir / name),
                "--name", name,
                "--concurrency", str(CONCURRENCY),
                "--log-level", "warning",
            ]  # fmt: skip
            agents.append(
                await procs.spawn(
                    argv,
                    log_path=workdir / f"{name}.log",
                    env=procs.child_env(MUSTER_BOOTSTRAP_TOKEN=token),
                    cwd=workdir,
                )
            )
        async with replica.admin() as admin, asyncio.timeout(120):
            while sum(a.connected for a in await admin.list_agents()) < count:
                if any(p.returncode is not None for p in agents):
                    raise RuntimeError(f"an agent exited: see {workdir}/soak-*.log")
                await asyncio.sleep(0.5)
        yield
    finally:
        await asyncio.gather(*(procs.stop(p, timeout=30) for p in agents))


async def _submit_at(client: AsyncClient, rate: float, until: float, submitted: Submitted) -> None:
    """Submit echo tasks at ``rate`` per second (open loop) until ``until`` (monotonic)."""
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        try:
            await client.submit(KIND, json.dumps({"n": i}).encode())
            submitted.ok += 1
        except MusterError as err:
            submitted.failed += 1
            submitted.last_error = str(err)

    started = time.monotonic()
    for i in itertools.count():
        at = started + i / rate
        if at >= until:
            break
        if (delay := at - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)


async def _states(stack: Stack) -> dict[str, int]:
    conn = await asyncpg.connect(f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{stack.database}")
    try:
        rows = await conn.fetch("SELECT state, count(*) AS n FROM tasks GROUP BY state")
    finally:
        await conn.close()
    return {row["state"]: row["n"] for row in rows}


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("soak", "soak: steady echo load, server RSS slope and lost tasks")
    minutes = ctx.minutes or (QUICK_MINUTES if ctx.quick else FULL_MINUTES)
    rate = ctx.rate or RATE
    seconds = minutes * 60
    warmup = min(MAX_WARMUP, seconds * WARMUP_SHARE)
    samples: list[tuple[float, int]] = []
    heap: list[tuple[float, int]] = []
    submitted = Submitted()
    async with Stack.create(ctx.workdir) as stack:
        a = await stack.start("a")
        async with real_agents(a, ctx.workdir, AGENTS), a.client() as client:
            started = time.monotonic()
            cpu0 = a.cpu()
            load = asyncio.create_task(_submit_at(client, rate, started + seconds, submitted))
            try:
                while not load.done():
                    samples.append((time.monotonic() - started, a.rss()))
                    heap.append((samples[-1][0], heap_bytes(a.pid)))
                    await asyncio.wait({load}, timeout=SAMPLE_EVERY)
                await load
            finally:
                load.cancel()
            samples.append((time.monotonic() - started, a.rss()))
            cpu = (a.cpu() - cpu0) / (time.monotonic() - started)
            # Whatever is still open after DRAIN_TIMEOUT counts as lost.
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while True:
                states = await _states(stack)
                open_ = sum(n for s, n in states.items() if s not in TERMINAL)
                if open_ == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
    (ctx.workdir / "rss.csv").write_text(
        "seconds,rss_bytes\n" + "".join(f"{t:.1f},{r}\n" for t, r in samples)
    )
    settled = [(t, r) for t, r in samples if t >= warmup]
    slope = slope_per_10_minutes(settled)
    heap_slope = slope_per_10_minutes([(t, h) for t, h in heap if t >= warmup])
    succeeded = states.get(State.SUCCEEDED, 0)
    lost = submitted.ok - succeeded
    mib = 2**20
    result.notes.append(
        f"One server (Postgres + Redis), {AGENTS} real `muster agent` daemons "
        f"(--concurrency {CONCURRENCY}), `{KIND}` tasks with a small JSON payload submitted "
        f"open-loop at {rate:g}/s through one SDK client for {minutes:g} minutes "
        f"({submitted.ok:,} accepted, {submitted.failed} refused"
        + (f", last: {submitted.last_error[:200]}" if submitted.failed else "")
        + f"). Server RSS sampled every {SAMPLE_EVERY:g} s (rss.csv in the work directory); "
        "the slope is a least-squares line through the samples after a warm-up of "
        f"{warmup / 60:g} minutes. Lost = "
        "accepted - SUCCEEDED once nothing is left queued or running "
        f"(final states: {dict(sorted(states.items()))}). One run, whatever --runs says."
    )
    if samples:
        result.notes.append(
            f"Server RSS: {samples[0][1] / mib:.1f} MiB at the start, "
            f"{(settled[0][1] if settled else samples[-1][1]) / mib:.1f} MiB after warm-up, "
            f"{samples[-1][1] / mib:.1f} MiB at the end, {max(r for _, r in samples) / mib:.1f} "
            f"MiB at most; server CPU {cpu:.2f} cores on average."
        )
    result.figures += [
        Figure("soak", "server RSS slope after warm-up", "MiB / 10 min", [slope],
               target=f"< {SLOPE_TARGET} MiB / 10 min", met=slope < SLOPE_TARGET),
        Figure("soak", "tasks lost", "tasks", [float(lost)], target="0", met=lost == 0),
        Figure("soak", "main heap (brk) slope after warm-up", "MiB / 10 min", [heap_slope]),
        Figure("soak", "tasks finished", "tasks", [float(succeeded)]),
        Figure("soak", "server RSS at the end", "MiB", [samples[-1][1] / mib if samples else 0.0]),
    ]  # fmt: skip
    return result
