"""AI tasks on the server: Submit validates them, dispatch reserves their worst case on
every budget before the Assignment, results settle to the server's price, and what
cannot fit waits QUEUED with its reason. Real server, real TLS, scripted agents; on
the Postgres pass, real Redis budgets."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from muster import AsyncAdminClient
from muster.server.ai.budgets import BudgetRule
from muster.server.app import ServerHandle, start_server
from muster.server.quotas.base import BudgetHold
from muster.server.storage.types import utcnow
from muster.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    common_pb2,
    task_pb2,
    task_pb2_grpc,
)
from tests.agentsim import Enroller, SimAgent
from tests.conftest import client_config, server_config

pytestmark = pytest.mark.slow

MODEL = "claude-sonnet-4-5"  # $3 input, $15 output per million tokens (shipped table)
AI = ("anthropic.messages",)


def messages(max_tokens: int = 1000, text: str = "hi", **extra: Any) -> bytes:
    body = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }
    return json.dumps(body).encode()


def worst_case(payload: bytes, max_tokens: int) -> int:
    """What the server reserves: input at most one token per byte of its JSON at the
    dearest input price ($6/M, 1-hour cache writes), plus max_tokens at $15/M."""
    messages = json.loads(payload)["messages"]
    input_bytes = len(json.dumps(messages, separators=(",", ":")).encode())
    return input_bytes * 6 + max_tokens * 15


class Api:
    """TaskService and AdminService over the wire, as any gRPC client sees them."""

    def __init__(self, server: ServerHandle, token: str | None = None) -> None:
        config = server.config
        bundle = (config.ca_dir / "bundle.pem").read_bytes()
        self.channel = grpc.aio.secure_channel(
            server.api_address, grpc.ssl_channel_credentials(bundle)
        )
        secret = token or config.admin_token_file.read_text().strip()
        self.metadata = (("authorization", f"Bearer {secret}"),)
        self.tasks = task_pb2_grpc.TaskServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    async def submit(self, kind: str = AI[0], payload: bytes = b"", **fields: Any) -> Any:
        request = task_pb2.SubmitRequest(kind=kind, payload=payload or messages(), **fields)
        return (await self.tasks.Submit(request, metadata=self.metadata)).task

    async def get(self, task_id: str) -> common_pb2.Task:
        return await self.tasks.Get(
            task_pb2.GetTaskRequest(task_id=task_id), metadata=self.metadata
        )

    async def budget(self, scope: str, limit_micros: int, period: str = "month") -> Any:
        request = admin_pb2.SetBudgetRequest(scope=scope, limit_micros=limit_micros, period=period)
        return await self.admin.SetBudget(request, metadata=self.metadata)

    async def get_budget(self, scope: str) -> admin_pb2.Budget:
        return await self.admin.GetBudget(
            admin_pb2.GetBudgetRequest(scope=scope), metadata=self.metadata
        )

    async def wait_budget(
        self, scope: str, predicate: Any, timeout: float = 10.0
    ) -> admin_pb2.Budget:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            budget = await self.get_budget(scope)
            if predicate(budget) or loop.time() > deadline:
                return budget
            await asyncio.sleep(0.1)

    async def wait(self, task_id: str, predicate: Any, timeout: float = 10.0) -> common_pb2.Task:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            task = await self.get(task_id)
            if predicate(task) or loop.time() > deadline:
                return task
            await asyncio.sleep(0.1)


@pytest.fixture
async def api(server: ServerHandle) -> AsyncIterator[Api]:
    api = Api(server)
    yield api
    await api.channel.close()


async def ai_agent(enroller: Enroller, name: str, concurrency: int = 4) -> SimAgent:
    agent = SimAgent.of(await enroller.enroll(name))
    await agent.hello(max_concurrency=concurrency, capabilities=AI)
    agent.keep_alive()
    return agent


async def run(agent: SimAgent, usage: common_pb2.Usage | None = None) -> agent_pb2.Assignment:
    """Take the next assignment, accept it, succeed with ``usage``."""
    assignment = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=assignment.task_id, attempt=assignment.attempt))
    ack = await agent.finish(assignment, output=b'{"ok": true}', usage=usage)
    assert ack.status == agent_pb2.ACK_STATUS_RECORDED
    agent.send(credit=agent_pb2.Credit(credits=1))
    return assignment


async def keep_leases(agent: SimAgent, held: list[agent_pb2.Assignment]) -> None:
    """Heartbeat the attempts ``agent`` holds, so their leases do not run out."""
    refs = [common_pb2.AttemptRef(task_id=a.task_id, attempt=a.attempt) for a in held]
    while True:
        agent.send(heartbeat=agent_pb2.Heartbeat(in_flight=refs))
        await asyncio.sleep(0.5)


def code(err: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> grpc.StatusCode:
    return err.value.code()


# Submit


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        (b"not json", "payload"),
        (
            json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens",
        ),
        (messages(max_tokens=10**9), "max_tokens"),
        (messages(extra_key=1), "extra_key"),
        (
            json.dumps(
                {"model": MODEL, "max_tokens": 5, "messages": [{"role": "x", "content": "y"}]}
            ),
            "messages[0].role",
        ),
        (messages(api_key="sk-ant-secret"), "api_key"),
    ],
)
async def test_submit_refuses_a_bad_ai_payload_naming_the_field(
    api: Api, payload: bytes | str, path: str
) -> None:
    data = payload.encode() if isinstance(payload, str) else payload
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.submit(payload=data)
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert path in (err.value.details() or "")
    assert "sk-ant-secret" not in (err.value.details() or "")


async def test_submit_refuses_unpriced_and_disallowed_models(api: Api) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.submit(payload=messages().replace(MODEL.encode(), b"claude-imaginary-9"))
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "no price" in (err.value.details() or "")
    await api.admin.SetPoolSettings(
        admin_pb2.SetPoolSettingsRequest(pool="default", allowed_models=["claude-haiku-4-5"]),
        metadata=api.metadata,
    )
    await asyncio.sleep(1.1)  # the allow-list is cached for a second
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.submit()
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "not allowed in pool 'default'" in (err.value.details() or "")
    assert (await api.submit(pool="other")).state == common_pb2.TASK_STATE_QUEUED


async def test_submit_checks_caps_against_the_worst_case(api: Api) -> None:
    payload = messages(max_tokens=1000)  # worst case 0.015192 USD
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.submit(payload=payload, max_cost_usd=0.01)
    assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "below one attempt's worst case of 0.015192 USD" in (err.value.details() or "")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.submit(payload=payload, max_cost_usd=bad)
        assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
    await api.budget("tenant:admin", 10_000)  # 0.01 USD: less than one attempt
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.submit(payload=payload)
    assert code(err) == grpc.StatusCode.FAILED_PRECONDITION
    assert "budget tenant:admin allows 0.01 USD per month" in (err.value.details() or "")


async def test_submit_checks_the_output_schema(api: Api) -> None:
    for bad in ("{not json", '{"type": 12}'):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.submit(kind="echo", payload=b"{}", output_schema=bad)
        assert code(err) == grpc.StatusCode.INVALID_ARGUMENT
        assert "output_schema" in (err.value.details() or "")
    task = await api.submit(kind="echo", payload=b"{}", output_schema='{"type": "object"}')
    assert task.output_schema == '{"type": "object"}'


# Dispatch


async def test_dispatch_reserves_the_worst_case_and_settles_at_the_server_price(
    api: Api, enroller: Enroller, server: ServerHandle
) -> None:
    await api.budget("global", 1_000_000)
    agent = await ai_agent(enroller, "ai-1")
    payload = messages(max_tokens=1000)
    task = await api.submit(payload=payload, output_schema='{"type": "object"}')
    usage = common_pb2.Usage(
        model=MODEL,
        input_tokens=100,
        output_tokens=200,
        cache_read_input_tokens=1000,
        cost_micros=1,  # an agent's money is ignored
        reported_cost_micros=7777,
    )
    assignment = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=assignment.task_id, attempt=assignment.attempt))
    ack = await agent.finish(assignment, output=b'{"ok": true}', usage=usage)
    # The Ack tells the agent the server's price; a resend is never priced twice.
    assert (ack.status, ack.cost_micros) == (agent_pb2.ACK_STATUS_RECORDED, 3600)
    again = await agent.finish(assignment, output=b'{"ok": true}', usage=usage)
    assert (again.status, again.cost_micros) == (agent_pb2.ACK_STATUS_DUPLICATE, 0)
    assert assignment.max_cost_micros == worst_case(payload, 1000)
    assert assignment.output_schema == '{"type": "object"}'
    done = await api.wait(task.task_id, lambda t: t.state == common_pb2.TASK_STATE_SUCCEEDED)
    # 100 * 3 + 200 * 15 + 1000 * 0.3 micro-dollars
    assert done.usage.cost_micros == 3600
    assert done.usage.reported_cost_micros == 7777
    assert done.usage.cache_read_input_tokens == 1000
    assert [(a.attempt, a.agent_id, a.usage.cost_micros) for a in done.attempt_usage] == [
        (1, "ai-1", 3600)
    ]
    budget = await api.wait_budget("global", lambda b: b.reserved_micros == 0)
    assert (budget.spent_micros, budget.reserved_micros) == (3600, 0)
    await agent.close()
    sample = server.registry.get_sample_value
    labels = {"kind": "anthropic.messages", "model": MODEL}
    assert sample("muster_llm_tokens_total", {**labels, "type": "output"}) == 200
    assert sample("muster_llm_tokens_total", {**labels, "type": "cache_read"}) == 1000
    assert sample("muster_llm_cost_usd_total", labels) == pytest.approx(0.0036)
    assert sample("muster_budget_reservations_total", {"outcome": "reserved"}) == 1
    # The gauge shows what is left of each budget (refreshed every few seconds).
    left = None
    for _ in range(100):
        left = sample("muster_budget_remaining_usd", {"scope": "global"})
        if left == pytest.approx(0.9964):
            break
        await asyncio.sleep(0.1)
    assert left == pytest.approx(0.9964)
    assert sample("muster_budget_limit_usd", {"scope": "global"}) == 1.0


async def test_what_does_not_fit_waits_with_its_reason_until_the_limit_is_raised(
    api: Api, enroller: Enroller
) -> None:
    payload = messages(max_tokens=1000)
    need = worst_case(payload, 1000)  # 15_192 micro-dollars
    await api.budget("tenant:admin", need * 2 + 1000)
    agent = await ai_agent(enroller, "ai-2", concurrency=8)
    tasks = [await api.submit(payload=payload) for _ in range(4)]
    held = [await agent.expect("assignment") for _ in range(2)]
    for assignment in held:
        agent.send(accepted=agent_pb2.Accepted(task_id=assignment.task_id, attempt=1))
    beats = asyncio.create_task(keep_leases(agent, held))  # as a running agent does
    with pytest.raises(TimeoutError):
        await agent.expect("assignment", timeout=1.0)
    waiting = [t for t in tasks if t.task_id not in {a.task_id for a in held}]
    for task in waiting:
        seen = await api.wait(task.task_id, lambda t: "waiting for budget" in t.waiting_reason)
        assert seen.state == common_pb2.TASK_STATE_QUEUED
        assert seen.waiting_reason == (
            "waiting for budget tenant:admin: 0.001 of 0.031384 USD left, 0.015192 needed"
        )
        assert seen.waiting_reason_code == common_pb2.WAITING_REASON_BUDGET
    budget = await api.get_budget("tenant:admin")
    assert budget.reserved_micros == 2 * need
    await api.budget("tenant:admin", need * 10)
    assert len([await agent.expect("assignment", timeout=5) for _ in range(2)]) == 2
    audit = await api.admin.QueryAudit(
        admin_pb2.QueryAuditRequest(action="task.budget_wait"), metadata=api.metadata
    )
    assert sorted(e.target for e in audit.events) == sorted(t.task_id for t in waiting)
    beats.cancel()
    await agent.close()


async def test_a_task_waiting_for_budget_times_out_with_the_reason(
    api: Api, enroller: Enroller
) -> None:
    await api.budget("pool:default", 20_000)
    agent = await ai_agent(enroller, "ai-3")
    payload = messages(max_tokens=1000)
    first = await api.submit(payload=payload)
    await agent.expect("assignment")
    late = await api.submit(
        payload=payload, schedule_to_start_timeout=duration_pb2.Duration(seconds=1)
    )
    done = await api.wait(late.task_id, lambda t: t.state == common_pb2.TASK_STATE_TIMED_OUT)
    assert done.state == common_pb2.TASK_STATE_TIMED_OUT
    assert done.error.startswith("schedule-to-start timeout exceeded (waiting for budget pool:")
    assert first.task_id != late.task_id
    await agent.close()


async def test_a_lost_attempt_releases_its_reservation(api: Api, enroller: Enroller) -> None:
    await api.budget("global", 1_000_000)
    agent = await ai_agent(enroller, "ai-4")
    await api.submit(payload=messages())
    await agent.expect("assignment")
    assert (await api.get_budget("global")).reserved_micros > 0
    await agent.close()  # the stream ends: its attempt is requeued, its hold released
    budget = await api.wait_budget("global", lambda b: b.reserved_micros == 0)
    assert (budget.spent_micros, budget.reserved_micros) == (0, 0)


async def test_a_failed_attempt_with_usage_is_charged(api: Api, enroller: Enroller) -> None:
    await api.budget("global", 1_000_000)
    agent = await ai_agent(enroller, "ai-5")
    task = await api.submit(payload=messages(), max_attempts=1)
    assignment = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=assignment.task_id, attempt=1))
    await agent.finish(
        assignment,
        outcome=agent_pb2.OUTCOME_FAILED,
        error="stream broke",
        retryable=True,
        usage=common_pb2.Usage(model=MODEL, input_tokens=10, output_tokens=10),
    )
    done = await api.wait(task.task_id, lambda t: t.state == common_pb2.TASK_STATE_FAILED)
    assert done.usage.cost_micros == 180
    budget = await api.wait_budget("global", lambda b: b.reserved_micros == 0)
    assert budget.spent_micros == 180
    await agent.close()


async def test_a_provider_rate_limit_holds_the_model_back_without_burning_attempts(
    api: Api, enroller: Enroller
) -> None:
    agent = await ai_agent(enroller, "ai-6")
    task = await api.submit(payload=messages(), max_attempts=1)
    assignment = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=assignment.task_id, attempt=1))
    await agent.finish(
        assignment,
        outcome=agent_pb2.OUTCOME_FAILED,
        error="429 rate_limit_error",
        retryable=True,
        rate_limited=True,
        retry_after=duration_pb2.Duration(seconds=2),
    )
    agent.send(credit=agent_pb2.Credit(credits=1))
    other = await api.submit(payload=messages(text="another"))
    seen = await api.wait(other.task_id, lambda t: "rate limited" in t.waiting_reason)
    assert seen.waiting_reason.startswith(
        f"waiting for the provider: {MODEL} is rate limited in pool default"
    )
    assert seen.waiting_reason_code == common_pb2.WAITING_REASON_PROVIDER_BACKOFF
    # One attempt allowed, yet the task is retried: a 429 is the provider's, not the task's.
    second = await agent.expect("assignment", timeout=10)
    assert second.task_id in (task.task_id, other.task_id)
    retried = await api.get(task.task_id)
    assert retried.state != common_pb2.TASK_STATE_FAILED
    await agent.close()


async def test_the_tasks_own_cap_ends_it_when_used_up(api: Api, enroller: Enroller) -> None:
    agent = await ai_agent(enroller, "ai-7")
    payload = messages(max_tokens=1000)
    need = worst_case(payload, 1000)
    task = await api.submit(payload=payload, max_cost_usd=(need + need // 2) / 1e6)
    assignment = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=assignment.task_id, attempt=1))
    await agent.finish(
        assignment,
        outcome=agent_pb2.OUTCOME_FAILED,
        error="overloaded",
        retryable=True,
        usage=common_pb2.Usage(model=MODEL, input_tokens=0, output_tokens=1000),
    )
    done = await api.wait(task.task_id, lambda t: t.state == common_pb2.TASK_STATE_FAILED)
    assert done.error.startswith("the task's spend cap is used up")
    assert done.usage.cost_micros == 15_000
    await agent.close()


async def test_budgets_fail_closed_without_the_quota_store(tmp_path: Path) -> None:
    """Redis unreachable: AI work waits with its reason, everything else (submission
    included) goes on, and each refused reservation is counted as degraded."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{probe.getsockname()[1]}/0"
    handle = await start_server(server_config(tmp_path / "data", redis_url=dead))
    api = Api(handle)
    try:
        async with AsyncAdminClient(client_config(handle)) as admin:
            enroller = Enroller(handle, admin)
            agent = SimAgent.of(await enroller.enroll("no-redis"))
            await agent.hello(max_concurrency=2, capabilities=AI)
            agent.keep_alive()
            task = await api.submit()
            seen = await api.wait(task.task_id, lambda t: t.waiting_reason != "")
            assert seen.state == common_pb2.TASK_STATE_QUEUED
            assert seen.waiting_reason.startswith("waiting for the quota store")
            assert seen.waiting_reason_code == common_pb2.WAITING_REASON_QUOTA_STORE
            degraded = handle.registry.get_sample_value(
                "muster_quota_decisions_total", {"limit": "inflight_tasks", "outcome": "degraded"}
            )
            assert degraded
            await agent.close()
    finally:
        await api.channel.close()
        await handle.stop(grace=1.0)


