"""Task dispatch through Muster against Celery, and the dispatch variants: single-task round
trip, schedule-to-start under load, Redis quotas on vs off, one vs two replicas."""

from __future__ import annotations

import asyncio
import time

from bench.celeryref import CeleryRef, celery_references
from bench.counters import StoreCosts
from bench.fleet import Fleet
from bench.load import (
    BATCH,
    BATCH_CONCURRENCY,
    SUBMIT_CONCURRENCY,
    agents_on,
    clients_for,
    dispatch,
    dispatch_many,
    enroll_to_file,
    schedule_to_start,
    submit_many_missing,
)
from bench.profiling import sampled
from bench.results import Context, Figure, ScenarioResult, Summary, percentile
from bench.simagent import KIND
from bench.stack import Replica, Stack

AGENTS = 8
WARMUP = 50


def _ratios(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True) if y]


async def _profile_dispatch(
    ctx: Context, result: ScenarioResult, replica: Replica, fleets: list[Fleet], count: int
) -> None:
    async with (
        replica.client() as client,
        sampled(replica.pid, ctx.workdir / "profile.txt") as prof,
    ):
        await dispatch([client], fleets, count)
    result.profile = prof.markdown(f"server `{replica.name}` during one extra dispatch run")


async def run_dispatch(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "dispatch",
        "dispatch: 8 simulated agents, no-op tasks, durable Postgres state, mTLS, quotas and "
        "audit on",
    )
    count = ctx.scale(5000, 150)
    celery_count = ctx.scale(5000, 500)
    missing = submit_many_missing()
    result.notes.append(
        f"{count} tasks per run for Muster, {celery_count} for each Celery peer; Muster: 8 "
        f"simulated agents (max_concurrency 4) in one process, {AGENTS * 4} slots; single "
        f"Submit: {SUBMIT_CONCURRENCY} concurrent submitters on one channel; SubmitMany: "
        f"{BATCH_CONCURRENCY} concurrent calls of {BATCH} tasks; end = the agent holds the "
        "server's Ack (result durably recorded). Celery: apply_async x N, then "
        "ResultSet.join_native; prefork worker, concurrency 2 (Redis: broker and result "
        "backend; RabbitMQ: persistent messages, acks_late, prefetch multiplier 1, rpc:// "
        "results). Server CPU per task: the server process's user + system CPU time "
        "(/proc) over the measured window, divided by the tasks."
    )
    if missing:
        result.notes.append(f"SubmitMany: not available ({missing}).")
    single: list[float] = []
    many: list[float] = []
    cpu_single: list[float] = []
    cpu_many: list[float] = []
    workers_note(ctx, result)
    async with Stack.create(ctx.workdir, workers=ctx.server_workers) as stack:
        a = await stack.start("a")
        creds = ctx.workdir / "creds.json"
        await enroll_to_file(a, AGENTS, creds, "disp")
        async with (
            celery_references(ctx.workdir) as peers,
            agents_on([a], creds, AGENTS, ctx.workdir) as fleets,
            clients_for([a]) as clients,
        ):
            await dispatch(clients, fleets, WARMUP)
            if not missing:
                await dispatch_many(clients, fleets, WARMUP)
            refs: dict[str, list[float]] = {p.peer: [] for p in peers}
            for _ in range(ctx.runs):
                cpu = a.tree_cpu()
                single.append((await dispatch(clients, fleets, count)).throughput)
                cpu_single.append(micros_per_task(a.tree_cpu() - cpu, count))
                if not missing:
                    cpu = a.tree_cpu()
                    many.append((await dispatch_many(clients, fleets, count)).throughput)
                    cpu_many.append(micros_per_task(a.tree_cpu() - cpu, count))
                for peer in peers:
                    refs[peer.peer].append(await asyncio.to_thread(peer.throughput, celery_count))
            redis, rabbit = peers
            result.figures += [
                against(result.name, "tasks/s, single Submit", single, redis, refs, 2.0,
                        key="dispatch.redis"),
                against(result.name, "tasks/s, single Submit", single, rabbit, refs, 2.0,
                        key="dispatch.rabbitmq"),
                against(result.name, "tasks/s, SubmitMany", many, redis, refs, 5.0,
                        key="dispatch.many.redis", missing=missing),
                Figure(result.name, "server CPU per task, single Submit", "µs", cpu_single,
                       key="cpu.single"),
                Figure(result.name, "server CPU per task, SubmitMany", "µs", cpu_many,
                       key="cpu.many", error=f"not available: {missing}" if missing else ""),
            ]  # fmt: skip
            if any(f.met is False for f in result.figures) and ctx.profile:
                await _profile_dispatch(ctx, result, a, fleets, min(count, 1000))
    return result


