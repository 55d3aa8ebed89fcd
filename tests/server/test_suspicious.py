"""Suspicious agents: each kind detected on real streams, audited (``agent.suspicious``
with its ``kind``), counted (``muster_suspicious_events_total{kind}``), and with the
``disable`` policy, quarantined (the agent disabled, its streams closed within a second)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from muster import AsyncAdminClient, AsyncClient
from muster.server.app import ServerHandle, start_server
from muster.server.config import ServerConfig
from muster.server.dispatch.suspicion import RateWatch, parse_policy
from muster.v1 import agent_pb2, agent_pb2_grpc
from tests.agentsim import Enroller, SimAgent, make_csr
from tests.conftest import server_config
from tests.server.test_one_stream import audited, status_within

pytestmark = pytest.mark.slow


@pytest.fixture
async def server(
    request: pytest.FixtureRequest, tmp_path: Path, backend: dict[str, object]
) -> AsyncIterator[ServerHandle]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    handle = await start_server(server_config(tmp_path / "data", **backend, **overrides))
    try:
        yield handle
    finally:
        await handle.stop(grace=1.0)


def flagged(server: ServerHandle, kind: str) -> float:
    return server.registry.get_sample_value("muster_suspicious_events_total", {"kind": kind}) or 0


async def suspicious(admin: AsyncAdminClient, kind: str, agent_id: str) -> dict[str, Any]:
    event = await audited(
        admin,
        "agent.suspicious",
        lambda e: e.target == agent_id and e.details_json()["kind"] == kind,
    )
    details: dict[str, Any] = event.details_json()
    return details


def test_the_policy_setting_is_parsed_and_checked() -> None:
    assert parse_policy("") == {}
    assert parse_policy("two_addresses=disable, message_rate=log") == {
        "two_addresses": "disable",
        "message_rate": "log",
    }
    for bad in ("nonsense=log", "two_addresses=kill", "two_addresses"):
        with pytest.raises(ValueError):
            parse_policy(bad)
    with pytest.raises(Exception, match="suspicious_policy"):
        ServerConfig(suspicious_policy="two_addresses=kill")


def test_the_rate_allowance_follows_heartbeats_progress_and_assignments() -> None:
    now = [0.0]
    watch = RateWatch(heartbeat_interval=5.0, max_concurrency=2, clock=lambda: now[0])
    assert watch.allowance == 4 * (10 / 5 + 2 * 10 * 4) + 10
    # A fast agent: 5,000 short tasks in a window, an Accepted and a Credit each.
    for _ in range(5000):
        watch.assigned()
        assert watch.count() is None
        assert watch.count() is None
    now[0] = 10.5  # the next window still allows for the last one's assignments
    assert all(watch.count() is None for _ in range(watch.allowance))
    now[0] = 31.0  # a quiet spell: the allowance is back to the base
    seen = [watch.count() for _ in range(watch.allowance + 5)]
    assert seen.count(None) == watch.allowance + 4  # flagged once per window
    assert seen[watch.allowance] == watch.allowance + 1


@pytest.mark.parametrize(
    "server",
    [{"agent_addr": "[::]:0", "suspicious_policy": "two_addresses=disable"}],
    indirect=True,
)
async def test_one_identity_streaming_from_two_addresses_is_disabled_by_policy(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    enrolled = await enroller.enroll("copied")
    port = server.agent_port
    # IPv4 and IPv6 loopback: two peer addresses on one machine.
    real = SimAgent(f"127.0.0.1:{port}", enrolled.credentials())
    await real.hello()
    real.keep_alive()
    copy = SimAgent(f"[::1]:{port}", enrolled.credentials())
    await copy.hello()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await status_within(real, 2) == grpc.StatusCode.ABORTED  # replaced
    assert await status_within(copy, 2) == grpc.StatusCode.PERMISSION_DENIED  # disabled
    assert loop.time() - started < 1.5
    details = await suspicious(admin, "two_addresses", "copied")
    assert details["policy"] == "disable"
    assert details["old_peer"] != details["new_peer"]
    assert details["old_last_heard_s"] < 1  # the first stream was alive: a copy beside it
    disabled = await audited(admin, "agent.disable", lambda e: e.target == "copied")
    assert disabled.actor == "server"
    assert disabled.details_json()["reason"] == "suspicious: two_addresses"
    assert not (await admin.get_agent("copied")).enabled
    assert flagged(server, "two_addresses") == 1
    again = SimAgent(f"127.0.0.1:{port}", enrolled.credentials())
    again.send(hello=agent_pb2.Hello(capabilities=["echo"], max_concurrency=1))
    assert await status_within(again, 2) == grpc.StatusCode.PERMISSION_DENIED
    for agent in (real, copy, again):
        await agent.close()


async def test_acceptances_and_results_for_attempts_it_does_not_hold_are_flagged(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    holder = SimAgent.of(await enroller.enroll("holder"))
    await holder.hello()
    holder.keep_alive()
    task = await client.submit("sleep", {"seconds": 60})
    assignment = await holder.expect("assignment")
    holder.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=1))

    thief = SimAgent.of(await enroller.enroll("thief"))
    await thief.hello()
    thief.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=1))
    details = await suspicious(admin, "unheld_attempt", "thief")
    assert (details["message"], details["task"], details["attempt"]) == (
        "accepted",
        task.task_id,
        1,
    )
    ack = await thief.finish(assignment, b"stolen")
    assert ack.status == agent_pb2.ACK_STATUS_STALE
    async with asyncio.timeout(5):
        while flagged(server, "unheld_attempt") < 2:
            await asyncio.sleep(0.02)
    # The holder's attempt is untouched; its own Result is recorded.
    assert (await holder.finish(assignment, b"mine")).status == agent_pb2.ACK_STATUS_RECORDED
    assert (await client.get(task.task_id)).state.name == "SUCCEEDED"
    assert flagged(server, "unheld_attempt") == 2
    assert (await admin.get_agent("thief")).enabled  # the default policy only logs
    await holder.close()
    await thief.close()


async def test_a_resent_result_of_an_attempt_the_agent_lost_is_not_suspicious(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    enrolled = await enroller.enroll("resender")
    first = SimAgent.of(enrolled)
    await first.hello()
    task = await client.submit("sleep", {"seconds": 60})
    assignment = await first.expect("assignment")
    await first.close()  # the attempt is requeued as attempt 2
    async with asyncio.timeout(5):
        while (await client.get(task.task_id)).attempt != 2:
            await asyncio.sleep(0.05)
    second = SimAgent.of(enrolled)
    await second.hello()
    ack = await second.finish(assignment, b"late")  # the outbox resend
    assert ack.status in (agent_pb2.ACK_STATUS_STALE, agent_pb2.ACK_STATUS_DUPLICATE)
    assert flagged(server, "unheld_attempt") == 0
    await second.close()


async def test_a_message_rate_far_above_heartbeat_and_credit_is_flagged(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    agent = SimAgent.of(await enroller.enroll("chatty"))
    await agent.hello(max_concurrency=1)
    for _ in range(400):  # the allowance here (0.5 s heartbeats, one slot) is 250 per 10 s
        agent.send(heartbeat=agent_pb2.Heartbeat())
    details = await suspicious(admin, "message_rate", "chatty")
    assert details["messages"] > details["allowance"]
    assert flagged(server, "message_rate") == 1  # once per window, not per message
    await agent.close()


async def test_renewing_far_more_often_than_the_lifetime_needs_is_flagged(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    agent = SimAgent.of(await enroller.enroll("renewer"))
    stub = agent_pb2_grpc.AgentServiceStub(agent.channel)
    for _ in range(3):  # the schedule plus retries: fine
        await stub.Renew(agent_pb2.RenewRequest(csr_pem=make_csr()[0]))
    assert flagged(server, "renewal_rate") == 0
    await stub.Renew(agent_pb2.RenewRequest(csr_pem=make_csr()[0]))
    details = await suspicious(admin, "renewal_rate", "renewer")
    assert details["renewals"] == 4
    await agent.close()


@pytest.mark.parametrize(
    "server",
    [{"suspicious_policy": "hello_refused=disable", "hello_timeout": timedelta(seconds=0.3)}],
    indirect=True,
)
async def test_repeated_hello_refusals_are_flagged_and_can_disable(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    enrolled = await enroller.enroll("fumbler")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    refusals = [
        (agent_pb2.Hello(capabilities=["echo"], max_concurrency=0), invalid),
        (agent_pb2.Hello(capabilities=[], max_concurrency=1), invalid),
        (
            agent_pb2.Hello(capabilities=["echo"], max_concurrency=1, labels={"zone": "x"}),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (None, grpc.StatusCode.DEADLINE_EXCEEDED),  # no Hello within hello_timeout
    ]
    for hello, code in refusals:
        agent = SimAgent.of(enrolled)
        if hello is not None:
            agent.send(hello=hello)
        assert await status_within(agent, 3) == code
        await agent.close()
    assert flagged(server, "hello_refused") == 0
    agent = SimAgent.of(enrolled)
    agent.send(hello=agent_pb2.Hello(capabilities=["echo"], max_concurrency=5000))
    assert await status_within(agent, 3) == grpc.StatusCode.INVALID_ARGUMENT
    await agent.close()
    details = await suspicious(admin, "hello_refused", "fumbler")
    assert details["refusals"] == 5
    async with asyncio.timeout(3):
        while (await admin.get_agent("fumbler")).enabled:
            await asyncio.sleep(0.05)


async def test_an_excess_credit_grant_is_capped_and_counted(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    agent = SimAgent.of(await enroller.enroll("greedy"))
    await agent.hello(max_concurrency=1)
    agent.keep_alive()
    agent.send(credit=agent_pb2.Credit(credits=10))
    details = await suspicious(admin, "excess_credit", "greedy")
    assert (details["granted"], details["room"]) == (10, 1)
    for i in range(2):
        await client.submit("sleep", {"seconds": 60}, idempotency_key=f"greedy-{i}")
    await agent.expect("assignment")
    with pytest.raises(TimeoutError):  # capped: one slot, one assignment
        await agent.expect("assignment", timeout=1.0)
    assert flagged(server, "excess_credit") == 1
    await agent.close()
