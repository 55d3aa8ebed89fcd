"""AI work under budgets: what reserving each attempt's worst case at dispatch and settling
it on the result costs in throughput, and whether any budget is overspent when many agents
on two replicas race for it.

Agents are simulated (``bench/aiagent.py``): each ``anthropic.messages`` Assignment is one
call to the fake Messages API on loopback, answered at once, and its usage goes back in
the Result, which the server prices and settles.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from bench.aiagent import AI_KIND, PLAIN_KIND, start_ai_fleet
from bench.fleet import Fleet, combined, wait_until
from bench.load import enroll_to_file
from bench.profiling import sampled
from bench.results import Context, Figure, ScenarioResult, Summary
from bench.stack import Replica, Stack
from muster import AsyncAdminClient, AsyncClient, ClientConfig, NotFoundError, TaskState
from muster.ai import parse_ai_payload
from muster.server.ai.prices import PriceTable

AGENTS = 8
"""For the throughput runs (as the dispatch scenario), on one replica."""
RACE_AGENTS = 32
"""For the overspend runs: 16 on each replica, 8 slots each."""
SUBMITTERS = 32
WARMUP = 50
MODEL = "claude-haiku-4-5"
MAX_TOKENS = 64
PAYLOAD = json.dumps(
    {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    }
).encode()
TENANT = "bench-ai"
BIG_LIMIT_USD = 1_000_000.0
RACE_AFFORDS = 40
"""The tight budget holds this many worst cases."""


async def start_replica(stack: Stack, name: str) -> Replica:
    """Like the submission rate, the AI admission limits are set so high that they never
    refuse (they are still checked, in Redis, on every AI Submit)."""
    return await stack.start(
        name, ai_requests_per_minute="100000000", ai_tokens_per_minute="1000000000"
    )


def worst_case() -> int:
    """One attempt's reservation in micro-dollars, as the server computes it."""
    price = PriceTable.load().price("anthropic", MODEL)
    assert price is not None
    request = parse_ai_payload(AI_KIND, PAYLOAD)
    return price.worst_case_micros(request.input_bytes, request.max_tokens)


def scopes(tenant: str) -> list[str]:
    return ["global", f"tenant:{tenant}", "pool:default"]


@asynccontextmanager
async def ai_agents_on(
    replicas: Sequence[Replica],
    creds_file: Path,
    count: int,
    workdir: Path,
    *,
    max_concurrency: int = 4,
    output_tokens: int | None = None,
) -> AsyncIterator[list[Fleet]]:
    """``count`` simulated AI agents in one process, round-robin over ``replicas``."""
    assignments = [(i, replicas[i % len(replicas)].agent) for i in range(count)]
    fleet = await start_ai_fleet(
        creds_file,
        assignments,
        log_path=workdir / "ai-agents.log",
        max_concurrency=max_concurrency,
        output_tokens=output_tokens,
    )
    try:
        await wait_until([fleet], lambda s: s.connected >= count, 120, f"{count} AI agents")
        yield [fleet]
    finally:
        await fleet.stop()


@asynccontextmanager
async def clients_for(replicas: Sequence[Replica], token: str) -> AsyncIterator[list[AsyncClient]]:
    async with AsyncExitStack() as stack:
        clients = []
        for r in replicas:
            config = ClientConfig(address=r.api, token=token, ca_file=r.bundle_path)
            clients.append(await stack.enter_async_context(AsyncClient(config)))
        yield clients


async def submitter_token(replica: Replica, tenant: str) -> str:
    async with replica.admin() as admin:
        _, secret = await admin.create_api_token(f"{tenant}-submitter", "submitter", tenant=tenant)
    return secret


async def submit_many(
    clients: Sequence[AsyncClient], kind: str, count: int, concurrency: int = SUBMITTERS
) -> float:
    """Submit ``count`` tasks, ``concurrency`` calls in flight; returns the start time."""
    counter = itertools.count()
    started = time.monotonic()

    async def closed_loop() -> None:
        while (i := next(counter)) < count:
            await clients[i % len(clients)].submit(kind, PAYLOAD, max_attempts=1)

    await asyncio.gather(*(closed_loop() for _ in range(concurrency)))
    return started


