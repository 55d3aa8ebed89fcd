"""Reconnect storm: restart the server under N connected agents and time until every agent
is back on a new stream, against the time N fresh mTLS streams take on the raw server."""

from __future__ import annotations

import asyncio
import time

from bench.fleet import start_fleets, wait_until
from bench.load import clients_for, dispatch, enroll_to_file
from bench.rawserver import raw_server
from bench.results import Context, Figure, ScenarioResult, Summary
from bench.stack import Stack, port_of

PER_PROCESS = 500


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "reconnect", "reconnect storm: restart the server under connected agents"
    )
    count = ctx.scale(300, 100)
    probe = max(10, count // 10)
    result.notes.append(
        f"{count} simulated agents in fleet processes of {PER_PROCESS}. Muster: SIGTERM the "
        "server (it sends Drain, then stops after its 2 s grace), start it again on the same "
        "ports; time from the new server listening (endpoints.json written) to the last agent's "
        "Welcome on a new stream. Agents reconnect like the daemon: full-jitter backoff from "
        "0.2 s doubling to 30 s, reset after a Drain. Then "
        f"{probe} tasks are submitted to check they take work. Raw: the same number of "
        "agents open a new mTLS connection and bidi stream to the raw server at once; time "
        "until the last first echo."
    )
    if not ctx.quick:
        result.notes.append(
            "Scaled down from 1,000 agents to keep a full run short (first cut while idle "
            "agents still polled Postgres each second; see idle and the analysis)."
        )
    muster: list[float] = []
    raw_times: list[float] = []
    work: list[float] = []
    async with Stack.create(ctx.workdir) as stack:
        a = await stack.start("a")
        ports = (port_of(a.api), port_of(a.agent))
        creds = ctx.workdir / "creds.json"
        await enroll_to_file(a, count, creds, "storm")
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
            fleets = await start_fleets(
                creds, [(n, a.agent) for n in range(count)], log_dir=ctx.workdir,
                name=f"muster{i}", per_process=PER_PROCESS,
            )  # fmt: skip
            try:
                await wait_until(fleets, lambda s: s.connected >= count, 600, "agents")
                await a.stop()
                # Marked once the old server is gone: agents it welcomed while draining
                # do not count as back.
                for f in fleets:
                    f.mark()
                await asyncio.sleep(0.2)
                a = await stack.start("a", api_port=ports[0], agent_port=ports[1])
                ready = time.monotonic()
                status = await wait_until(fleets, lambda s: s.fresh >= count, 600, "reconnect")
                muster.append(status.last_welcome - ready)
                async with clients_for([a]) as clients:
                    before = time.monotonic()
                    await dispatch(clients, fleets, probe)
                    work.append(time.monotonic() - before)
                await wait_until(fleets, lambda s: s.connected >= count, 30, "all still connected")
            finally:
                await asyncio.gather(*(f.stop() for f in fleets))
    ratio = [m / r for m, r in zip(muster, raw_times, strict=True)]
    result.figures += [
        Figure("reconnect", f"seconds until all {count:,} are back", "s", muster,
               f"raw: {count:,} new mTLS streams at once", raw_times, "Muster / raw", ratio,
               "<= 2x raw", Summary.of(ratio).median <= 2.0),
        Figure("reconnect", f"then {probe} tasks done", "s", work),
    ]  # fmt: skip
    return result
