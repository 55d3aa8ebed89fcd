"""The daemon against a scripted AgentService peer over real mTLS on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest

import muster.agent as agent_pkg
from muster.agent.daemon import Agent
from muster.errors import PermissionDeniedError
from muster.v1 import agent_pb2, common_pb2
from tests.agent.conftest import AGENT_ID, LABELS, GateExecutor
from tests.agent.peer import ScriptedAgentService

pytestmark = pytest.mark.slow


def assignment(task_id: str, kind: str, payload: bytes = b"", **extra: Any) -> agent_pb2.Assignment:
    return agent_pb2.Assignment(task_id=task_id, attempt=1, kind=kind, payload=payload, **extra)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_hello_carries_version_capabilities_labels_and_concurrency(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    async with run_agent(concurrency=3) as agent:
        stream = await service.next_stream()
        hello = stream.hello
        assert hello.agent_version == agent_pkg.__version__
        assert list(hello.capabilities) == ["echo", "fail", "gate", "sleep"]
        assert dict(hello.labels) == LABELS
        assert hello.max_concurrency == 3
        assert list(hello.in_flight) == []
        assert stream.peer_spiffe_id == f"spiffe://example.org/agent/{AGENT_ID}"
        await eventually(agent.connected.is_set)
        # No initial Credit: Hello's max_concurrency is the initial credit.
        await stream.expect_nothing(0.2)


async def test_assignment_is_accepted_run_reported_acked_and_credited(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    async with run_agent() as agent:
        stream = await service.next_stream()
        await stream.send(assignment=assignment("t1", "echo", b"hello"))
        accepted = await stream.expect("accepted")
        assert (accepted.task_id, accepted.attempt) == ("t1", 1)
        result = await stream.expect("result")
        assert result.outcome == agent_pb2.OUTCOME_SUCCEEDED
        assert result.output == b"hello"
        assert (await stream.expect("credit")).credits == 1
        # Durable until acknowledged.
        assert ("t1", 1) in agent.outbox
        await stream.ack("t1", status=agent_pb2.ACK_STATUS_RECORDED)
        await eventually(lambda: len(agent.outbox) == 0)


@pytest.mark.parametrize("status", [agent_pb2.ACK_STATUS_DUPLICATE, agent_pb2.ACK_STATUS_STALE])
async def test_any_ack_status_clears_the_outbox(
    run_agent: Any, service: ScriptedAgentService, status: int
) -> None:
    async with run_agent() as agent:
        stream = await service.next_stream()
        await stream.send(assignment=assignment("t1", "echo"))
        await stream.expect("result", skip=("heartbeat", "accepted"))
        await stream.ack("t1", status=status)
        await eventually(lambda: len(agent.outbox) == 0)


async def test_executor_exception_fails_retryably_with_its_message_only(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    async with run_agent():
        stream = await service.next_stream()
        await stream.send(assignment=assignment("t1", "fail", b"disk full"))
        await stream.expect("accepted")
        result = await stream.expect("result")
        assert result.outcome == agent_pb2.OUTCOME_FAILED
        assert result.error == "boom: disk full"
        assert "Traceback" not in result.error
        assert result.retryable


async def test_bad_sleep_payload_fails_for_good(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    async with run_agent():
        stream = await service.next_stream()
        await stream.send(assignment=assignment("t1", "sleep", b"not json"))
        result = await stream.expect("result", skip=("heartbeat", "accepted"))
        assert result.outcome == agent_pb2.OUTCOME_FAILED
        assert not result.retryable


async def test_start_to_close_timeout_is_enforced_locally(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    async with run_agent():
        stream = await service.next_stream()
        a = assignment("t1", "sleep", json.dumps({"seconds": 30}).encode())
        a.start_to_close_timeout.FromMilliseconds(200)
        await stream.send(assignment=a)
        await stream.expect("accepted")
        result = await stream.expect("result", timeout=3)
        assert result.outcome == agent_pb2.OUTCOME_FAILED
        assert "timed out" in result.error
        assert result.retryable


async def test_cancel_stops_a_sleep_and_reports_cancelled(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    async with run_agent() as agent:
        stream = await service.next_stream()
        await stream.send(assignment=assignment("t1", "sleep", b'{"seconds": 30}'))
        await stream.expect("accepted")
        await eventually(lambda: agent.runner.is_running(("t1", 1)))
        loop = asyncio.get_running_loop()
        started = loop.time()
        await stream.send(cancel=agent_pb2.Cancel(task_id="t1", attempt=1, reason="user asked"))
        result = await stream.expect("result")
        assert loop.time() - started < 2
        assert result.outcome == agent_pb2.OUTCOME_CANCELLED
        assert result.error == "user asked"
        assert (await stream.expect("credit")).credits == 1
        assert agent.runner.idle


async def test_cancel_for_an_unknown_attempt_reports_cancelled(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    async with run_agent():
        stream = await service.next_stream()
        await stream.send(cancel=agent_pb2.Cancel(task_id="ghost", attempt=2))
        result = await stream.expect("result")
        assert (result.task_id, result.attempt, result.outcome) == (
            "ghost",
            2,
            agent_pb2.OUTCOME_CANCELLED,
        )


async def test_unacked_results_are_resent_after_a_reconnect(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    async with run_agent() as agent:
        first = await service.next_stream()
        await first.send(assignment=assignment("t1", "echo", b"x"))
        await first.expect("result", skip=("heartbeat", "accepted"))
        await first.expect("credit")
        first.end(grpc.StatusCode.UNAVAILABLE)  # the replica dies before it Acks

        second = await service.next_stream()
        assert list(second.hello.in_flight) == []  # finished work is not in flight
        resent = await second.expect("result")
        assert (resent.task_id, resent.output) == ("t1", b"x")
        assert ("t1", 1) in agent.outbox
        await second.ack("t1", status=agent_pb2.ACK_STATUS_DUPLICATE)
        await eventually(lambda: len(agent.outbox) == 0)
        # The slot was credited on the first stream; the new Hello already counts it free.
        await second.expect_nothing(0.2)


async def test_running_work_survives_a_reconnect_and_is_credited_on_the_new_stream(
    run_agent: Any, service: ScriptedAgentService, gate: GateExecutor
) -> None:
    async with run_agent():
        first = await service.next_stream()
        await first.send(assignment=assignment("t1", "gate"))
        await first.expect("accepted")
        await first.expect("progress")
        first.end(grpc.StatusCode.UNAVAILABLE)

        second = await service.next_stream()
        assert [(r.task_id, r.attempt) for r in second.hello.in_flight] == [("t1", 1)]
        gate.gate.set()
        result = await second.expect("result")
        assert result.output == b"through t1"
        assert (await second.expect("credit")).credits == 1


async def test_heartbeats_list_in_flight_attempts(
    run_agent: Any, service: ScriptedAgentService, gate: GateExecutor
) -> None:
    service.heartbeat_interval = 0.1
    async with run_agent():
        stream = await service.next_stream()
        await stream.send(assignment=assignment("t1", "gate"))
        await stream.expect("accepted")
        beat = await stream.expect("heartbeat", skip=("progress",))
        while not beat.in_flight:
            beat = await stream.expect("heartbeat", skip=("progress",))
        assert list(beat.in_flight) == [common_pb2.AttemptRef(task_id="t1", attempt=1)]
        gate.gate.set()


async def test_no_work_is_accepted_beyond_the_concurrency_limit(
    run_agent: Any, service: ScriptedAgentService, gate: GateExecutor
) -> None:
    async with run_agent(concurrency=1) as agent:
        stream = await service.next_stream()
        await stream.send(assignment=assignment("t1", "gate"))
        await stream.send(assignment=assignment("t2", "gate"))
        await stream.expect("accepted")
        await stream.expect_nothing(0.3, skip=("heartbeat", "progress"))
        assert agent.runner.running() == [("t1", 1)]
        gate.gate.set()


async def test_a_repeated_assignment_is_accepted_again_but_run_once(
    run_agent: Any, service: ScriptedAgentService, gate: GateExecutor
) -> None:
    async with run_agent():
        stream = await service.next_stream()
        await stream.send(assignment=assignment("t1", "gate"))
        await stream.expect("accepted")
        await stream.send(assignment=assignment("t1", "gate"))
        await stream.expect("accepted", skip=("heartbeat", "progress"))
        gate.gate.set()
        await stream.expect("result", skip=("heartbeat", "progress"))
        assert gate.started == ["t1"]


async def test_shutdown_drains_in_flight_work_then_exits(
    run_agent: Any, service: ScriptedAgentService, state: Any, registry: Any
) -> None:
    from muster.agent.config import AgentConfig

    agent = Agent(
        AgentConfig(state_dir=state.path, drain_timeout=5, backoff_initial=0.05, backoff_max=0.2),
        registry=registry,
    )
    run = asyncio.create_task(agent.run())
    stream = await service.next_stream()
    await stream.send(assignment=assignment("t1", "sleep", b'{"seconds": 0.3}'))
    await stream.expect("accepted")

    agent.shutdown()
    draining = await stream.expect("draining")
    assert draining.reason
    await stream.send(assignment=assignment("t2", "echo"))  # too late: not taken
    result = await stream.expect("result")
    assert result.task_id == "t1" and result.outcome == agent_pb2.OUTCOME_SUCCEEDED
    assert not run.done()  # still waiting for the Ack
    await stream.ack("t1", status=agent_pb2.ACK_STATUS_RECORDED)
    async with asyncio.timeout(5):
        await run
    assert stream.client_closed.is_set()
    assert "accepted" not in stream.kinds()[stream.kinds().index("draining") :]
    assert "credit" not in stream.kinds()
    assert len(agent.outbox) == 0


async def test_shutdown_gives_up_after_the_drain_timeout(
    run_agent: Any, service: ScriptedAgentService, gate: GateExecutor
) -> None:
    async with run_agent(drain_timeout=0.3) as agent:
        stream = await service.next_stream()
        await stream.send(assignment=assignment("t1", "gate"))
        await stream.expect("accepted")
        loop = asyncio.get_running_loop()
        started = loop.time()
        agent.shutdown()
        await stream.expect("draining", skip=("heartbeat", "progress"))
    assert loop.time() - started < 3
    # Abandoned: not reported on this stream (a CANCELLED result would end the task), but
    # kept as a retryable failure for the next start (a drained replica holds it for us).
    assert "result" not in stream.kinds()
    assert agent.runner.idle
    (kept,) = agent.outbox.pending()
    assert (kept.task_id, kept.attempt, kept.outcome) == ("t1", 1, agent_pb2.OUTCOME_FAILED)
    assert kept.retryable


async def test_server_drain_hands_running_work_over_to_the_next_stream(
    run_agent: Any, service: ScriptedAgentService, gate: GateExecutor
) -> None:
    async with run_agent():
        first = await service.next_stream()
        await first.send(assignment=assignment("t1", "gate"))
        await first.expect("accepted")
        await first.send(drain=agent_pb2.Drain(reason="replica going away"))
        await first.send(assignment=assignment("t2", "echo"))  # not taken while draining
        async with asyncio.timeout(5):
            await first.client_closed.wait()  # at once: running work does not hold it up
        assert first.kinds().count("accepted") == 1
        assert "result" not in first.kinds()
        # The running attempt moves, same number, to the next stream: never stopped.
        second = await service.next_stream()
        assert [(r.task_id, r.attempt) for r in second.hello.in_flight] == [("t1", 1)]
        assert gate.started == ["t1"]
        gate.gate.set()
        result = await second.expect("result", skip=("heartbeat", "progress"))
        assert (result.task_id, result.attempt) == ("t1", 1)
        assert result.outcome == agent_pb2.OUTCOME_SUCCEEDED


async def test_server_drain_waits_for_the_acks_of_results_already_sent(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    async with run_agent() as agent:
        first = await service.next_stream()
        await first.send(assignment=assignment("t1", "echo"))
        await first.expect("result", skip=("heartbeat", "accepted", "credit"))
        await first.send(drain=agent_pb2.Drain(reason="replica going away"))
        # The Result is still unacknowledged: the stream stays for its Ack.
        await first.expect_nothing(0.3, skip=("heartbeat", "credit"))
        assert not first.client_closed.is_set()
        await first.ack("t1")
        async with asyncio.timeout(5):
            await first.client_closed.wait()
        second = await service.next_stream()
        assert list(second.hello.in_flight) == []
        assert len(agent.outbox) == 0


async def test_renew_rotates_the_key_and_moves_work_to_a_new_stream(
    run_agent: Any, service: ScriptedAgentService, gate: GateExecutor, state: Any
) -> None:
    old_key = state.key_path.read_bytes()
    async with run_agent() as agent:
        first = await service.next_stream()
        await first.send(assignment=assignment("t1", "gate"))
        await first.expect("accepted")
        await first.send(renew=agent_pb2.Renew(reason="rotate now"))

        second = await service.next_stream()
        assert len(service.renewals) == 1
        assert second.peer_serial != first.peer_serial
        assert second.peer_spiffe_id == first.peer_spiffe_id
        assert [(r.task_id, r.attempt) for r in second.hello.in_flight] == [("t1", 1)]
        async with asyncio.timeout(5):
            await first.client_closed.wait()  # the old stream closes after the new one is up
        assert state.key_path.read_bytes() != old_key
        assert state.key_path.stat().st_mode & 0o777 == 0o600
        assert agent.credentials.leaf.serial == second.peer_serial
        gate.gate.set()
        result = await second.expect("result", skip=("heartbeat", "progress"))
        assert result.task_id == "t1"
        assert (await second.expect("credit")).credits == 1


async def test_renewal_happens_at_the_welcome_renew_after(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    import datetime as dt

    service.renew_after = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    async with run_agent():
        first = await service.next_stream()
        service.renew_after = None
        second = await service.next_stream()
        assert len(service.renewals) == 1
        assert second.peer_serial != first.peer_serial


async def test_refused_identity_exits_with_exit_on_revoke(
    run_agent: Any, service: ScriptedAgentService, state: Any, registry: Any
) -> None:
    from muster.agent.config import AgentConfig

    service.refuse = grpc.StatusCode.PERMISSION_DENIED
    agent = Agent(AgentConfig(state_dir=state.path, exit_on_revoke=True), registry=registry)
    with pytest.raises(PermissionDeniedError, match="exit-on-revoke"):
        async with asyncio.timeout(5):
            await agent.run()


async def test_refused_identity_keeps_retrying_slowly_without_the_flag(
    run_agent: Any, service: ScriptedAgentService
) -> None:
    service.refuse = grpc.StatusCode.UNAUTHENTICATED
    async with run_agent(backoff_max=0.2) as agent:
        await asyncio.sleep(0.5)
        service.refuse = None  # an operator re-enables the agent
        await service.next_stream()
        await eventually(agent.connected.is_set)


async def test_after_a_drain_failed_reconnects_keep_a_steady_pace(
    service: ScriptedAgentService, state: Any, registry: Any
) -> None:
    from muster.agent.config import AgentConfig

    config = AgentConfig(state_dir=state.path, backoff_initial=0.01, backoff_max=0.3)
    agent = Agent(config, registry=registry, rand=lambda low, high: high)
    run = asyncio.create_task(agent.run())
    try:
        first = await service.next_stream()
        service.refuse = grpc.StatusCode.UNAVAILABLE  # the replica is restarting
        await first.send(drain=agent_pb2.Drain(reason="restarting"))
        await eventually(lambda: len(service.refused_at) >= 4)
        service.refuse = None
        await service.next_stream()
        at = service.refused_at
        # A growing window would retry after 0.01, 0.02 and 0.04 s; the steady one
        # keeps its window (here the 0.3 s cap) until the replica is back.
        assert all(later - earlier >= 0.25 for earlier, later in itertools.pairwise(at[:4]))
    finally:
        agent.shutdown()
        await asyncio.wait_for(run, 5)


async def test_a_server_that_drops_us_right_after_welcome_is_backed_off(
    service: ScriptedAgentService, state: Any, registry: Any
) -> None:
    from muster.agent.config import AgentConfig

    config = AgentConfig(state_dir=state.path, backoff_initial=0.05, backoff_max=0.2)
    agent = Agent(config, registry=registry, rand=lambda low, high: high)
    run = asyncio.create_task(agent.run())
    loop = asyncio.get_running_loop()
    try:
        arrivals = []
        for _ in range(5):
            stream = await service.next_stream()
            arrivals.append(loop.time())
            stream.end(grpc.StatusCode.UNAVAILABLE)
        # 0.05 + 0.1 + 0.2 + 0.2: the window grows because no stream stayed up.
        assert arrivals[-1] - arrivals[0] >= 0.55
    finally:
        agent.shutdown()
        await asyncio.wait_for(run, 5)
