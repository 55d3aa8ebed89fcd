"""One live stream per agent identity, and the stream contract agent.proto states.

A second Connect with the same certificate replaces the first (ABORTED), on one replica
and across two; a renewed certificate's stream overlaps the old one for at most
``renewal_overlap``. A Result without an outcome ends the stream with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from muster import AsyncAdminClient, AsyncClient
from muster._types import AuditEvent
from muster.server.app import ServerHandle, start_server
from muster.server.dispatch.hub import Hub, NewStream
from muster.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.agentsim import Enrolled, Enroller, SimAgent, make_csr
from tests.conftest import BACKEND, client_config, server_config

pytestmark = pytest.mark.slow


@pytest.fixture
async def server(
    request: pytest.FixtureRequest, tmp_path: Path, backend: dict[str, object]
) -> AsyncIterator[ServerHandle]:
    """The shared fixture, with a test's own settings when it parametrizes ``server``."""
    overrides: dict[str, Any] = getattr(request, "param", {})
    handle = await start_server(server_config(tmp_path / "data", **backend, **overrides))
    try:
        yield handle
    finally:
        await handle.stop(grace=1.0)


async def audited(
    admin: AsyncAdminClient,
    action: str,
    match: Callable[[AuditEvent], bool] = lambda e: True,
    timeout: float = 5.0,
) -> AuditEvent:
    """The newest audit event of ``action`` that matches, waiting for it to be written."""
    async with asyncio.timeout(timeout):
        while True:
            for event in await admin.query_audit(action=action, limit=50):
                if match(event):
                    return event
            await asyncio.sleep(0.05)


async def status_within(agent: SimAgent, seconds: float) -> grpc.StatusCode:
    return await asyncio.wait_for(agent.status(), seconds)


def accept(agent: SimAgent, assignment: agent_pb2.Assignment) -> None:
    agent.send(accepted=agent_pb2.Accepted(task_id=assignment.task_id, attempt=assignment.attempt))


class FakeStream:
    """A registered stream, for the hub's ordering rule alone."""

    def __init__(self, session_id: str, started_at: float, serial: str = "s1") -> None:
        self.session_id, self.started_at, self.serial = session_id, started_at, serial
        self.agent_id, self.pool, self.kinds, self.cert_not_before = "a", "p", ["echo"], 100.0
        self.wants_work = False
        self.replaced: list[tuple[str, bool]] = []
        self.outlived_by: list[str] = []

    def wake(self) -> None: ...
    def cancel_attempt(self, task_id: str, attempt: int, reason: str) -> None: ...
    def drain(self, reason: str) -> None: ...
    def close(self, code: grpc.StatusCode, message: str) -> None: ...

    def replaced_by(self, new: NewStream, *, handover: bool) -> None:
        self.replaced.append((new.session_id, handover))

    def outlived(self, new: NewStream) -> None:
        self.outlived_by.append(new.session_id)


def test_the_hub_replaces_older_streams_and_answers_an_announcement_of_an_older_one() -> None:
    hub = Hub()
    local = FakeStream("s_local", started_at=50.0)
    hub.register(local)  # type: ignore[arg-type]

    def announced(session: str, at: float, serial: str = "s1", nb: float = 100.0) -> NewStream:
        return NewStream("a", session, serial, nb, "10.0.0.9", at)

    # An announcement of an older stream (a lagging clock, or crossed messages): the local
    # one stays and announces itself again, so the other replica closes the older one.
    hub.stream_started(announced("s_old", at=40.0))
    assert (local.replaced, local.outlived_by) == ([], ["s_old"])
    hub.stream_started(announced("s_new", at=60.0, serial="s2", nb=99.0))  # older cert
    assert local.replaced == [("s_new", False)]
    other = FakeStream("s_other", started_at=50.0)
    hub.register(other)  # type: ignore[arg-type]
    hub.stream_started(announced("s_renewed", at=70.0, serial="s2", nb=100.0))
    assert other.replaced == [("s_renewed", True)]  # another serial, not older: handover
    hub.stream_started(announced("s_other", at=50.0))  # its own announcement: nothing
    assert other.replaced == [("s_renewed", True)]