async def test_the_embedded_store_remembers_budgets_across_a_restart(
    tmp_path: Path, backend: dict[str, object]
) -> None:
    """Spend and live holds are rebuilt from the database when the in-process store starts
    empty, so restarting `muster dev` does not reset a budget."""
    if backend:
        pytest.skip("Redis keeps budgets itself")
    config = server_config(tmp_path / "data")
    handle = await start_server(config)
    api = Api(handle)
    try:
        await api.budget("global", 1_000_000, period="day")
        async with AsyncAdminClient(client_config(handle)) as admin:
            agent = SimAgent.of(await Enroller(handle, admin).enroll("restart"))
            await agent.hello(max_concurrency=2, capabilities=AI)
            agent.keep_alive()
            await api.submit()
            await run(agent, common_pb2.Usage(model=MODEL, input_tokens=1000, output_tokens=100))
            await api.submit()
            held = await agent.expect("assignment")
            before = await api.wait_budget("global", lambda b: b.spent_micros > 0)
            await agent.close()
    finally:
        await api.channel.close()
        await handle.stop(grace=0.1)
    assert (before.spent_micros, before.reserved_micros) == (4500, held.max_cost_micros)
    handle = await start_server(config)
    api = Api(handle)
    try:
        after = await api.get_budget("global")
        assert after.spent_micros == 4500
    finally:
        await api.channel.close()
        await handle.stop(grace=0.1)


