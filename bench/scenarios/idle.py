"""Idle connected agents: how much server memory one more connected agent costs, against a
raw grpc.aio server holding the same idle bidi streams, one mTLS connection each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from bench import procs
from bench.fleet import Fleet, start_fleets, wait_until
from bench.load import enroll_to_file
from bench.profiling import sampled
from bench.rawserver import raw_server
from bench.results import Context, Figure, ScenarioResult, Summary
from bench.stack import Stack

SETTLE = 3.0
CPU_WINDOW = 5.0


async def _measure(
    pid: int,
    endpoint: str,
    creds: Path,
    sizes: list[int],
    workdir: Path,
    mode: str,
    quick: bool,
) -> tuple[dict[int, float], dict[int, float]]:
    """Per-agent RSS (bytes) and server CPU (fraction of a core) at each size."""
    settle, window = (1.0, 2.0) if quick else (SETTLE, CPU_WINDOW)
    await asyncio.sleep(settle)
    base = procs.rss_bytes(pid)
    per_agent: dict[int, float] = {}
    cpu: dict[int, float] = {}
    fleets: list[Fleet] = []
    connected = 0
    try:
        for size in sizes:
            assignments = [(i, endpoint) for i in range(connected, size)]
            fleets += await start_fleets(
                creds, assignments, log_dir=workdir, name=f"{mode}-{size}", mode=mode
            )
            await wait_until(
                fleets, lambda s, n=size: s.connected >= n, 600, f"{size} {mode} agents"
            )
            connected = size
            await asyncio.sleep(settle)
            per_agent[size] = (procs.rss_bytes(pid) - base) / size
            c0, t0 = procs.cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(window)
            cpu[size] = (procs.cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    finally:
        await asyncio.gather(*(f.stop() for f in fleets))
    return per_agent, cpu


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("idle", "idle connected agents over mTLS: server RSS per agent")
    sizes = [100] if ctx.quick else [200, 400]
    result.notes.append(
        f"Sizes measured: {', '.join(f'{s:,}' for s in sizes)} agents, each on its own mTLS "
        "connection, in fleet processes of up to 2,500 agents; per agent = (server RSS with N "
        f"connected, {SETTLE:.0f} s after the last connected - RSS before any) / N. Raw: the "
        "same agents' certificates, one idle bidi echo stream each, Heartbeat-sized messages "
        "at Muster's heartbeat interval (5 s)."
    )
    if not ctx.quick:
        result.notes.append(
            "Scaled down from 1,000 / 5,000 / 10,000 to keep a full run near a quarter of an "
            "hour: enrolling through the API at ~40-50/s makes 10,000 agents minutes of setup "
            "per run. (Sizes were first cut because every idle stream polled Postgres once a "
            "second and 400 agents saturated the server; that polling is gone, see the "
            "analysis, which also quotes a single run at 1,000 and 2,500 agents.)"
        )
    muster_rss: dict[int, list[float]] = {s: [] for s in sizes}
    raw_rss: dict[int, list[float]] = {s: [] for s in sizes}
    muster_cpu: dict[int, list[float]] = {s: [] for s in sizes}
    async with Stack.create(ctx.workdir) as stack:
        a = await stack.start("a")
        creds = ctx.workdir / "creds.json"
        await enroll_to_file(a, max(sizes), creds, "idle")
        for i in range(ctx.runs):
            a = await _restart(stack, "a")
            per, cpu = await _measure(
                a.pid, a.agent, creds, sizes, ctx.workdir / f"m{i}", "muster", ctx.quick
            )
            for s in sizes:
                muster_rss[s].append(per[s])
                muster_cpu[s].append(cpu[s])
            async with raw_server(a.data_dir / "ca", ctx.workdir, f"raw{i}") as raw:
                per, _ = await _measure(
                    raw.pid, raw.mtls, creds, sizes, ctx.workdir / f"r{i}", "raw", ctx.quick
                )
            for s in sizes:
                raw_rss[s].append(per[s])
        kib: Callable[[list[float]], list[float]] = lambda xs: [x / 1024 for x in xs]  # noqa: E731
        for s in sizes:
            ratio = [m / r for m, r in zip(muster_rss[s], raw_rss[s], strict=True) if r > 0]
            fig = Figure("idle", f"RSS per agent at {s:,}", "KiB", kib(muster_rss[s]),
                         "raw idle grpc.aio stream + connection", kib(raw_rss[s]), "Muster / raw",
                         ratio, "<= 1.25x raw", Summary.of(ratio).median <= 1.25)  # fmt: skip
            result.figures.append(fig)
        for s in sizes:
            result.figures.append(
                Figure("idle", f"server CPU with {s:,} idle", "cores", muster_cpu[s])
            )
        if ctx.profile and not ctx.quick:
            a = await _restart(stack, "a")
            size = max(sizes)
            fleets = await start_fleets(
                creds, [(i, a.agent) for i in range(size)], log_dir=ctx.workdir, name="prof"
            )
            try:
                await wait_until(fleets, lambda st: st.connected >= size, 600, "agents")
                async with sampled(a.pid, ctx.workdir / "profile.txt") as prof:
                    await asyncio.sleep(10)
                result.profile = prof.markdown(f"the server holding {size:,} idle agents, 10 s")
            finally:
                await asyncio.gather(*(f.stop() for f in fleets))
    return result


async def _restart(stack: Stack, name: str):  # type: ignore[no-untyped-def]
    for replica in stack.replicas:
        if replica.name == name:
            await replica.stop()
    return await stack.start(name)
