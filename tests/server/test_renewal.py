"""Renewal that cannot be abused: a fresh key only, a per-agent rate, a lineage that
revocation follows, and Renew sent by the server (overdue, or on an operator's demand)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from google.rpc import error_details_pb2, status_pb2

from muster import AsyncAdminClient
from muster.agent.renewal import refused_retry_after
from muster.errors import InvalidArgumentError, NotFoundError
from muster.server.app import ServerHandle
from muster.server.dispatch.session import AgentSession
from muster.server.storage.types import utcnow
from muster.v1 import admin_pb2, agent_pb2, agent_pb2_grpc
from tests.agentsim import Enrolled, Enroller, SimAgent, make_csr
from tests.conftest import BACKEND, client_config


async def renew(enrolled: Enrolled, csr: bytes | None = None) -> Enrolled:
    """Renew over mTLS with ``enrolled``'s certificate; the result holds the new one."""
    new_csr, key_pem = make_csr()
    async with grpc.aio.secure_channel(enrolled.endpoint, enrolled.credentials()) as channel:
        response = await agent_pb2_grpc.AgentServiceStub(channel).Renew(
            agent_pb2.RenewRequest(csr_pem=csr or new_csr), timeout=10
        )
    return Enrolled(
        enrolled.agent_id, key_pem, response.certificate_chain_pem, enrolled.bundle_pem,
        enrolled.endpoint,
    )  # fmt: skip


def own_csr(enrolled: Enrolled) -> bytes:
    """A CSR for the key ``enrolled`` already holds."""
    key = serialization.load_pem_private_key(enrolled.key_pem, password=None)
    return make_csr(key)[0]


async def certificate_count(admin: AsyncAdminClient, agent_id: str) -> int:
    return len((await admin.get_agent(agent_id)).certificates)


