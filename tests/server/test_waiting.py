"""Tasks that say why they wait: each waiting reason reached with a real server and real
streams, the Submit warning, and the order in which reasons are checked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from muster import AsyncAdminClient, AsyncClient, Task, TaskState, WaitingReason
from muster.server.app import ServerHandle, start_server
from muster.server.dispatch.budgets import (
    WAITING_FOR_BUDGET,
    WAITING_FOR_PROVIDER,
    WAITING_FOR_STORE,
)
from muster.server.dispatch.inflight import STORE_DOWN
from muster.server.services import waiting
from muster.server.services.waiting import held_back_code
from muster.server.storage import presence as presence_store
from muster.server.storage.models import Task as StoredTask
from muster.server.storage.types import utcnow
from muster.v1 import agent_pb2, common_pb2
from tests.agentsim import Enroller, SimAgent
from tests.conftest import client_config, server_config

pytestmark = pytest.mark.slow


async def until(
    client: AsyncClient, task_id: str, check: Callable[[Task], bool], timeout: float = 10.0
) -> Task:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        task = await client.get(task_id)
        if check(task) or loop.time() > deadline:
            return task
        await asyncio.sleep(0.05)


async def test_a_pool_without_agents_warns_at_submit_and_says_so_while_queued(
    client: AsyncClient,
) -> None:
    task = await client.submit("echo", b"x", pool="nobody-home")
    assert task.submit_warning == (
        "no enabled agent is enrolled in pool nobody-home: the task waits until one is"
    )
    assert task.waiting_reason_code is WaitingReason.NO_AGENT_IN_POOL
    seen = await client.get(task.task_id)
    assert seen.state is TaskState.QUEUED
    assert seen.waiting_reason_code is WaitingReason.NO_AGENT_IN_POOL
    assert seen.waiting_reason == "no enabled agent is enrolled in pool nobody-home"
    assert seen.submit_warning == ""  # only what submit() returns carries it


async def test_a_kind_no_connected_agent_offers(client: AsyncClient, enroller: Enroller) -> None:
    enrolled = await enroller.enroll("echoer")
    # Enrolled, never connected: what it runs is not known, so no warning, but it waits.
    task = await client.submit("render", b"x")
    assert task.submit_warning == ""
    assert task.waiting_reason_code is WaitingReason.NO_AGENT_FOR_KIND
    assert task.waiting_reason == "no agent of pool default is connected (1 agent enrolled)"

    agent = SimAgent.of(enrolled)
    await agent.hello(capabilities=("echo", "sleep"))
    agent.keep_alive()
    seen = await client.get(task.task_id)
    assert seen.waiting_reason_code is WaitingReason.NO_AGENT_FOR_KIND
    assert seen.waiting_reason == (
        "no connected agent of pool default offers kind render (they offer: echo, sleep)"
    )
    # Now its kinds are known: a new task of a kind it never offered is flagged.
    again = await client.submit("render", b"y")
    assert again.submit_warning == (
        "no agent of pool default has offered kind render (they offer: echo, sleep): "
        "the task waits until one does"
    )
    assert (await client.submit("echo", b"z")).submit_warning == ""
    await agent.close()


async def test_a_selector_no_agent_matches(client: AsyncClient, enroller: Enroller) -> None:
    agent = SimAgent.of(await enroller.enroll("zone-a", labels={"zone": "a"}))
    await agent.hello()
    agent.keep_alive()
    task = await client.submit("echo", b"x", selector={"zone": "b"})
    assert task.submit_warning == (
        "no agent of pool default carries the selector's labels zone=b: "
        "the task waits until one enrolls with them"
    )
    seen = await client.get(task.task_id)
    assert seen.waiting_reason_code is WaitingReason.NO_AGENT_MATCHES_SELECTOR
    assert seen.waiting_reason == (
        "no connected agent of pool default that offers kind echo carries the "
        "selector's labels zone=b"
    )
    await agent.close()


async def test_all_matching_agents_busy(client: AsyncClient, enroller: Enroller) -> None:
    agent = SimAgent.of(await enroller.enroll("single-slot"))
    await agent.hello(max_concurrency=1)
    agent.keep_alive()
    first = await client.submit("sleep", {"seconds": 60})
    assignment = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=first.task_id, attempt=assignment.attempt))
    second = await client.submit("sleep", {"seconds": 60})
    assert second.submit_warning == ""
    seen = await until(
        client, second.task_id, lambda t: t.waiting_reason_code is WaitingReason.AGENTS_BUSY
    )
    assert seen.waiting_reason_code is WaitingReason.AGENTS_BUSY
    assert seen.waiting_reason == "all 1 agent that could run it are busy (1 of 1 slots in use)"
    # The running task waits for nothing.
    running = await client.get(first.task_id)
    assert (running.waiting_reason_code, running.waiting_reason) == (WaitingReason.NONE, "")
    await agent.close()


async def test_retry_backoff_until_its_time(client: AsyncClient, enroller: Enroller) -> None:
    agent = SimAgent.of(await enroller.enroll("flaky"))
    await agent.hello(max_concurrency=2)
    agent.keep_alive()
    task = await client.submit("echo", b"x")
    assignment = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=1))
    before = utcnow()
    await agent.finish(
        assignment,
        outcome=agent_pb2.OUTCOME_FAILED,
        error="try later",
        retryable=True,
        retry_after=Duration(seconds=120),
    )
    seen = await until(client, task.task_id, lambda t: t.attempt == 2)
    assert (seen.state, seen.attempt) == (TaskState.QUEUED, 2)
    assert seen.waiting_reason_code is WaitingReason.RETRY_BACKOFF
    assert seen.waiting_until is not None
    assert (
        before + timedelta(seconds=119) <= seen.waiting_until <= utcnow() + timedelta(seconds=120)
    )
    assert seen.waiting_reason.startswith("retry backoff after attempt 1 until ")
    await agent.close()


@pytest.fixture(params=["tenant", "pool"])
async def one_slot(
    request: pytest.FixtureRequest, tmp_path: Path, backend: dict[str, object]
) -> AsyncIterator[ServerHandle]:
    """A server whose tenants, or pools, may have one attempt in flight."""
    limit = {f"inflight_per_{request.param}": 1}
    handle = await start_server(server_config(tmp_path / "data", **limit, **backend))
    try:
        yield handle
    finally:
        await handle.stop(grace=1.0)


async def test_a_tenant_or_pool_at_its_concurrency_limit(one_slot: ServerHandle) -> None:
    server = one_slot
    async with (
        AsyncAdminClient(client_config(server)) as admin,
        AsyncClient(client_config(server)) as client,
    ):
        agent = SimAgent.of(await Enroller(server, admin).enroll("roomy"))
        await agent.hello(max_concurrency=4)
        agent.keep_alive()
        first = await client.submit("sleep", {"seconds": 60})
        assignment = await agent.expect("assignment")
        agent.send(accepted=agent_pb2.Accepted(task_id=first.task_id, attempt=assignment.attempt))
        second = await client.submit("sleep", {"seconds": 60})
        seen = await until(
            client,
            second.task_id,
            lambda t: t.waiting_reason_code is WaitingReason.CONCURRENCY_LIMIT,
        )
        assert seen.state is TaskState.QUEUED
        assert seen.waiting_reason_code is WaitingReason.CONCURRENCY_LIMIT
        full = "tenant admin" if server.config.inflight_per_tenant == 1 else "pool default"
        assert seen.waiting_reason == f"waiting for a slot: {full} has 1 tasks in flight"
        assert seen.waiting_until is not None
        await agent.close()


async def test_a_missing_agent_is_named_before_a_hold_it_would_meet(
    one_slot: ServerHandle,
) -> None:
    """The first reason that holds is given: a held task whose agents then all leave
    waits for an agent, not for the limit."""
    server = one_slot
    async with (
        AsyncAdminClient(client_config(server)) as admin,
        AsyncClient(client_config(server)) as client,
    ):
        agent = SimAgent.of(await Enroller(server, admin).enroll("leaving"))
        await agent.hello(max_concurrency=4)
        agent.keep_alive()
        await client.submit("sleep", {"seconds": 60})
        await agent.expect("assignment")
        second = await client.submit("sleep", {"seconds": 60})
        await until(
            client,
            second.task_id,
            lambda t: t.waiting_reason_code is WaitingReason.CONCURRENCY_LIMIT,
        )
        await agent.close()
        seen = await until(
            client,
            second.task_id,
            lambda t: t.waiting_reason_code is WaitingReason.NO_AGENT_FOR_KIND,
        )
        assert seen.waiting_reason == "no agent of pool default is connected (1 agent enrolled)"


def test_every_reason_dispatch_records_has_its_code() -> None:
    """The reasons dispatch writes (budgets.py, inflight.py) map to their codes; the
    budget, provider and quota-store holds are reached with real servers in
    test_ai_dispatch.py, which checks the codes there too."""
    assert held_back_code(f"{WAITING_FOR_BUDGET} tenant:a: 0 of 1 USD left, 1 needed") == (
        common_pb2.WAITING_REASON_BUDGET
    )
    assert held_back_code(f"{WAITING_FOR_PROVIDER}: m is rate limited") == (
        common_pb2.WAITING_REASON_PROVIDER_BACKOFF
    )
    assert held_back_code(f"{WAITING_FOR_STORE}: AI dispatch stops") == (
        common_pb2.WAITING_REASON_QUOTA_STORE
    )
    assert held_back_code(STORE_DOWN) == common_pb2.WAITING_REASON_QUOTA_STORE
    assert held_back_code("waiting for a slot: pool p has 3 tasks in flight") == (
        common_pb2.WAITING_REASON_CONCURRENCY_LIMIT
    )
    assert held_back_code("") == common_pb2.WAITING_REASON_UNSPECIFIED


async def test_queue_gauges_by_pool_and_kind(server: ServerHandle, client: AsyncClient) -> None:
    for kind, pool in (("render", "gpu"), ("render", "gpu"), ("echo", "gpu"), ("echo", "cpu")):
        await client.submit(kind, b"x", pool=pool)
    sample = server.registry.get_sample_value
    for _ in range(200):  # the reaper refreshes the gauges every few seconds
        if sample("muster_queue_depth", {"pool": "gpu", "kind": "render"}) == 2:
            break
        await asyncio.sleep(0.05)
    assert sample("muster_queue_depth", {"pool": "gpu", "kind": "render"}) == 2
    assert sample("muster_queue_depth", {"pool": "gpu", "kind": "echo"}) == 1
    assert sample("muster_queue_depth", {"pool": "cpu", "kind": "echo"}) == 1
    age = sample("muster_queue_oldest_age_seconds", {"pool": "gpu", "kind": "render"})
    assert age is not None and age >= 0


async def test_concurrent_submissions_each_get_their_own_warning(
    client: AsyncClient, enroller: Enroller
) -> None:
    """Submissions arriving together are checked as one batch; each answer is its own."""
    agent = SimAgent.of(await enroller.enroll("zoned", labels={"zone": "a"}))
    await agent.hello(capabilities=("sleep",), max_concurrency=1)
    agent.keep_alive()
    cases = [
        ("sleep", "default", {"zone": "a"}, ""),
        ("sleep", "elsewhere", {}, "no enabled agent is enrolled in pool elsewhere"),
        ("sleep", "default", {"zone": "b"}, "no agent of pool default carries the selector's"),
        ("render", "default", {}, "no agent of pool default has offered kind render"),
    ] * 5
    tasks = await asyncio.gather(
        *(client.submit(kind, b"x", pool=pool, selector=sel) for kind, pool, sel, _ in cases)
    )
    for task, (_, _, _, expected) in zip(tasks, cases, strict=True):
        assert task.submit_warning.startswith(expected) if expected else not task.submit_warning
    await agent.close()


def queued(**overrides: object) -> Task:
    values: dict[str, object] = {
        "task_id": "t_1",
        "kind": "echo",
        "pool": "default",
        "selector": {},
        "state": "QUEUED",
        "attempt": 1,
        "waiting_reason": "",
        "not_before": None,
    }
    values.update(overrides)
    return StoredTask(**values)


def scene(*, in_flight: int) -> waiting.Snapshot:
    """One enrolled, connected agent of pool default running echo, with two slots."""
    enrolled = presence_store.EnrolledAgent("a1", "default", {}, ("echo",))
    return waiting.Snapshot(
        {"default": [enrolled]},
        {"default": [waiting.Agent({}, ("echo",), 2, in_flight)]},
    )


def test_a_recorded_hold_counts_while_fresh_then_busy_agents_go_first() -> None:
    """Exact times (no sleeping): a hold counts until its end plus hold_fresh; after
    that, all agents busy is the answer if so, else the hold still is."""
    now = utcnow()
    fresh = timedelta(seconds=2)
    reason = "waiting for a slot: tenant t has 1 tasks in flight"
    lapsing = queued(waiting_reason=reason, not_before=now - timedelta(seconds=1))
    lapsed = queued(waiting_reason=reason, not_before=now - timedelta(seconds=3))
    busy, idle = scene(in_flight=2), scene(in_flight=0)
    assert (
        waiting.why(busy, lapsing, now, fresh).code == common_pb2.WAITING_REASON_CONCURRENCY_LIMIT
    )
    assert waiting.why(busy, lapsed, now, fresh).code == common_pb2.WAITING_REASON_AGENTS_BUSY
    assert waiting.why(idle, lapsed, now, fresh).code == common_pb2.WAITING_REASON_CONCURRENCY_LIMIT
    backoff = queued(attempt=2, not_before=now + timedelta(seconds=30))
    found = waiting.why(busy, backoff, now, fresh)
    assert (found.code, found.until) == (
        common_pb2.WAITING_REASON_RETRY_BACKOFF,
        backoff.not_before,
    )
    assert waiting.why(idle, queued(), now, fresh) == waiting.NOTHING
    assert waiting.why(idle, queued(state="RUNNING"), now, fresh) == waiting.NOTHING
    # Structural reasons come before any hold.
    elsewhere = queued(pool="gpu", waiting_reason=reason, not_before=now)
    assert (
        waiting.why(idle, elsewhere, now, fresh).code == common_pb2.WAITING_REASON_NO_AGENT_IN_POOL
    )
