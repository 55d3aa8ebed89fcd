"""Task dispatch through Muster against Celery, and the dispatch variants: single-task round
trip, schedule-to-start under load, Redis quotas on vs off, one vs two replicas."""

from __future__ import annotations

import asyncio
import time

from bench.celeryref import celery_reference
from bench.fleet import Fleet
from bench.load import agents_on, clients_for, dispatch, enroll_to_file, schedule_to_start
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
        "dispatch: 8 agents, no-op tasks, durable Postgres state, mTLS, quotas and audit on",
    )
    count = ctx.scale(5000, 150)
    celery_count = ctx.scale(5000, 500)
    result.notes.append(
        f"{count} tasks per run for Muster, {celery_count} for Celery; Muster: 8 simulated "
        "agents (max_concurrency 4) in one "
        f"process, {AGENTS * 4} slots, 32 concurrent submitters on one channel, end = the agent "
        "holds the server's Ack (result durably recorded). Celery: apply_async x N, then "
        "ResultSet.join_native on the Redis backend; prefork worker, concurrency 2."
    )
    async with Stack.create(ctx.workdir) as stack:
        a = await stack.start("a")
        creds = ctx.workdir / "creds.json"
        await enroll_to_file(a, AGENTS, creds, "disp")
        async with (
            celery_reference(ctx.workdir) as celery,
            agents_on([a], creds, AGENTS, ctx.workdir) as fleets,
            clients_for([a]) as clients,
        ):
            await dispatch(clients, fleets, WARMUP)
            muster, ref = [], []
            for _ in range(ctx.runs):
                muster.append((await dispatch(clients, fleets, count)).throughput)
                ref.append(await asyncio.to_thread(celery.throughput, celery_count))
            ratio = _ratios(muster, ref)
            fig = Figure(
                "dispatch",
                "tasks/s submit-to-result",
                "tasks/s",
                muster,
                "Celery end-to-end",
                ref,
                "Muster / Celery",
                ratio,
                ">= 2x Celery",
                Summary.of(ratio).median >= 2.0,
            )
            result.figures.append(fig)
            if not fig.met and ctx.profile:
                await _profile_dispatch(ctx, result, a, fleets, min(count, 1000))
    return result


async def run_roundtrip(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("roundtrip", "single task round trip")
    samples = ctx.scale(100, 20)
    result.notes.append(
        f"{samples} sequential tasks per run, 8 idle agents connected. Muster: SDK "
        "submit() then wait() (a Watch stream) until SUCCEEDED. Celery: delay().get()."
    )
    async with Stack.create(ctx.workdir) as stack:
        a = await stack.start("a")
        creds = ctx.workdir / "creds.json"
        await enroll_to_file(a, AGENTS, creds, "rt")
        async with (
            celery_reference(ctx.workdir) as celery,
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
            m50, m99, c50, c99 = [], [], [], []
            for _ in range(ctx.runs):
                lat = [await one() for _ in range(samples)]
                m50.append(percentile(lat, 50) * 1000)
                m99.append(percentile(lat, 99) * 1000)
                clat = await asyncio.to_thread(celery.round_trips, samples)
                c50.append(percentile(clat, 50) * 1000)
                c99.append(percentile(clat, 99) * 1000)
    r50, r99 = _ratios(m50, c50), _ratios(m99, c99)
    result.figures += [
        Figure(
            "roundtrip",
            "p50",
            "ms",
            m50,
            "Celery round trip p50",
            c50,
            "Muster / Celery",
            r50,
            "<= Celery",
            Summary.of(r50).median <= 1.0,
        ),
        Figure(
            "roundtrip",
            "p99",
            "ms",
            m99,
            "Celery round trip p99",
            c99,
            "Muster / Celery",
            r99,
            "<= 2x Celery",
            Summary.of(r99).median <= 2.0,
        ),
    ]
    return result


async def run_schedule(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("schedule", "schedule-to-start under load")
    seconds = ctx.scale(10, 3)
    async with Stack.create(ctx.workdir) as stack:
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
        "Submit checks the lockout and the submission rate in Redis, one Lua call each, and "
        "wake-ups travel through Redis pub/sub). Off: the in-process quota store and fan-out. "
        "The two modes alternate, each on a freshly started replica of the same database."
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