async def throughput(
    clients: Sequence[AsyncClient], fleets: list[Fleet], kind: str, count: int
) -> float:
    """Tasks per second from the first Submit until the agents hold the last Ack."""
    before = combined(fleets).acked
    started = await submit_many(clients, kind, count)
    status = await wait_until(
        fleets, lambda s: s.acked >= before + count, 300, f"{count} results to be acked"
    )
    return count / (status.last_ack - started)


async def set_budgets(admin: AsyncAdminClient, on: bool) -> None:
    for scope in scopes(TENANT):
        if on:
            await admin.set_budget(scope, BIG_LIMIT_USD, "none")
        else:
            with contextlib.suppress(NotFoundError):
                await admin.delete_budget(scope)


class Sampler:
    """GetBudget through every replica in turn while a race runs: the highest spent +
    reserved seen."""

    def __init__(self, admins: Sequence[AsyncAdminClient], scope: str) -> None:
        self._admins = admins
        self._scope = scope
        self.samples = 0
        self.peak = 0

    async def run(self) -> None:
        for i in itertools.count():
            budget = await self._admins[i % len(self._admins)].get_budget(self._scope)
            self.samples += 1
            self.peak = max(self.peak, budget.spent_micros + budget.reserved_micros)
            await asyncio.sleep(0.02)