async def test_renewing_with_the_current_key_is_refused_and_changes_nothing(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    enrolled = await enroller.enroll("same-key")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await renew(enrolled, own_csr(enrolled))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "freshly generated key" in (refused.value.details() or "")
    assert await certificate_count(admin, "same-key") == 1
    await server.flush_audit()
    assert not await admin.query_audit(action="cert.renew")


async def test_renewing_back_to_an_earlier_key_is_refused(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    first = await enroller.enroll("old-key")
    await renew(first)  # the first certificate stays valid until it expires
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        second = await renew(first)
        await renew(second, own_csr(first))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already had certified" in (refused.value.details() or "")
    assert await certificate_count(admin, "old-key") == 3


async def test_renewal_is_rate_limited_per_agent_with_a_retry_time(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    busy, other = await enroller.enroll("busy"), await enroller.enroll("other")
    burst = server._quotas.policy.renewals.burst
    for _ in range(burst):
        await renew(busy)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await renew(busy)
    error = refused.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    retry = error_details_pb2.RetryInfo()
    assert any(d.Unpack(retry) for d in status.details)
    assert 0 < retry.retry_delay.ToSeconds() <= 60
    # The daemon waits at least that long before it tries again.
    assert refused_retry_after(error) == retry.retry_delay.ToTimedelta().total_seconds()
    assert await certificate_count(admin, "busy") == 1 + burst  # the refusal issued nothing
    await renew(other)  # per agent: another agent is not held back


async def test_revoking_a_serial_revokes_every_certificate_renewed_from_it(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    """A stolen key that renewed itself twice: revoking the stolen serial revokes both
    renewals, and the stream on the newest one closes as revocation closes streams."""
    stolen = await enroller.enroll("stolen")
    child = await renew(stolen)
    grandchild = await renew(child)
    unrelated = await enroller.enroll("bystander")
    agent = SimAgent.of(grandchild)
    bystander = SimAgent.of(unrelated)
    try:
        await agent.hello()
        await bystander.hello()
        revoked = await admin.revoke_certificate(stolen.serial, reason="key stolen")
        assert sorted(revoked) == sorted([stolen.serial, child.serial, grandchild.serial])
        assert await agent.status() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await renew(grandchild)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert not bystander.call.done()
        certs = {c.serial: c for c in (await admin.get_agent("stolen")).certificates}
        assert certs[grandchild.serial].renewed_from == child.serial
        assert certs[child.serial].renewed_from == stolen.serial
        assert (certs[stolen.serial].renewed_from, certs[stolen.serial].reason) == ("", "enroll")
        assert all(c.revoked for c in certs.values())
        await server.flush_audit()
        (row,) = await admin.query_audit(action="cert.revoke")
        assert sorted(json.loads(row.details)["descendants"]) == sorted(
            [child.serial, grandchild.serial]
        )
        # Revoking a child alone leaves its parent: lineage runs one way.
        again = await admin.revoke_certificate(child.serial)
        assert again == []
    finally:
        await agent.close()
        await bystander.close()


async def test_rotate_sends_renew_on_the_agents_stream(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    one, two = await enroller.enroll("rot-1"), await enroller.enroll("rot-2")
    first, second = SimAgent.of(one), SimAgent.of(two)
    try:
        await first.hello()
        await second.hello()
        assert await admin.rotate_agents("rot-1", reason="key hygiene") == 1
        renew_message = await first.expect("renew")
        assert renew_message.reason == "key hygiene"
        assert await admin.rotate_agents(None) == 2  # --all
        await first.expect("renew")
        await second.expect("renew")
        await server.flush_audit()
        targets = [e.target for e in await admin.query_audit(action="agent.rotate")]
        assert targets == ["*", "rot-1"]
        assert (await admin.get_agent("rot-1")).rotate_requested_at is not None
    finally:
        await first.close()
        await second.close()


async def test_an_agent_offline_when_asked_is_told_to_renew_when_it_connects(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    enrolled = await enroller.enroll("offline")
    await admin.rotate_agents("offline")
    agent = SimAgent.of(enrolled)
    try:
        await agent.hello()
        await agent.expect("renew")
    finally:
        await agent.close()
    # Renewed within a second of the request (notBefore has whole seconds and is
    # backdated: the issue time is recorded): the new certificate's stream is not
    # asked again.
    fresh = SimAgent.of(await renew(enrolled))
    try:
        await fresh.hello()
        (session,) = [s for s in server.hub.streams() if isinstance(s, AgentSession)]
        requested = (await admin.get_agent("offline")).rotate_requested_at
        assert requested is not None and session.issued_at > requested.timestamp()
        assert server.hub.rotate_agents("offline", "again?", requested.timestamp()) == 0
    finally:
        await fresh.close()


async def test_only_certificates_issued_before_the_request_are_asked_to_rotate(
    server: ServerHandle, enroller: Enroller
) -> None:
    """Times are injected: a certificate issued at or after the request is left alone
    (so the renewed stream is not asked again), an older one is asked."""
    agent = SimAgent.of(await enroller.enroll("fresh"))
    try:
        await agent.hello()
        (session,) = [s for s in server.hub.streams() if isinstance(s, AgentSession)]
        assert server.hub.rotate_agents("fresh", "not yet", session.issued_at) == 0
        assert server.hub.rotate_agents("other", "not this one", session.issued_at + 1) == 0
        assert server.hub.rotate_agents(None, "rotate", session.issued_at + 1) == 1
        assert (await agent.expect("renew")).reason == "rotate"
    finally:
        await agent.close()


async def test_rotate_refuses_bad_requests_cleanly(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    with pytest.raises(NotFoundError):
        await admin.rotate_agents("nobody")
    stub = admin._stub
    for request in (
        admin_pb2.RotateAgentsRequest(),
        admin_pb2.RotateAgentsRequest(agent_id="x", all=True),
    ):
        with pytest.raises(InvalidArgumentError):
            await admin._transport.unary(stub.RotateAgents, request)
    await enroller.enroll("gone")
    await admin.remove_agent("gone")
    with pytest.raises(Exception, match="removed"):
        await admin.rotate_agents("gone")


async def test_a_stream_well_past_its_renew_time_is_sent_renew(
    server: ServerHandle, enroller: Enroller
) -> None:
    """The clock is injected: the session is asked as if its renew time had passed."""
    agent = SimAgent.of(await enroller.enroll("late"))
    try:
        welcome = await agent.hello()
        (session,) = [s for s in server.hub.streams() if isinstance(s, AgentSession)]
        renew_after = welcome.renew_after.ToDatetime().replace(tzinfo=utcnow().tzinfo)
        assert session.renew_after == renew_after
        assert not session.check_renewal(renew_after)  # on time: the agent's own job
        assert session.check_renewal(renew_after + session.renewal_grace)
        message = await agent.expect("renew")
        assert "renew time has passed" in message.reason
        # A twelfth of the lifetime (about 2 h of 24 h) after the renew time, well
        # before expiry.
        lifetime = session.not_after - session.not_before
        assert session.renewal_grace == lifetime / 12
        assert timedelta(hours=2) <= session.renewal_grace < timedelta(hours=2, minutes=1)
        assert renew_after + session.renewal_grace < session.not_after
    finally:
        await agent.close()


@pytest.mark.skipif(BACKEND != "postgres", reason="two replicas share Postgres and Redis")
async def test_rotate_reaches_the_replica_holding_the_stream(tmp_path: Path) -> None:
    from tests.pg import fresh_database
    from tests.server.test_replicas import start_pair

    async with fresh_database() as url:
        a, b = await start_pair(tmp_path, url, redis=True, poll=5.0)
        try:
            async with AsyncAdminClient(client_config(a)) as admin:
                enrolled = await Enroller(a, admin).enroll("far-away")
                agent = SimAgent(b.agent_endpoint, enrolled.credentials())
                try:
                    await agent.hello()
                    agent.keep_alive()
                    assert not a.hub.streams()  # the stream is on b; the call goes to a
                    await admin.rotate_agents("far-away", reason="across replicas")
                    message = await agent.expect("renew", timeout=3)
                    assert message.reason == "across replicas"
                finally:
                    await agent.close()
        finally:
            await asyncio.gather(a.stop(grace=1.0), b.stop(grace=1.0))


async def test_a_renewal_racing_a_revocation_never_outlives_it(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    """Renew and RevokeCertificate of the same serial at once, many times: either the
    renewal was refused, or its certificate was revoked with its parent."""
    for round_ in range(8):
        parent = await enroller.enroll(f"race-{round_}")
        renewal, _ = await asyncio.gather(
            renew(parent), admin.revoke_certificate(parent.serial), return_exceptions=True
        )
        certs = (await admin.get_agent(f"race-{round_}")).certificates
        children = [c for c in certs if c.renewed_from == parent.serial]
        if isinstance(renewal, BaseException):
            assert isinstance(renewal, grpc.aio.AioRpcError)
            assert renewal.code() == grpc.StatusCode.PERMISSION_DENIED
            assert children == []
        else:
            assert [c.revoked for c in children] == [True]
