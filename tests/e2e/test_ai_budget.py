"""The budget invariant end to end: two real server replicas on one Postgres and one Redis,
four real agent processes running ``anthropic.messages`` through the real SDK against the
loopback fake Messages API, and 60 concurrent AI tasks against a tenant budget that
affords about ten of them at their actual cost.

Reservations are each attempt's worst case (about twice the actual cost here), so fewer
than ten run; the rest stay QUEUED with their reason. Sampled all along, spent + reserved
never passes the limit, and the settled total never does. Raising the limit lets every
task finish, each calling the provider exactly once. The agents' API key is then looked
for everywhere the control plane writes: logs, audit rows, task rows and /metrics.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from muster import AsyncAdminClient, AsyncClient, Task, TaskState
from muster.ai import parse_ai_payload
from muster.server.ai.prices import PriceTable, TokenUsage
from muster.server.dispatch.budgets import BUDGET_RETRY
from muster.server.storage.models import AuditEvent
from muster.server.storage.models import Task as TaskRow
from tests.conftest import BACKEND
from tests.e2e import procs
from tests.e2e.cluster import (
    AgentProcess,
    Cluster,
    Replica,
    replica_cluster,
    start_agents,
    stop_agents,
    until_connected,
)
from tests.fakes.anthropic_api import FakeAnthropicAPI, Reply

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(BACKEND != "postgres", reason="runs in the Postgres pass (make test)"),
]

KEY = "sk-ant-e2e-budget-" + secrets.token_hex(16)
"""The agents' dummy API key: it must show up nowhere but the fake's auth header."""
TENANT = "acme"
SCOPE = f"tenant:{TENANT}"
TASKS = 60
AFFORDABLE = 10
"""Tasks the budget pays for at their actual cost."""
MODEL = "claude-haiku-4-5"
INPUT_TOKENS, OUTPUT_TOKENS = 1000, 5000
"""What the fake reports for every call (2.6 US cents on claude-haiku-4-5)."""
MAX_TOKENS = 10_000
"""Chosen so one attempt's worst case is about twice its actual cost."""
PAYLOAD = {
    "model": MODEL,
    "max_tokens": MAX_TOKENS,
    "messages": [{"role": "user", "content": "Count the budget's guarantees. " * 33}],
}
CALL_DELAY = 0.1
"""Seconds between the fake's streamed events (a call takes a few of them)."""
WAITING = "waiting for budget"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Two replicas with /metrics on."""
    async with replica_cluster(tmp_path, metrics=True) as cluster:
        yield cluster


async def start_ai_agents(cluster: Cluster, api_url: str) -> list[AgentProcess]:
    """Four agents running anthropic.messages with the key in their own environment only;
    two prefer replica a, two prefer b."""
    args = [
        "--executors", "anthropic.messages",
        "--anthropic-base-url", api_url,
        "--log-level", "debug",
    ]  # fmt: skip
    names = [f"ai-agent-{i}" for i in range(4)]
    return await start_agents(cluster, names=names, args=args, environ={"ANTHROPIC_API_KEY": KEY})


def costs() -> tuple[int, int]:
    """(actual, worst case) of one task in micro-dollars, from the shipped price table."""
    price = PriceTable.load().price("anthropic", MODEL)
    assert price is not None
    request = parse_ai_payload("anthropic.messages", json.dumps(PAYLOAD).encode())
    assert request.input_bytes >= INPUT_TOKENS  # the estimate bounds what the fake reports
    actual = price.cost_micros(TokenUsage(input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS))
    return actual, price.worst_case_micros(request.input_bytes, request.max_tokens)


class BudgetSampler:
    """Reads GetBudget through both replicas in turn while the run goes on."""

    def __init__(self, admins: list[AsyncAdminClient]) -> None:
        self._admins = admins
        self.samples: list[tuple[int, int, int]] = []
        """(limit, spent, reserved) per sample."""

    async def run(self) -> None:
        i = 0
        while True:
            budget = await self._admins[i % len(self._admins)].get_budget(SCOPE)
            self.samples.append((budget.limit_micros, budget.spent_micros, budget.reserved_micros))
            i += 1
            await asyncio.sleep(0.05)

    def over_limit(self) -> list[tuple[int, int, int]]:
        return [s for s in self.samples if s[1] + s[2] > s[0]]


async def submit_all(clients: list[AsyncClient]) -> list[str]:
    """Every task at once, alternating between the replicas."""
    tasks = await asyncio.gather(
        *(clients[i % len(clients)].submit("anthropic.messages", PAYLOAD) for i in range(TASKS))
    )
    return [t.task_id for t in tasks]


async def snapshot(client: AsyncClient, ids: list[str]) -> list[Task]:
    return list(await asyncio.gather(*(client.get(task_id) for task_id in ids)))


def by_state(tasks: list[Task]) -> dict[TaskState, int]:
    counts: dict[TaskState, int] = {}
    for task in tasks:
        counts[task.state] = counts.get(task.state, 0) + 1
    return counts


def held_for_budget(task: Task) -> bool:
    return task.state == TaskState.QUEUED and task.waiting_reason.startswith(WAITING)


async def until_budget_spent(
    client: AsyncClient, admin: AsyncAdminClient, ids: list[str], worst: int, timeout: float
) -> list[Task]:
    """Until the budget has let through all it can: nothing holds a reservation, what is
    left is less than one more worst case, and every task either succeeded or waits for
    the budget with its reason."""
    async with asyncio.timeout(timeout):
        while True:
            budget = await admin.get_budget(SCOPE)
            tasks = await snapshot(client, ids)
            done = [t for t in tasks if t.state == TaskState.SUCCEEDED]
            held = [t for t in tasks if held_for_budget(t)]
            if (
                budget.reserved_micros == 0
                and budget.left_micros < worst
                and len(done) + len(held) == len(ids)
            ):
                return tasks
            await asyncio.sleep(0.3)


async def until_all_succeeded(client: AsyncClient, ids: list[str], timeout: float) -> list[Task]:
    async with asyncio.timeout(timeout):
        while True:
            tasks = await snapshot(client, ids)
            states = by_state(tasks)
            assert not states.get(TaskState.FAILED), [t.error for t in tasks if t.error]
            if states.get(TaskState.SUCCEEDED, 0) == len(ids):
                return tasks
            await asyncio.sleep(0.3)


def metrics_text(replica: Replica) -> str:
    with urllib.request.urlopen(f"http://{replica.metrics}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


async def rows_mentioning(url: str, secret: str) -> list[str]:
    """Audit events and task rows (payload, output, error, reason) that contain ``secret``."""
    engine = create_async_engine(url)
    needle = secret.encode()
    found: list[str] = []
    try:
        async with engine.connect() as conn:
            for event in (await conn.execute(select(AuditEvent))).mappings():
                if secret in repr(dict(event)):
                    found.append(f"audit {event['action']} {event['target']}")
            for task in (await conn.execute(select(TaskRow))).mappings():
                blobs = [task["payload"] or b"", task["output"] or b""]
                texts = repr({k: v for k, v in task.items() if k not in ("payload", "output")})
                if any(needle in blob for blob in blobs) or secret in texts:
                    found.append(f"task {task['task_id']}")
    finally:
        await engine.dispose()
    return found


async def test_sixty_concurrent_ai_tasks_never_overspend_a_budget_of_about_ten(
    cluster: Cluster, tmp_path: Path
) -> None:
    a = cluster.replicas[0]
    actual, worst = costs()
    limit = AFFORDABLE * actual
    assert 1.8 * actual <= worst <= 2.2 * actual, (actual, worst)
    async with AsyncAdminClient(a.client_config()) as admin:
        _, secret = await admin.create_api_token("acme-submitter", "submitter", tenant=TENANT)
    # The budget is set with the CLI, as an operator would.
    token_file = tmp_path / "admin.token"
    token_file.write_text((a.data_dir / "admin.token").read_text())
    code, out, err = await procs.run(
        "budget", "set", SCOPE,
        "--limit-usd", f"{limit / 1_000_000:.6f}",
        "--period", "none",
        "--addr", a.api,
        "--token-file", str(token_file),
        "--ca-file", str(a.data_dir / "ca" / "bundle.pem"),
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, out + err

    async with FakeAnthropicAPI(api_key=KEY, model=MODEL) as api:
        usage = {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS}
        api.queue(*[Reply(chunks=3, delay=CALL_DELAY, usage=usage)] * (3 * TASKS))
        agents = await start_ai_agents(cluster, api.url)
        admins = [AsyncAdminClient(r.client_config()) for r in cluster.replicas]
        clients = [AsyncClient(r.client_config(secret)) for r in cluster.replicas]
        sampler_task: asyncio.Task[None] | None = None
        try:
            counts = await until_connected(cluster, 4)
            assert counts == [2, 2], counts
            assert (await admins[0].get_budget(SCOPE)).limit_micros == limit

            sampler = BudgetSampler(admins)
            sampler_task = asyncio.create_task(sampler.run())
            loop = asyncio.get_running_loop()
            started = loop.time()
            ids = await submit_all(clients)
            first = await until_budget_spent(clients[0], admins[0], ids, worst, timeout=40)
            held_seconds = loop.time() - started
            # Held tasks are looked at again every couple of seconds: none may slip through.
            await asyncio.sleep(2 * BUDGET_RETRY.total_seconds())
            later = await snapshot(clients[1], ids)
            succeeded = {t.task_id for t in first if t.state == TaskState.SUCCEEDED}
            assert {t.task_id for t in later if t.state == TaskState.SUCCEEDED} == succeeded
            assert len(api.requests) == len(succeeded)

            ran = [t for t in first if t.state == TaskState.SUCCEEDED]
            held = [t for t in first if held_for_budget(t)]
            budget = await admins[1].get_budget(SCOPE)
            settled = sum(t.usage.cost_micros for t in ran if t.usage is not None)
            assert AFFORDABLE // 2 <= len(ran) < AFFORDABLE, len(ran)
            assert len(held) == TASKS - len(ran)
            assert all(t.waiting_reason.startswith(f"{WAITING} {SCOPE}:") for t in held)
            assert budget.spent_micros == settled == len(ran) * actual
            assert settled <= limit
            assert budget.reserved_micros == 0
            assert len(api.requests) == len(ran)  # one provider call per task that ran
            example_reason = held[0].waiting_reason

            # Raise the limit: the held tasks fit at their next claim and all finish.
            raised = TASKS * worst
            await admins[1].set_budget(SCOPE, raised / 1_000_000, "none")
            final = await until_all_succeeded(clients[1], ids, timeout=40)
            total_seconds = loop.time() - started
            sampler_task.cancel()
            final_budget = await admins[0].get_budget(SCOPE)
        finally:
            if sampler_task is not None:
                sampler_task.cancel()
                await asyncio.gather(sampler_task, return_exceptions=True)
            for client in clients:
                await client.close()
            for admin_client in admins:
                await admin_client.close()
            await stop_agents(agents, timeout=15)

    assert len(sampler.samples) > 20, len(sampler.samples)
    assert sampler.over_limit() == [], sampler.over_limit()[:5]
    peak = max(spent + reserved for lim, spent, reserved in sampler.samples if lim == limit)
    assert peak <= limit
    assert all(t.usage is not None and t.usage.cost_micros == actual for t in final)
    assert all(len(t.attempt_usage) == 1 for t in final), [len(t.attempt_usage) for t in final]
    assert final_budget.spent_micros == TASKS * actual
    assert final_budget.reserved_micros == 0
    assert len(api.requests) == TASKS  # no task ran twice
    assert all(r.api_key == KEY and KEY.encode() not in r.body for r in api.requests)

    # The key appears nowhere the control plane writes or shows.
    for log in cluster.logs:
        text = log.read_text(errors="replace")
        assert text, f"{log.name} is empty"
        assert KEY not in text, f"the API key is in {log.name}"
    assert await rows_mentioning(cluster.url, KEY) == []
    for replica in cluster.replicas:
        metrics = await asyncio.to_thread(metrics_text, replica)
        assert "muster_budget_reservations_total" in metrics
        assert KEY not in metrics

    print(
        f"\nAI budget e2e ({SCOPE}, {MODEL}, 2 replicas, 4 agents x 8 slots):"
        f"\n  one task: actual {actual} micro-USD, worst case reserved {worst} micro-USD"
        f"\n  limit {limit} micro-USD (= {AFFORDABLE} tasks at actual cost)"
        f"\n  ran before the raise: {len(ran)} tasks, settled {settled} micro-USD "
        f"({settled / limit:.0%} of the limit), held back: {len(held)} "
        f"(steady after {held_seconds:.1f}s)"
        f"\n  highest spent+reserved over {len(sampler.samples)} samples: {peak} micro-USD"
        f"\n  example reason: {example_reason}"
        f"\n  after raising to {raised} micro-USD: {TASKS} SUCCEEDED, "
        f"{len(api.requests)} provider calls, {total_seconds:.1f}s in all"
    )
