"""Reconnect storm: restart the server under N connected agents and time until every agent
is back on a new stream, against the time N fresh mTLS streams take on the raw server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from bench.fleet import start_fleets, wait_until
from bench.load import clients_for, dispatch
from bench.profiling import Profile, sampled
from bench.rawserver import raw_server
from bench.results import Context, Figure, ScenarioResult, Summary
from bench.seed import seed_agents
from bench.stack import Replica, Stack, port_of

PER_PROCESS = 500


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "reconnect", "reconnect storm: restart the server under connected agents"
    )
    count = ctx.scale(1000, 200)
    probe = max(10, count // 10)
    result.notes.append(
        f"{count:,} simulated agents in fleet processes of {PER_PROCESS}, enrolled by "
        "certifying their keys with the CA and writing their rows directly (untimed setup). "
        "Muster: SIGTERM the server (it sends Drain, refuses new streams, stops after its 2 s "
        "grace), start it again on the same ports; time from the new server listening "
        "(endpoints.json written) to the last agent's Welcome on a new stream (the server "
        "registers a stream for work as it sends the Welcome). Agents reconnect like the "
        "daemon (agent.backoff): after a Drain, retries within a jittered 1 s window for "
        "15 s, then full-jitter backoff from 0.2 s doubling to 30 s. Then "
        f"{probe} tasks are submitted and must all be done by the agents. Raw: the same "
        "agents open a new mTLS connection and bidi stream to the raw server at once; time "
        "until the last first echo."
    )
    muster: list[float] = []
    raw_times: list[float] = []
    total: list[float] = []
    work: list[float] = []
    async with Stack.create(ctx.workdir) as stack:
        a = await stack.start("a")
        creds = ctx.workdir / "creds.json"
        await seed_agents(stack, count, creds, "storm")
        for i in range(ctx.runs):
            async with raw_server(a.data_dir / "ca", ctx.workdir, f"raw{i}") as raw:
                fleets = await start_fleets(
                    creds, [(n, raw.mtls) for n in range(count)], log_dir=ctx.workdir,
                    name=f"raw{i}", mode="raw", wait_go=True, per_process=PER_PROCESS,
                )  # fmt: skip
                try:
                    await asyncio.sleep(2.0)  # the workers have loaded their credentials
                    started = time.monotonic()
                    for f in fleets:
                        f.go()
                    status = await wait_until(fleets, lambda s: s.connected >= count, 300, "raw")
                    raw_times.append(status.last_welcome - started)
                finally:
                    await asyncio.gather(*(f.stop() for f in fleets))
            a, storm = await _storm(stack, a, creds, count, probe, f"muster{i}")
            muster.append(storm.back)
            total.append(storm.total)
            work.append(storm.work)
        if ctx.profile:
            path = ctx.workdir / "profile.txt"
            a, storm = await _storm(stack, a, creds, count, probe, "profiled", path)
            if storm.profile is not None:
                result.profile = storm.profile.markdown(
                    f"the restarted server from its start until all {count:,} agents were "
                    f"back and the {probe} tasks done (one extra run)"
                )
    ratio = [m / r for m, r in zip(muster, raw_times, strict=True)]
    result.figures += [
        Figure("reconnect", f"seconds until all {count:,} are back", "s", muster,
               f"raw: {count:,} new mTLS streams at once", raw_times, "Muster / raw", ratio,
               "<= 2x raw", Summary.of(ratio).median <= 2.0),
        Figure("reconnect", "seconds from SIGTERM until all are back", "s", total),
        Figure("reconnect", f"then {probe} tasks done", "s", work),
    ]  # fmt: skip
    return result


@dataclass
class Storm:
    back: float
    """From the new server listening to the last agent's Welcome."""
    total: float
    """From SIGTERM to the old server to the last agent's Welcome."""
    work: float
    profile: Profile | None


async def _storm(
    stack: Stack,
    a: Replica,
    creds: Path,
    count: int,
    probe: int,
    name: str,
    profile_path: Path | None = None,
) -> tuple[Replica, Storm]:
    """Connect ``count`` agents to ``a``, restart it, time their return, give them work."""
    ports = (port_of(a.api), port_of(a.agent))
    fleets = await start_fleets(
        creds, [(n, a.agent) for n in range(count)], log_dir=stack.workdir,
        name=name, per_process=PER_PROCESS,
    )  # fmt: skip
    try:
        await wait_until(fleets, lambda s: s.connected >= count, 600, "agents")
        stopping = time.monotonic()
        await a.stop()
        # Marked once the old server is gone: agents it welcomed while draining do not
        # count as back.
        for f in fleets:
            f.mark()
        await asyncio.sleep(0.2)
        a = await stack.start("a", api_port=ports[0], agent_port=ports[1])
        ready = time.monotonic()
        async with contextlib.AsyncExitStack() as profiling:
            profile = None
            if profile_path is not None:
                profile = await profiling.enter_async_context(sampled(a.pid, profile_path))
            status = await wait_until(fleets, lambda s: s.fresh >= count, 600, "reconnect")
            async with clients_for([a]) as clients:
                before = time.monotonic()
                await dispatch(clients, fleets, probe)
                work = time.monotonic() - before
        await wait_until(fleets, lambda s: s.connected >= count, 30, "all still connected")
    finally:
        await asyncio.gather(*(f.stop() for f in fleets))
    storm = Storm(status.last_welcome - ready, status.last_welcome - stopping, work, profile)
    return a, storm
