"""The agent listener trusts only what the verified client certificate says."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from muster import AsyncAdminClient
from muster.server.app import ServerHandle
from tests.agentsim import Enroller, SimAgent
from tests.testca import Credentials, TestCA

pytestmark = pytest.mark.slow


def sim_with(server: ServerHandle, creds: Credentials) -> SimAgent:
    bundle = (server.config.ca_dir / "bundle.pem").read_bytes()
    return SimAgent(server.agent_endpoint, creds.channel_credentials(bundle))


async def connect_status(agent: SimAgent) -> grpc.StatusCode:
    """How the stream ends without the agent saying anything: identity is checked before
    the handler runs. (Sending a Hello meanwhile would race the server's refusal: grpc's
    client then reports its own failed write as INTERNAL instead of the server's status.)"""
    try:
        return await asyncio.wait_for(agent.status(), 10)
    finally:
        await agent.close()


@pytest.fixture
def server_ca(server: ServerHandle) -> TestCA:
    """Our server's own CA, to mint certificates outside its issuing policy."""
    return TestCA(server.ca)


async def test_an_enrolled_agent_is_welcomed_with_its_certified_identity(
    enroller: Enroller,
) -> None:
    enrolled = await enroller.enroll("ident-1", labels={"zone": "a"})
    agent = SimAgent.of(enrolled)
    welcome = await agent.hello()
    assert welcome.agent_id == "ident-1"
    assert welcome.spiffe_id == "spiffe://muster.local/agent/ident-1"
    assert dict(welcome.labels) == {"zone": "a"}
    await agent.close()


async def test_no_client_certificate_never_reaches_a_handler(server: ServerHandle) -> None:
    bundle = (server.config.ca_dir / "bundle.pem").read_bytes()
    agent = SimAgent(server.agent_endpoint, grpc.ssl_channel_credentials(bundle))
    assert await connect_status(agent) == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_from_a_foreign_ca_is_refused_by_tls(server: ServerHandle) -> None:
    foreign = TestCA.new("muster.local").mint_agent("ident-1")
    assert await connect_status(sim_with(server, foreign)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "uris",
    [
        pytest.param(
            ["spiffe://muster.local/agent/a", "spiffe://muster.local/agent/b"], id="two-uri-sans"
        ),
        pytest.param([], id="no-uri-san"),
        pytest.param(["spiffe://other.org/agent/a"], id="other-trust-domain"),
        pytest.param(["spiffe://muster.local/server"], id="not-an-agent"),
        pytest.param(["https://muster.local/agent/a"], id="not-spiffe"),
    ],
)
async def test_identity_other_than_one_agent_spiffe_id_is_unauthenticated(
    server: ServerHandle, server_ca: TestCA, uris: list[str]
) -> None:
    creds = server_ca.mint_client(uris=uris)
    assert await connect_status(sim_with(server, creds)) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_certificate_we_never_recorded_is_permission_denied(
    server: ServerHandle, server_ca: TestCA, enroller: Enroller
) -> None:
    await enroller.enroll("ident-2")
    # Signed by our intermediate, right SPIFFE ID, but not a serial the server issued.
    creds = server_ca.mint_agent("ident-2")
    assert await connect_status(sim_with(server, creds)) == grpc.StatusCode.PERMISSION_DENIED


async def test_an_expired_certificate_is_refused(server: ServerHandle, server_ca: TestCA) -> None:
    creds = server_ca.mint_client(
        uris=["spiffe://muster.local/agent/old"],
        not_before=datetime.now(UTC) - timedelta(hours=2),
        lifetime=timedelta(hours=1),
    )
    assert await connect_status(sim_with(server, creds)) == grpc.StatusCode.UNAVAILABLE


async def test_revoked_and_disabled_agents_are_refused(
    enroller: Enroller, admin: AsyncAdminClient
) -> None:
    revoked = await enroller.enroll("ident-3")
    assert await admin.revoke_agent("ident-3") == [revoked.serial]
    assert await connect_status(SimAgent.of(revoked)) == grpc.StatusCode.PERMISSION_DENIED

    disabled = await enroller.enroll("ident-4")
    await admin.set_agent_enabled("ident-4", False)
    assert await connect_status(SimAgent.of(disabled)) == grpc.StatusCode.PERMISSION_DENIED
    await admin.set_agent_enabled("ident-4", True)
    agent = SimAgent.of(disabled)
    assert (await agent.hello()).agent_id == "ident-4"
    await agent.close()


async def test_revocation_closes_an_open_stream(
    enroller: Enroller, admin: AsyncAdminClient
) -> None:
    enrolled = await enroller.enroll("ident-5")
    agent = SimAgent.of(enrolled)
    await agent.hello()
    await admin.revoke_certificate(enrolled.serial)
    assert await agent.status() == grpc.StatusCode.PERMISSION_DENIED
    await agent.close()


async def test_hello_cannot_claim_labels_outside_the_enrolled_scope(enroller: Enroller) -> None:
    enrolled = await enroller.enroll("ident-6", labels={"zone": "a"})
    agent = SimAgent.of(enrolled)
    with pytest.raises((grpc.aio.AioRpcError, EOFError)):
        await agent.hello(labels={"zone": "b"})
    assert await agent.status() == grpc.StatusCode.PERMISSION_DENIED
    await agent.close()
