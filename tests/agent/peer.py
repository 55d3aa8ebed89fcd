"""A scripted AgentService peer for the daemon's protocol tests.

It is a test double of the *server*, but it speaks the real protocol over a real
grpc.aio server with real mTLS (certificates from ``tests.testca``), so the
daemon under test runs exactly as in production. Each Connect becomes a
:class:`PeerStream` the test drives message by message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509

from muster.v1 import agent_pb2, agent_pb2_grpc
from tests.testca import TestCA

STEP = 5.0
"""How long a test waits for the agent's next message before failing."""


class PeerStream:
    """One Connect call, seen from the server side."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], hello: agent_pb2.Hello) -> None:
        self.context = context
        self.hello = hello
        self.received: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        self.log: list[agent_pb2.AgentMessage] = []
        self.client_closed = asyncio.Event()
        self._finish: asyncio.Future[grpc.StatusCode | None] = (
            asyncio.get_running_loop().create_future()
        )
        auth = context.auth_context()
        self.peer_cert = x509.load_pem_x509_certificate(next(iter(auth["x509_pem_cert"])))

    @property
    def peer_serial(self) -> int:
        return self.peer_cert.serial_number

    @property
    def peer_spiffe_id(self) -> str:
        san = self.peer_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return str(san.value.get_values_for_type(x509.UniformResourceIdentifier)[0])

    async def send(self, **body: Any) -> None:
        await self.context.write(agent_pb2.ServerMessage(**body))

    async def ack(
        self,
        task_id: str,
        attempt: int = 1,
        status: int = agent_pb2.ACK_STATUS_RECORDED,
        cost_micros: int = 0,
    ) -> None:
        ack = agent_pb2.Ack(
            task_id=task_id, attempt=attempt, status=status, cost_micros=cost_micros
        )  # type: ignore[arg-type]
        await self.send(ack=ack)

    async def expect(
        self, kind: str, *, skip: tuple[str, ...] = ("heartbeat",), timeout: float = STEP
    ) -> Any:
        """The body of the next message (of ``kind``), skipping the kinds in ``skip``."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.received.get()
                if message is None:
                    raise AssertionError(f"the agent closed the stream; expected {kind}")
                which = message.WhichOneof("body")
                if which in skip and which != kind:
                    continue
                assert which == kind, f"expected {kind}, got {which}: {message}"
                return getattr(message, kind)

    async def expect_nothing(
        self, within: float, *, skip: tuple[str, ...] = ("heartbeat",)
    ) -> None:
        """Fail if a message not in ``skip`` arrives within ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                while True:
                    message = await self.received.get()
                    if message is None:
                        return
                    if message.WhichOneof("body") not in skip:
                        raise AssertionError(f"unexpected message: {message}")
        except TimeoutError:
            pass

    def kinds(self) -> list[str]:
        return [str(m.WhichOneof("body")) for m in self.log]

    def end(self, code: grpc.StatusCode | None = None) -> None:
        """End the call: OK, or with ``code`` (as a failing server would)."""
        if not self._finish.done():
            self._finish.set_result(code)

    async def run(self) -> None:
        pump = asyncio.create_task(self._pump())
        try:
            code = await self._finish
        finally:
            pump.cancel()
        if code is not None:
            await self.context.abort(code, "scripted failure")

    async def _pump(self) -> None:
        while True:
            message = await self.context.read()
            if message is grpc.aio.EOF:
                self.client_closed.set()
                self.received.put_nowait(None)
                self.end()
                return
            self.log.append(message)
            self.received.put_nowait(message)


@dataclass
class ScriptedAgentService(agent_pb2_grpc.AgentServiceServicer):
    """Hands each stream to the test; answers Hello with a Welcome built by ``welcome``."""

    ca: TestCA
    heartbeat_interval: float = 5.0
    renew_after: dt.datetime | None = None
    refuse: grpc.StatusCode | None = None
    streams: asyncio.Queue[PeerStream] = field(default_factory=asyncio.Queue)
    all_streams: list[PeerStream] = field(default_factory=list)
    renewals: list[bytes] = field(default_factory=list)
    refused_at: list[float] = field(default_factory=list)
    """Event-loop times of the streams refused with ``refuse``."""
    renew_lifetime: dt.timedelta = dt.timedelta(hours=1)
    trust_bundle: agent_pb2.TrustBundle | None = None
    """Sent in Welcome; None: no trust bundle, as servers before CA rotation."""
    renew_bundle: agent_pb2.TrustBundle | None = None
    """Returned by Renew; None: the CA's bundle without a version, as servers before CA
    rotation."""

    # The servicer writes through the context rather than returning an iterator.
    async def Connect(  # type: ignore[override]
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        if self.refuse is not None:
            self.refused_at.append(asyncio.get_running_loop().time())
            await context.abort(self.refuse, "agent is revoked")
        first = await context.read()
        assert first.WhichOneof("body") == "hello", first
        stream = PeerStream(context, first.hello)
        welcome = agent_pb2.Welcome(
            session_id=f"s{len(self.all_streams) + 1}",
            spiffe_id=stream.peer_spiffe_id,
            heartbeat_interval=dt.timedelta(seconds=self.heartbeat_interval),
            lease_duration=dt.timedelta(seconds=30),
        )
        if self.renew_after is not None:
            welcome.renew_after.FromDatetime(self.renew_after)
        if self.trust_bundle is not None:
            welcome.trust_bundle.CopyFrom(self.trust_bundle)
        await context.write(agent_pb2.ServerMessage(welcome=welcome))
        self.all_streams.append(stream)
        self.streams.put_nowait(stream)
        await stream.run()

    async def Renew(
        self, request: agent_pb2.RenewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> agent_pb2.RenewResponse:
        self.renewals.append(request.csr_pem)
        csr = x509.load_pem_x509_csr(request.csr_pem)
        assert csr.is_signature_valid
        auth = context.auth_context()
        peer = x509.load_pem_x509_certificate(next(iter(auth["x509_pem_cert"])))
        san = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        agent_id = str(san.value.get_values_for_type(x509.UniformResourceIdentifier)[0]).rsplit(
            "/", 1
        )[-1]
        issued = self.ca.ca.issue_agent_certificate(
            csr.public_key(), agent_id, lifetime=self.renew_lifetime
        )
        response = agent_pb2.RenewResponse(
            certificate_chain_pem=issued.chain_pem, trust_bundle_pem=self.ca.bundle_pem
        )
        if self.renew_bundle is not None:
            response.trust_bundle_pem = self.renew_bundle.roots_pem
            response.trust_bundle_version = self.renew_bundle.version
        response.not_after.FromDatetime(issued.not_after)
        return response

    async def next_stream(self, timeout: float = STEP) -> PeerStream:
        async with asyncio.timeout(timeout):
            return await self.streams.get()


@dataclass
class ListenerTLS:
    """What a :func:`serve` listener presents and which client roots it accepts. A change
    applies from the next handshake on, as a replica's CA reload does."""

    chain_pem: bytes
    key_pem: bytes
    client_roots_pem: bytes

    def present(self, ca: TestCA) -> None:
        """Serve a certificate issued by ``ca`` from now on."""
        self.chain_pem, self.key_pem = ca.server_credentials()

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_pem, self.chain_pem)], root_certificates=self.client_roots_pem
        )

    def credentials(self) -> grpc.ServerCredentials:
        served = (self.chain_pem, self.client_roots_pem)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served  # runs on a grpc thread at each handshake; None: no change
            if (self.chain_pem, self.client_roots_pem) == served:
                return None
            served = (self.chain_pem, self.client_roots_pem)
            return self._configuration()

        return grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            fetch,  # type: ignore[arg-type]  # grpc documents None (no change); its stub does not
            require_client_authentication=True,
        )


@asynccontextmanager
async def serve(
    service: ScriptedAgentService, listener: ListenerTLS | None = None
) -> AsyncIterator[int]:
    """Run ``service`` on 127.0.0.1:0 behind mTLS that requires a cert from its CA, or
    as ``listener`` says (and keeps saying: see :class:`ListenerTLS`)."""
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(service, server)
    if listener is None:
        chain, key = service.ca.server_credentials()
        credentials = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=service.ca.bundle_pem, require_client_auth=True
        )
    else:
        credentials = listener.credentials()
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)