def workers_note(ctx: Context, result: ScenarioResult) -> None:
    if ctx.server_workers > 1:
        result.notes.append(
            f"Muster server: {ctx.server_workers} processes per replica (`--workers "
            f"{ctx.server_workers}`, SO_REUSEPORT; --server-workers)."
        )


def micros_per_task(cpu_seconds: float, tasks: int) -> float:
    return cpu_seconds / tasks * 1e6


def against(
    scenario: str,
    figure: str,
    muster: list[float],
    peer: CeleryRef,
    refs: dict[str, list[float]],
    at_least: float,
    *,
    key: str = "",
    missing: str = "",
) -> Figure:
    """A throughput figure set against one Celery peer: met when the median of the per-run
    ratios is at least ``at_least``."""
    ratio = _ratios(muster, refs[peer.peer]) if muster else []
    return Figure(
        scenario,
        f"{figure} vs {peer.label}",
        "tasks/s",
        muster,
        f"{peer.label} end-to-end",
        refs[peer.peer],
        f"Muster / {peer.label}",
        ratio,
        f">= {at_least:g}x {peer.label}",
        None if missing else Summary.of(ratio).median >= at_least,
        error=f"not available: {missing}" if missing else "",
        key=key,
    )


def latency_figures(
    scenario: str,
    m50: list[float],
    m99: list[float],
    peers: list[CeleryRef],
    c50: dict[str, list[float]],
    c99: dict[str, list[float]],
    *,
    key_prefix: str,
) -> list[Figure]:
    """p50 and p99 against each peer; the targets (<= 1x / <= 2x) apply to Celery + Redis,
    the RabbitMQ peer is reported."""
    out = []
    for peer in peers:
        checked = peer.peer == "redis"
        for name, mine, theirs, limit in (("p50", m50, c50, 1.0), ("p99", m99, c99, 2.0)):
            ratio = _ratios(mine, theirs[peer.peer])
            out.append(
                Figure(
                    scenario,
                    f"{name} vs {peer.label}",
                    "ms",
                    mine,
                    f"{peer.label} round trip {name}",
                    theirs[peer.peer],
                    f"Muster / {peer.label}",
                    ratio,
                    f"<= {limit:g}x {peer.label}" if checked else "report",
                    Summary.of(ratio).median <= limit if checked else None,
                    key=f"{key_prefix}.{name}" if checked else "",
                )
            )
    return out


