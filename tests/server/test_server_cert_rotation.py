"""The server renews its own certificate while it runs and serves the new one without a
restart: new connections to either listener see it, open streams carry on."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from muster import AsyncClient, TaskState
from muster.server.app import ServerHandle, start_server
from muster.server.ca import ServerCertificates
from muster.server.clock import ManualClock
from muster.v1 import agent_pb2
from tests.agentsim import Enrolled, Enroller, SimAgent
from tests.conftest import client_config, server_config
from tests.testca import TestCA

pytestmark = pytest.mark.slow

TTL = timedelta(seconds=4)
"""The server certificate's lifetime here: renewed when a third of it is left."""


@pytest.fixture
async def server(tmp_path: Path, backend: dict[str, object]) -> AsyncIterator[ServerHandle]:
    handle = await start_server(server_config(tmp_path / "data", server_cert_ttl=TTL, **backend))
    try:
        yield handle
    finally:
        await handle.stop(grace=1.0)


async def served_serial(
    server: ServerHandle, port: int, tmp_path: Path, agent: Enrolled | None = None
) -> int:
    """The serial of the certificate a new TLS connection to ``port`` is shown (verified
    against Muster's bundle, for the name ``localhost``); ``agent`` presents its own."""
    context = ssl.create_default_context(cafile=server.config.ca_dir / "bundle.pem")
    context.set_alpn_protocols(["h2"])
    if agent is not None:
        (tmp_path / "agent.pem").write_bytes(agent.chain_pem)
        (tmp_path / "agent.key").write_bytes(agent.key_pem)
        context.load_cert_chain(tmp_path / "agent.pem", tmp_path / "agent.key")
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.transport.abort()  # the server has started speaking HTTP/2: just hang up
    return x509.load_der_x509_certificate(der).serial_number


async def until(condition: Callable[[], bool], timeout: float) -> None:
    """Wait (real time: the certificate's lifetime is real) until ``condition()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def round_trip(client: AsyncClient, agent: SimAgent, pool: str) -> None:
    """A task goes from ``client`` to ``agent`` and back, over their open connections."""
    task = await client.submit("echo", b"ping", pool=pool)
    assignment = await agent.expect("assignment")
    assert assignment.task_id == task.task_id
    agent.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=1))
    ack = await agent.finish(assignment, output=b"pong")
    assert ack.status == agent_pb2.ACK_STATUS_RECORDED
    agent.send(credit=agent_pb2.Credit(credits=1))
    done = await client.wait(task.task_id, timeout=10)
    assert (done.state, done.output) == (TaskState.SUCCEEDED, b"pong")


async def test_a_renewed_certificate_is_served_without_a_restart(
    server: ServerHandle, enroller: Enroller, client: AsyncClient, tmp_path: Path
) -> None:
    first = server.server_certificates.current
    old_agent_identity = await enroller.enroll("before", pool="old")
    assert await served_serial(server, server.api_port, tmp_path) == first.serial
    assert (
        await served_serial(server, server.agent_port, tmp_path, old_agent_identity) == first.serial
    )
    # Connections opened before the renewal: an agent's stream and a client's channel.
    old_agent = SimAgent.of(old_agent_identity)
    await old_agent.hello()
    old_agent.keep_alive()
    await round_trip(client, old_agent, "old")

    await until(lambda: server.server_certificates.current.serial != first.serial, 10)
    renewed = server.server_certificates.current
    assert renewed.not_after > first.not_after
    assert server.server_certificates.current.cert_path.read_bytes() == renewed.chain_pem

    # New connections to either listener are shown the new certificate, and work.
    assert await served_serial(server, server.api_port, tmp_path) != first.serial
    new_agent_identity = await enroller.enroll("after", pool="new")
    assert (
        await served_serial(server, server.agent_port, tmp_path, new_agent_identity) != first.serial
    )
    new_agent = SimAgent.of(new_agent_identity)
    await new_agent.hello()
    new_agent.keep_alive()
    async with AsyncClient(client_config(server)) as new_client:
        await round_trip(new_client, new_agent, "new")

    # The open stream and channel carry on, even past the first certificate's expiry.
    await until(lambda: datetime.now(UTC) > first.not_after, 10)
    await round_trip(client, old_agent, "old")
    await old_agent.close()
    await new_agent.close()


async def test_renewal_follows_the_clock(tmp_path: Path) -> None:
    """Renewed when a third of the lifetime is left, not before; a replica sharing the
    directory then reuses the fresh certificate instead of issuing its own."""
    ca = TestCA.new().ca
    clock = ManualClock()

    def replica() -> ServerCertificates:
        return ServerCertificates(
            ca,
            tmp_path,
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1"],
            lifetime=timedelta(hours=3),
            clock=clock,
        )

    certs = replica()
    first = certs.current
    assert certs.renew_at == first.not_after - timedelta(hours=1)
    stopping = asyncio.Event()
    loop = asyncio.create_task(certs.run(stopping))
    await clock.wait_for_sleepers(1)

    clock.advance(certs.renew_at - clock.now() - timedelta(seconds=1))
    await clock.wait_for_sleepers(1)
    assert certs.current is first
    clock.advance(timedelta(seconds=2))
    await clock.wait_for_sleepers(1)
    assert certs.current.serial != first.serial and certs.current.issued
    assert certs.current.not_after > first.not_after
    assert certs.renew_at > clock.now()

    other = replica()
    assert (other.current.serial, other.current.issued) == (certs.current.serial, False)

    stopping.set()
    await asyncio.wait_for(loop, 5)