async def test_a_second_stream_with_the_same_certificate_replaces_the_first(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    enrolled = await enroller.enroll("cloned")
    first = SimAgent.of(enrolled)
    await first.hello(max_concurrency=1)
    first.keep_alive()
    task = await client.submit("sleep", {"seconds": 60})
    assignment = await first.expect("assignment")
    accept(first, assignment)

    second = SimAgent.of(enrolled)  # the copied credential, or the agent back after a cut
    welcome = await second.hello(max_concurrency=1)
    second.keep_alive()
    assert await status_within(first, 3) == grpc.StatusCode.ABORTED
    assert "replaced by a newer stream" in (await first.call.details())

    # The attempt the first stream held (not in the second's Hello) is requeued, and the
    # one stream left gets it: the agent's concurrency did not double.
    again = await second.expect("assignment")
    assert (again.task_id, again.attempt) == (task.task_id, 2)
    event = await audited(admin, "stream.replaced")
    details = event.details_json()
    assert details["new_session"] == welcome.session_id
    assert (details["old_peer"], details["new_peer"]) == ("127.0.0.1", "127.0.0.1")
    assert details["handover"] is False
    sample = server.registry.get_sample_value
    assert sample("muster_streams_replaced_total", {"reason": "reconnect"}) == 1
    await first.close()
    await second.close()


@pytest.mark.parametrize("server", [{"renewal_overlap": timedelta(seconds=1)}], indirect=True)
async def test_a_renewed_certificate_overlaps_for_the_overlap_then_the_old_stream_closes(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    enrolled = await enroller.enroll("renewing")
    old = SimAgent.of(enrolled)
    await old.hello(max_concurrency=1)
    old.keep_alive(0.2)
    csr, key_pem = make_csr()
    renewed = await agent_pb2_grpc.AgentServiceStub(old.channel).Renew(
        agent_pb2.RenewRequest(csr_pem=csr)
    )
    fresh = Enrolled(
        enrolled.agent_id,
        key_pem,
        renewed.certificate_chain_pem,
        renewed.trust_bundle_pem,
        enrolled.endpoint,
    )
    assert fresh.serial != enrolled.serial
    new = SimAgent.of(fresh)
    loop = asyncio.get_running_loop()
    await new.hello(max_concurrency=1)
    welcomed = loop.time()
    new.keep_alive(0.2)
    # During the overlap the old stream is open but takes no work: the new one gets it.
    task = await client.submit("echo", "x")
    assignment = await new.expect("assignment")
    assert assignment.task_id == task.task_id
    assert await status_within(old, 3) == grpc.StatusCode.ABORTED
    assert loop.time() - welcomed >= 0.8  # not before the overlap
    event = await audited(admin, "stream.replaced")
    assert event.details_json()["handover"] is True
    assert event.details_json()["new_serial"] == fresh.serial
    assert (
        server.registry.get_sample_value("muster_streams_replaced_total", {"reason": "renewal"})
        == 1
    )
    # The new stream stays.
    await new.finish(assignment, b"x")
    await old.close()
    await new.close()


async def test_a_stream_with_an_older_serial_than_the_live_one_still_replaces_it(
    server: ServerHandle, enroller: Enroller
) -> None:
    """Newest connection wins, whatever the certificate: a reconnecting agent is never
    locked out, and a copy that fights the real agent shows as two_addresses."""
    enrolled = await enroller.enroll("flip-flop")
    first = SimAgent.of(enrolled)
    await first.hello()
    second = SimAgent.of(enrolled)
    await second.hello()
    assert await status_within(first, 3) == grpc.StatusCode.ABORTED
    third = SimAgent.of(enrolled)
    await third.hello()
    assert await status_within(second, 3) == grpc.StatusCode.ABORTED
    for agent in (first, second, third):
        await agent.close()


async def test_a_result_without_an_outcome_ends_the_stream_with_invalid_argument(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    agent = SimAgent.of(await enroller.enroll("no-outcome"))
    await agent.hello()
    task = await client.submit("echo", "x")
    assignment = await agent.expect("assignment")
    accept(agent, assignment)
    agent.send(result=agent_pb2.Result(task_id=assignment.task_id, attempt=assignment.attempt))
    assert await status_within(agent, 3) == grpc.StatusCode.INVALID_ARGUMENT
    assert "Result.outcome" in await agent.call.details()
    # Nothing was recorded: the attempt was requeued when the stream ended, not finished.
    assert (await client.get(task.task_id)).state.name in ("QUEUED", "ASSIGNED")
    await agent.close()


async def test_an_undefined_outcome_value_is_invalid_argument_too(
    server: ServerHandle, enroller: Enroller
) -> None:
    agent = SimAgent.of(await enroller.enroll("odd-outcome"))
    await agent.hello()
    agent.send(result=agent_pb2.Result(task_id="t", attempt=1, outcome=7))  # type: ignore[arg-type]
    assert await status_within(agent, 3) == grpc.StatusCode.INVALID_ARGUMENT
    await agent.close()


async def test_a_result_may_skip_accepted_within_accept_within(
    server: ServerHandle, enroller: Enroller, client: AsyncClient
) -> None:
    """As agent.proto says: Accepted is optional when the Result comes within accept_within."""
    agent = SimAgent.of(await enroller.enroll("skipper"))
    await agent.hello()
    task = await client.submit("echo", "x")
    assignment = await agent.expect("assignment")
    ack = await agent.finish(assignment, b"done")
    assert ack.status == agent_pb2.ACK_STATUS_RECORDED
    assert (await client.get(task.task_id)).state.name == "SUCCEEDED"
    await agent.close()


async def test_hello_limits_are_what_agent_proto_says(
    server: ServerHandle, enroller: Enroller
) -> None:
    enrolled = await enroller.enroll("limits")
    bad: list[dict[str, Any]] = [
        {"max_concurrency": 0},
        {"max_concurrency": 1001},
        {"capabilities": ()},
        {"capabilities": tuple(f"k{i}" for i in range(101))},
        {"max_concurrency": 1, "in_flight": (("a", 1), ("b", 1))},
        {"capabilities": ("echo\n",)},  # kinds are names a person reads: no spoofing
        {"capabilities": ("ec\u202eho",)},
    ]
    for hello in bad:
        agent = SimAgent.of(enrolled)
        refs = [common_pb2.AttemptRef(task_id=t, attempt=a) for t, a in hello.pop("in_flight", ())]
        agent.send(
            hello=agent_pb2.Hello(
                capabilities=hello.pop("capabilities", ("echo",)),
                max_concurrency=hello.pop("max_concurrency", 1),
                in_flight=refs,
            )
        )
        assert await status_within(agent, 3) == grpc.StatusCode.INVALID_ARGUMENT, hello
        await agent.close()
    agent = SimAgent.of(enrolled)
    agent.send(
        hello=agent_pb2.Hello(capabilities=["echo"], max_concurrency=1, labels={"zone": "x"})
    )
    assert await status_within(agent, 3) == grpc.StatusCode.PERMISSION_DENIED
    await agent.close()
    ok = SimAgent.of(enrolled)
    await ok.hello(capabilities=tuple(f"k{i}" for i in range(100)), max_concurrency=1000)
    await ok.close()


@pytest.mark.skipif(BACKEND != "postgres", reason="two replicas share Postgres and Redis")
async def test_a_second_stream_on_another_replica_replaces_the_first(tmp_path: Path) -> None:
    from tests.pg import fresh_database
    from tests.server.test_replicas import start_pair

    async with fresh_database() as url:
        a, b = await start_pair(tmp_path, url, redis=True, poll=5.0)
        try:
            async with AsyncAdminClient(client_config(a)) as admin:
                enrolled = await Enroller(a, admin).enroll("two-replicas")
                first = SimAgent(a.agent_endpoint, enrolled.credentials())
                await first.hello()
                first.keep_alive()
                second = SimAgent(b.agent_endpoint, enrolled.credentials())
                welcome = await second.hello()
                second.keep_alive()
                # Replica b polls only every 5 s: the close came by the fan-out.
                assert await status_within(first, 2) == grpc.StatusCode.ABORTED
                event = await audited(
                    admin,
                    "stream.replaced",
                    lambda e: e.details_json()["new_session"] == welcome.session_id,
                )
                assert event.details_json()["new_peer"] == "127.0.0.1"
                assert (
                    a.registry.get_sample_value(
                        "muster_streams_replaced_total", {"reason": "reconnect"}
                    )
                    == 1
                )
                # The stream on b stays: it still gets work.
                async with AsyncClient(client_config(a)) as client:
                    task = await client.submit("echo", "x")
                    assert (await second.expect("assignment")).task_id == task.task_id
                await first.close()
                await second.close()
        finally:
            await asyncio.gather(a.stop(grace=1.0), b.stop(grace=1.0))


async def test_a_stream_closed_right_after_welcome_leaves_the_hub(
    server: ServerHandle, enroller: Enroller
) -> None:
    """An agent that goes away the moment it is welcomed (while the server is still
    recording the connect) must not stay registered: it would look connected and hold
    up shutdown for its whole grace."""
    enrolled = await enroller.enroll("brief")
    for _ in range(3):
        agent = SimAgent.of(enrolled)
        await agent.hello(max_concurrency=1)
        await agent.close()
    assert await server.hub.wait_idle(10), "a closed stream is still in the hub"