async def race(
    replicas: Sequence[Replica], fleets: list[Fleet], tenant: str, count: int, worst: int
) -> dict[str, Any]:
    """``count`` AI tasks of ``tenant`` through every replica at once against a budget of
    :data:`RACE_AFFORDS` worst cases; once it has let through all it can, measure it, then
    raise it and let the rest finish."""
    scope = f"tenant:{tenant}"
    limit = RACE_AFFORDS * worst
    token = await submitter_token(replicas[0], tenant)
    async with AsyncExitStack() as stack:
        admins = [await stack.enter_async_context(r.admin()) for r in replicas]
        clients = await stack.enter_async_context(clients_for(replicas, token))
        await admins[0].set_budget(scope, limit / 1_000_000, "none")
        sampler = Sampler(admins, scope)
        sampling = asyncio.create_task(sampler.run())
        before = combined(fleets).acked
        try:
            started = await submit_many(clients, AI_KIND, count, concurrency=2 * SUBMITTERS)
            deadline = time.monotonic() + 120
            while True:  # until nothing is reserved and no further worst case fits
                budget = await admins[0].get_budget(scope)
                if budget.reserved_micros == 0 and budget.left_micros < worst:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the budget did not settle: {budget}")
                await asyncio.sleep(0.1)
            seconds = time.monotonic() - started
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        ran = len(await clients[0].list(states=[TaskState.SUCCEEDED], limit=None))
        await admins[0].set_budget(scope, count * worst / 1_000_000, "none")
        await wait_until(
            fleets, lambda s: s.acked >= before + count, 120, "the held tasks to finish"
        )
    return {
        "limit": limit,
        "spent": budget.spent_micros,
        "peak": sampler.peak,
        "samples": sampler.samples,
        "ran": ran,
        "held": count - ran,
        "seconds": seconds,
    }


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "ai", "AI tasks: budget reserve + settle at dispatch, and overspend under concurrency"
    )
    count = ctx.scale(1000, 100)
    race_count = ctx.scale(400, 120)
    worst = worst_case()
    result.notes.append(
        f"anthropic.messages tasks ({MODEL}, max_tokens {MAX_TOKENS}: each attempt reserves "
        f"its worst case of {worst} micro-USD) run by simulated agents (bench/aiagent.py): "
        "each Assignment is one call to the fake Messages API (tests/fakes, loopback, "
        "non-streaming, answered at once) and the Result carries the usage it reported."
    )
    result.notes.append(
        f"Throughput: {count} tasks per run through one replica, {AGENTS} agents "
        f"(max_concurrency 4), {SUBMITTERS} concurrent submitters. Budgets set: global, "
        f"tenant:{TENANT} and pool:default with {BIG_LIMIT_USD:,.0f} USD limits, so every "
        "attempt reserves on three scopes at once and settles them on its result. No "
        "budgets: none set; the gate still checks the provider back-off and makes its "
        "(scope-less) reservation call, so the ratio is the cost of budgets being set. "
        "Plain: the same payload as kind noop (no AI validation, reservation or pricing; "
        "the agent makes the same API call). Modes alternate within each run."
    )
    on: list[float] = []
    off: list[float] = []
    plain: list[float] = []
    races: list[dict[str, Any]] = []
    async with Stack.create(ctx.workdir) as stack:
        a = await start_replica(stack, "a")
        creds = ctx.workdir / "creds.json"
        await enroll_to_file(a, RACE_AGENTS, creds, "ai")
        token = await submitter_token(a, TENANT)
        async with (
            a.admin() as admin,
            ai_agents_on([a], creds, AGENTS, ctx.workdir / "throughput") as fleets,
            clients_for([a], token) as clients,
        ):
            await throughput(clients, fleets, AI_KIND, WARMUP)
            await throughput(clients, fleets, PLAIN_KIND, WARMUP)
            for i in range(ctx.runs):
                modes = ("on", "off", "plain") if i % 2 == 0 else ("plain", "off", "on")
                for mode in modes:
                    await set_budgets(admin, mode == "on")
                    kind = PLAIN_KIND if mode == "plain" else AI_KIND
                    tp = await throughput(clients, fleets, kind, count)
                    {"on": on, "off": off, "plain": plain}[mode].append(tp)
            ratio = [x / y for x, y in zip(on, off, strict=True) if y]
            if Summary.of(ratio).median < 0.9 and ctx.profile:
                await set_budgets(admin, True)
                async with sampled(a.pid, ctx.workdir / "profile.txt") as prof:
                    await throughput(clients, fleets, AI_KIND, count)
                result.profile = prof.markdown("server `a` during one extra run, budgets set")
            await set_budgets(admin, False)

        b = await start_replica(stack, "b")
        async with ai_agents_on(
            [a, b],
            creds,
            RACE_AGENTS,
            ctx.workdir / "race",
            max_concurrency=8,
            output_tokens=MAX_TOKENS,
        ) as fleets:
            for i in range(ctx.runs):
                races.append(await race([a, b], fleets, f"race-{i}", race_count, worst))
    result.notes.append(
        f"Overspend: per run a fresh tenant with a budget of {RACE_AFFORDS} worst cases "
        f"({RACE_AFFORDS * worst} micro-USD, period none); {race_count} of its tasks "
        f"submitted through both replicas at once (64 submitters), {RACE_AGENTS} agents "
        "(16 per replica, 8 slots each, answers reporting max_tokens of output, so each "
        "attempt costs close to its worst case). Once nothing is reserved and less than a "
        "worst case is left, overspend = max(0, spent - limit); spent + reserved was also "
        "sampled through both replicas' GetBudget every 20 ms. The limit is then raised "
        "and every held task must finish."
    )
    result.notes.append(
        "Races: "
        + "; ".join(
            f"limit {r['limit']} micro-USD, settled {r['spent']} ({r['ran']} tasks ran, "
            f"{r['held']} held back, steady after {r['seconds']:.1f} s), highest spent + "
            f"reserved {r['peak']} over {r['samples']} samples"
            for r in races
        )
    )
    versus_plain = [x / y for x, y in zip(on, plain, strict=True) if y]
    overspend = [float(max(0, r["spent"] - r["limit"])) for r in races]
    overcommit = [float(max(0, r["peak"] - r["limit"])) for r in races]
    result.figures += [
        Figure(
            "ai",
            "throughput, budgets set",
            "tasks/s",
            on,
            "no budgets set",
            off,
            "set / not set",
            ratio,
            ">= 0.9",
            Summary.of(ratio).median >= 0.9,
        ),
        Figure(
            "ai",
            "throughput, budgets set vs plain tasks",
            "tasks/s",
            on,
            "same payload as kind noop",
            plain,
            "AI / plain",
            versus_plain,
        ),
        Figure(
            "ai",
            "largest overspend (settled - limit)",
            "micro-USD",
            overspend,
            target="0",
            met=bool(races) and max(overspend) == 0,
        ),
        Figure(
            "ai",
            "largest spent + reserved above limit (sampled)",
            "micro-USD",
            overcommit,
            target="0",
            met=bool(races) and max(overcommit) == 0,
        ),
        Figure("ai", "tasks run before the budget held", "tasks", [r["ran"] for r in races]),
    ]
    return result
