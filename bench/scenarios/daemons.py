"""Dispatch and round trip the way users run Muster: 8 real ``muster agent`` daemons running
the ``echo`` executor, fed by blocking SDK callers (``muster.Client``) that submit a task
and wait for its result; against both Celery peers, measured in the same run."""

from __future__ import annotations

import asyncio
import os

from bench import procs
from bench.celeryref import celery_references
from bench.counters import StoreCosts
from bench.daemons import CALLERS, CONCURRENCY, Callers, daemons_on
from bench.profiling import sampled
from bench.results import Context, Figure, ScenarioResult, percentile
from bench.scenarios.dispatch import (
    AGENTS,
    against,
    latency_figures,
    micros_per_task,
    workers_note,
)
from bench.stack import Stack


async def run_dispatch(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "dispatch-daemons",
        "dispatch: 8 real `muster agent` daemons, SDK callers that submit and wait",
    )
    count = ctx.scale(2000, 100)
    celery_count = ctx.scale(5000, 500)
    result.notes.append(
        f"{count} tasks per run for Muster, {celery_count} for each Celery peer. Muster: "
        f"{AGENTS} `muster agent` processes (--executors echo, --concurrency {CONCURRENCY}: "
        f"{AGENTS * CONCURRENCY} slots; the executor path with its durable outbox), "
        f"{CALLERS} caller threads in the harness, each with its own blocking muster.Client "
        "doing submit() then wait() (a Watch stream) until SUCCEEDED, one task at a time; "
        "end = the last caller holds its result. Celery as in `dispatch` (apply_async x N, "
        "then join). Server CPU per task as in `dispatch`."
    )
    muster: list[float] = []
    cpu: list[float] = []
    caller_cpu: list[float] = []
    latency_p50: list[float] = []
    workers_note(ctx, result)
    async with Stack.create(ctx.workdir, workers=ctx.server_workers) as stack:
        a = await stack.start("a")
        async with (
            celery_references(ctx.workdir) as peers,
            daemons_on(a, AGENTS, ctx.workdir / "daemons"),
        ):
            callers = Callers(a.client_config())
            try:
                await asyncio.to_thread(callers.run, 2 * CALLERS)  # connects every caller
                refs: dict[str, list[float]] = {p.peer: [] for p in peers}
                for _ in range(ctx.runs):
                    before, mine = a.tree_cpu(), procs.cpu_seconds(os.getpid())
                    run = await asyncio.to_thread(callers.run, count)
                    cpu.append(micros_per_task(a.tree_cpu() - before, count))
                    caller_cpu.append(micros_per_task(procs.cpu_seconds(os.getpid()) - mine, count))
                    muster.append(run.throughput)
                    latency_p50.append(percentile(run.latencies, 50) * 1000)
                    for peer in peers:
                        refs[peer.peer].append(
                            await asyncio.to_thread(peer.throughput, celery_count)
                        )
                redis, rabbit = peers
                result.figures += [
                    against(result.name, "tasks/s, submit + wait", muster, redis, refs, 2.0,
                            key="daemons.dispatch.redis"),
                    against(result.name, "tasks/s, submit + wait", muster, rabbit, refs, 2.0,
                            key="daemons.dispatch.rabbitmq"),
                    Figure(result.name, "server CPU per task, real daemons", "µs", cpu,
                           key="daemons.cpu"),
                    Figure(result.name, "caller's submit-to-result p50 under load", "ms",
                           latency_p50),
                    # The load generator's own cost: near 1e6 / tasks/s it is the bottleneck.
                    Figure(result.name, "callers' CPU per task (harness process)", "µs",
                           caller_cpu),
                ]  # fmt: skip
                if any(f.met is False for f in result.figures) and ctx.profile:
                    async with sampled(a.pid, ctx.workdir / "profile.txt") as prof:
                        await asyncio.to_thread(callers.run, min(count, 1000))
                    result.profile = prof.markdown(
                        "server `a` during one extra run with real daemons"
                    )
            finally:
                await asyncio.to_thread(callers.close)
    return result


async def run_roundtrip(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "roundtrip-daemons", "single task round trip, real `muster agent` daemons"
    )
    samples = ctx.scale(100, 20)
    result.notes.append(
        f"{samples} sequential tasks per run, {AGENTS} idle `muster agent` daemons (echo "
        "executor) connected. Muster: one blocking muster.Client, submit() then wait() until "
        "SUCCEEDED. Celery (each peer): delay().get()."
    )
    workers_note(ctx, result)
    async with Stack.create(ctx.workdir, workers=ctx.server_workers) as stack:
        a = await stack.start("a")
        async with (
            celery_references(ctx.workdir) as peers,
            daemons_on(a, AGENTS, ctx.workdir / "daemons"),
        ):
            caller = Callers(a.client_config(), 1)
            try:
                await asyncio.to_thread(caller.round_trips, 10)
                m50: list[float] = []
                m99: list[float] = []
                c50: dict[str, list[float]] = {p.peer: [] for p in peers}
                c99: dict[str, list[float]] = {p.peer: [] for p in peers}
                costs = StoreCosts(stack.database)
                for _ in range(ctx.runs):
                    lat = await costs.around(
                        samples, asyncio.to_thread(caller.round_trips, samples)
                    )
                    m50.append(percentile(lat, 50) * 1000)
                    m99.append(percentile(lat, 99) * 1000)
                    for peer in peers:
                        clat = await asyncio.to_thread(peer.round_trips, samples)
                        c50[peer.peer].append(percentile(clat, 50) * 1000)
                        c99[peer.peer].append(percentile(clat, 99) * 1000)
            finally:
                await asyncio.to_thread(caller.close)
    result.figures += latency_figures(
        result.name, m50, m99, peers, c50, c99, key_prefix="daemons.roundtrip"
    )
    costs.report(result)
    return result
