"""Revocation across replicas: revoke, through replica a's admin API, an agent streaming to
replica b, and time until b has closed that stream with PERMISSION_DENIED."""

from __future__ import annotations

import asyncio
import time

import grpc

from bench.load import enroll_to_file
from bench.results import Context, Figure, ScenarioResult, Summary, percentile
from bench.simagent import SimAgent, Stats
from bench.stack import Stack


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("revocation", "revocation: an agent streaming to another replica")
    per_run = ctx.scale(20, 5)
    result.notes.append(
        f"{per_run} agents per run stream to replica b; each is revoked in turn through "
        "replica a's AdminService (RevokeAgent); latency = from sending RevokeAgent to the "
        "agent seeing its stream end with PERMISSION_DENIED. Replicas share Postgres and "
        "Redis (pub/sub fan-out, database polling as the fallback)."
    )
    p50: list[float] = []
    p99: list[float] = []
    async with Stack.create(ctx.workdir) as stack:
        a = await stack.start("a")
        b = await stack.start("b")
        creds = await enroll_to_file(a, per_run * ctx.runs, ctx.workdir / "creds.json", "rev")
        async with a.admin() as admin:
            for run in range(ctx.runs):
                stats = Stats()
                mine = creds[run * per_run : (run + 1) * per_run]
                agents = [SimAgent(i, c, b.agent, stats) for i, c in enumerate(mine)]
                tasks = [asyncio.create_task(agent.run()) for agent in agents]
                try:
                    deadline = time.monotonic() + 60
                    while stats.connected < len(agents):
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"only {stats.connected} agents connected")
                        await asyncio.sleep(0.02)
                    latencies = []
                    for agent, task in zip(agents, tasks, strict=True):
                        started = time.monotonic()
                        await admin.revoke_agent(agent.creds.agent_id, reason="bench")
                        await asyncio.wait_for(task, 10)
                        if agent.refused != grpc.StatusCode.PERMISSION_DENIED:
                            raise RuntimeError(f"stream ended with {agent.refused}, not denied")
                        latencies.append((agent.ended_at - started) * 1000)
                finally:
                    for agent in agents:
                        agent.stop()
                    await asyncio.gather(*tasks, return_exceptions=True)
                p50.append(percentile(latencies, 50))
                p99.append(percentile(latencies, 99))
    result.figures += [
        Figure("revocation", "p99 revoke -> stream closed", "ms", p99, target="<= 1,000 ms",
               met=Summary.of(p99).median <= 1000),
        Figure("revocation", "p50 revoke -> stream closed", "ms", p50),
    ]  # fmt: skip
    return result
