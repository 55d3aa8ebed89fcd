"""Idle connected agents: how much server memory one more connected agent costs, against a
raw grpc.aio server holding the same idle bidi streams, one mTLS connection each."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from pathlib import Path

from bench import procs
from bench.fleet import MAX_PER_PROCESS, Fleet, start_fleets, wait_until
from bench.profiling import Profile, sampled
from bench.rawserver import raw_server
from bench.results import Context, Figure, ScenarioResult, Summary
from bench.seed import seed_agents
from bench.stack import Replica, Stack

SETTLE = 3.0
CPU_WINDOW = 5.0
PROFILE_SECONDS = 10.0
CONNECT_TIMEOUT = 300.0
CONNECT_RATE = 100.0
"""Agents started per second: idle measures holding agents, not a connect storm (that is
reconnect), and a fleet booting all at once would time out its Welcomes on a busy core."""
FULL_SIZES = [1000, 5000, 10000]
QUICK_SIZES = [300]


async def _measure(
    pid: int,
    endpoint: str,
    creds: Path,
    sizes: list[int],
    workdir: Path,
    mode: str,
    quick: bool,
    profile_path: Path | None = None,
) -> tuple[dict[int, float], dict[int, float], Profile | None]:
    """Per-agent RSS (bytes) and server CPU (fraction of a core) at each size reached, and a
    profile of the server at the largest when ``profile_path`` is given. A size whose agents
    do not all connect within ``CONNECT_TIMEOUT`` ends the climb."""
    settle, window = (1.0, 2.0) if quick else (SETTLE, CPU_WINDOW)
    await asyncio.sleep(settle)
    base = procs.rss_bytes(pid)
    per_agent: dict[int, float] = {}
    cpu: dict[int, float] = {}
    fleets: list[Fleet] = []
    connected = 0
    profile = None
    try:
        for size in sizes:
            assignments = [(i, endpoint) for i in range(connected, size)]
            processes = -(-len(assignments) // MAX_PER_PROCESS)
            fleets += await start_fleets(
                creds, assignments, log_dir=workdir, name=f"{mode}-{size}", mode=mode,
                ramp=CONNECT_RATE / processes,
            )  # fmt: skip
            try:
                await wait_until(
                    fleets, lambda s, n=size: s.connected >= n, CONNECT_TIMEOUT, f"{size} agents"
                )
            except TimeoutError:
                break  # reported as missing: this server cannot hold that many
            connected = size
            await asyncio.sleep(settle)
            per_agent[size] = (procs.rss_bytes(pid) - base) / size
            c0, t0 = procs.cpu_seconds(pid), time.monotonic()
            await asyncio.sleep(window)
            cpu[size] = (procs.cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        if profile_path is not None and per_agent:
            async with sampled(pid, profile_path) as profile:
                await asyncio.sleep(PROFILE_SECONDS)
    finally:
        await asyncio.gather(*(f.stop() for f in fleets))
    return per_agent, cpu, profile


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("idle", "idle connected agents over mTLS: server RSS per agent")
    sizes = QUICK_SIZES if ctx.quick else FULL_SIZES
    result.notes.append(
        f"Sizes measured: {', '.join(f'{s:,}' for s in sizes)} agents, all on one server "
        "process, each on its own mTLS connection, in fleet processes of up to 2,500 agents, "
        f"started at {CONNECT_RATE:.0f} per second; "
        f"per agent = (server RSS with N connected, {SETTLE:.0f} s after the last connected - "
        "RSS before any) / N. Raw: the same agents' certificates, the same sizes in the same "
        "run, one idle bidi echo stream each, Heartbeat-sized messages at Muster's heartbeat "
        "interval (5 s). Agents are enrolled by certifying their keys with the CA and "
        "writing their rows directly (untimed setup; the enrollment scenario measures the "
        "enrollment RPC)."
    )
    muster_rss: dict[int, list[float]] = {s: [] for s in sizes}
    raw_rss: dict[int, list[float]] = {s: [] for s in sizes}
    muster_cpu: dict[int, list[float]] = {s: [] for s in sizes}
    raw_cpu: dict[int, list[float]] = {s: [] for s in sizes}
    async with Stack.create(ctx.workdir) as stack:
        creds = ctx.workdir / "creds.json"
        await seed_agents(stack, max(sizes), creds, "idle")
        for i in range(ctx.runs):
            a = await _restart(stack, "a")
            last = i == ctx.runs - 1
            profile_path = ctx.workdir / "profile.txt" if ctx.profile and last else None
            per, cpu, profile = await _measure(
                a.pid,
                a.agent,
                creds,
                sizes,
                ctx.workdir / f"m{i}",
                "muster",
                ctx.quick,
                profile_path,
            )
            if profile is not None:
                result.profile = profile.markdown(
                    f"the server holding {max(per):,} idle agents, {PROFILE_SECONDS:.0f} s"
                )
            for s in sizes:
                muster_rss[s].append(per.get(s, math.nan))
                muster_cpu[s].append(cpu.get(s, math.nan))
            async with raw_server(a.data_dir / "ca", ctx.workdir, f"raw{i}") as raw:
                per, cpu, _ = await _measure(
                    raw.pid, raw.mtls, creds, sizes, ctx.workdir / f"r{i}", "raw", ctx.quick
                )
            for s in sizes:
                raw_rss[s].append(per.get(s, math.nan))
                raw_cpu[s].append(cpu.get(s, math.nan))
    kib: Callable[[list[float]], list[float]] = lambda xs: [x / 1024 for x in xs]  # noqa: E731
    for s in sizes:
        ratio = [m / r for m, r in zip(muster_rss[s], raw_rss[s], strict=True) if r > 0]
        if any(math.isnan(m) for m in muster_rss[s]):
            result.notes.append(f"Muster: {s:,} agents did not all connect within "
                                f"{CONNECT_TIMEOUT:.0f} s in at least one run.")  # fmt: skip
        fig = Figure("idle", f"RSS per agent at {s:,}", "KiB", kib(muster_rss[s]),
                     "raw idle grpc.aio stream + connection", kib(raw_rss[s]), "Muster / raw",
                     ratio, "<= 1.25x raw", Summary.of(ratio).median <= 1.25,
                     key="idle.rss" if s == max(sizes) else "")  # fmt: skip
        result.figures.append(fig)
    for s in sizes:
        result.figures.append(
            Figure("idle", f"server CPU with {s:,} idle", "cores", muster_cpu[s],
                   "raw server, same streams", raw_cpu[s])
        )  # fmt: skip
    return result


async def _restart(stack: Stack, name: str) -> Replica:
    for replica in stack.replicas:
        if replica.name == name:
            await replica.stop()
    return await stack.start(name)