async def run_roundtrip(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("roundtrip", "single task round trip, simulated agents")
    samples = ctx.scale(100, 20)
    result.notes.append(
        f"{samples} sequential tasks per run, 8 idle simulated agents connected. Muster: SDK "
        "AsyncClient submit() then wait() (a Watch stream) until SUCCEEDED. Celery (each "
        "peer): delay().get()."
    )
    workers_note(ctx, result)
    async with Stack.create(ctx.workdir, workers=ctx.server_workers) as stack:
        a = await stack.start("a")
        creds = ctx.workdir / "creds.json"
        await enroll_to_file(a, AGENTS, creds, "rt")
        async with (
            celery_references(ctx.workdir) as peers,
            agents_on([a], creds, AGENTS, ctx.workdir),
            a.client() as client,
        ):

            async def one() -> float:
                started = time.perf_counter()
                task = await client.submit(KIND, b"", max_attempts=1)
                done = await client.wait(task.task_id, timeout=30)
                if done.state.name != "SUCCEEDED":
                    raise RuntimeError(f"task ended {done.state.name}")
                return time.perf_counter() - started

            for _ in range(10):
                await one()
            m50: list[float] = []
            m99: list[float] = []
            costs = StoreCosts(stack.database)
            c50: dict[str, list[float]] = {p.peer: [] for p in peers}
            c99: dict[str, list[float]] = {p.peer: [] for p in peers}

            async def sequential() -> list[float]:
                return [await one() for _ in range(samples)]

            for _ in range(ctx.runs):
                lat = await costs.around(samples, sequential())
                m50.append(percentile(lat, 50) * 1000)
                m99.append(percentile(lat, 99) * 1000)
                for peer in peers:
                    clat = await asyncio.to_thread(peer.round_trips, samples)
                    c50[peer.peer].append(percentile(clat, 50) * 1000)
                    c99[peer.peer].append(percentile(clat, 99) * 1000)
    result.figures += latency_figures(
        result.name, m50, m99, peers, c50, c99, key_prefix="roundtrip"
    )
    costs.report(result)
    return result


async def run_schedule(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("schedule", "schedule-to-start under load")
    seconds = ctx.scale(10, 3)
    workers_note(ctx, result)
    async with Stack.create(ctx.workdir, workers=ctx.server_workers) as stack:
        a = await stack.start("a")
        creds = ctx.workdir / "creds.json"
        await enroll_to_file(a, AGENTS, creds, "s2s")
        async with (
            agents_on([a], creds, AGENTS, ctx.workdir, record=True) as fleets,
            clients_for([a]) as clients,
        ):
            await dispatch(clients, fleets, WARMUP)
            capacity = (await dispatch(clients, fleets, ctx.scale(200, 100))).throughput
            rate = 0.7 * capacity
            p50, p99 = [], []
            for i in range(ctx.runs):
                run = await dispatch(clients, fleets, max(20, int(rate * seconds)), rate=rate)
                assigned: dict[str, float] = {}
                for n, fleet in enumerate(fleets):
                    assigned |= await fleet.dump(ctx.workdir / f"assigned-{i}-{n}.json")
                s2s = schedule_to_start(run, assigned)
                p50.append(percentile(s2s, 50) * 1000)
                p99.append(percentile(s2s, 99) * 1000)
    result.notes.append(
        f"Open-loop submissions at 70% of the measured closed-loop capacity "
        f"({capacity:.0f} tasks/s -> {rate:.0f}/s) for {seconds} s per run, 8 agents. "
        "Measured from sending Submit to the agent holding the Assignment (one clock, "
        "time.monotonic, across processes)."
    )
    result.figures += [
        Figure("schedule", "p50", "ms", p50),
        Figure("schedule", "p99", "ms", p99),
    ]
    return result


async def run_quota(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("quota", "quota cost: dispatch with Redis quotas on vs off")
    count = ctx.scale(1000, 100)
    result.notes.append(
        f"{count} tasks per run through one replica, 8 agents. On: MUSTER_REDIS_URL set (every "
        "Submit checks the lockout and the submission rate in Redis, concurrent checks sharing "
        "one batch.lua call, and wake-ups travel through Redis pub/sub). Off: the in-process "
        "quota store and fan-out. The two modes alternate, each on a freshly started replica "
        "of the same database."
    )
    on: list[float] = []
    off: list[float] = []
    async with Stack.create(ctx.workdir) as stack:
        a = await stack.start("on")
        creds = ctx.workdir / "creds.json"
        await enroll_to_file(a, AGENTS, creds, "quota")
        await a.stop()
        for i in range(ctx.runs):
            for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
                replica = await stack.start(mode, redis=mode == "on")
                try:
                    async with (
                        agents_on([replica], creds, AGENTS, ctx.workdir / f"{mode}{i}") as fleets,
                        clients_for([replica]) as clients,
                    ):
                        await dispatch(clients, fleets, WARMUP)
                        tp = (await dispatch(clients, fleets, count)).throughput
                finally:
                    await replica.stop()
                (on if mode == "on" else off).append(tp)
    ratio = _ratios(on, off)
    result.figures.append(
        Figure(
            "quota",
            "throughput, quotas on",
            "tasks/s",
            on,
            "quotas off (in-process)",
            off,
            "on / off",
            ratio,
            ">= 0.9",
            Summary.of(ratio).median >= 0.9,
            key="quota",
        )
    )
    return result


async def run_scaleout(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("scaleout", "scale-out: 1 vs 2 server replicas on one Postgres + Redis")
    count = ctx.scale(1000, 100)
    result.notes.append(
        f"{count} tasks per run, 8 agents: all on replica a, or 4 on a and 4 on b with "
        "submissions alternating between the two api listeners. Both replicas, Postgres, "
        "Redis and the load generators share this machine's 2 cores."
    )
    one: list[float] = []
    two: list[float] = []
    async with Stack.create(ctx.workdir) as stack:
        a = await stack.start("a")
        b = await stack.start("b")
        creds = ctx.workdir / "creds.json"
        await enroll_to_file(a, AGENTS, creds, "scale")
        for i in range(ctx.runs):
            for replicas in ([a], [a, b]) if i % 2 == 0 else ([a, b], [a]):
                work = ctx.workdir / f"r{len(replicas)}-{i}"
                async with (
                    agents_on(replicas, creds, AGENTS, work) as fleets,
                    clients_for(replicas) as clients,
                ):
                    await dispatch(clients, fleets, WARMUP)
                    tp = (await dispatch(clients, fleets, count)).throughput
                (one if len(replicas) == 1 else two).append(tp)
    ratio = _ratios(two, one)
    result.figures.append(
        Figure(
            "scaleout",
            "throughput, 2 replicas",
            "tasks/s",
            two,
            "1 replica",
            one,
            "2 / 1 replicas",
            ratio,
        )
    )
    return result