async def test_outputs_are_kept_byte_for_byte_and_errors_with_a_nul_are_recorded(
    api: Api, enroller: Enroller
) -> None:
    agent = SimAgent.of(await enroller.enroll("bytes"))
    await agent.hello(max_concurrency=2)
    hostile = b"\x00\x1b]0;pwned\x07\x1b[2J\xe2\x80\xaeok\xff"
    ok = await api.submit(kind="echo", payload=b"{}")
    assignment = await agent.expect("assignment")
    assert (await agent.finish(assignment, output=hostile)).status == agent_pb2.ACK_STATUS_RECORDED
    assert (await api.get(ok.task_id)).output == hostile
    failed = await api.submit(kind="echo", payload=b"{}", max_attempts=1)
    assignment = await agent.expect("assignment")
    ack = await agent.finish(
        assignment, outcome=agent_pb2.OUTCOME_FAILED, error="bad\x00byte", retryable=False
    )
    assert ack.status == agent_pb2.ACK_STATUS_RECORDED
    assert (await api.get(failed.task_id)).error == "bad\\x00byte"
    await agent.close()


async def test_the_reaper_closes_a_reservation_whose_attempt_is_gone(
    api: Api, server: ServerHandle
) -> None:
    """What a dead replica leaves (a hold on an attempt no agent holds) is released, or
    settled at the recorded cost, within a lease or so."""
    await api.budget("global", 1_000_000)
    task = await api.submit(max_attempts=1)
    await api.tasks.Cancel(task_pb2.CancelTaskRequest(task_id=task.task_id), metadata=api.metadata)
    hold = BudgetHold(BudgetRule("global", 1_000_000, "month").key(utcnow()), 1_000_000, None)
    assert (await server._quotas.reserve_budget(f"{task.task_id}:1", 5000, [hold])).allowed
    assert (await api.get_budget("global")).reserved_micros == 5000
    budget = await api.wait_budget("global", lambda b: b.reserved_micros == 0, timeout=15)
    assert (budget.spent_micros, budget.reserved_micros) == (0, 0)


async def test_ai_submissions_have_per_tenant_rates(tmp_path: Path) -> None:
    handle = await start_server(server_config(tmp_path / "data", ai_requests_per_minute=2))
    api = Api(handle)
    try:
        await api.submit()
        await api.submit()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.submit()
        assert code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ai_requests" in (err.value.details() or "")
        await api.submit(kind="echo", payload=b"{}")  # other kinds are not AI requests
    finally:
        await api.channel.close()
        await handle.stop(grace=0.1)
