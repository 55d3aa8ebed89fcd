"""A protocol-level agent for tests: enrolls through the real EnrollmentService and
speaks AgentService.Connect over real mTLS, one message at a time, so a test can
script exactly what an agent says and check exactly what the server answers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from muster import AsyncAdminClient
from muster.server.app import ServerHandle
from muster.v1 import agent_pb2, agent_pb2_grpc, common_pb2, enrollment_pb2, enrollment_pb2_grpc


def make_csr(key: Any = None, common_name: str = "agent") -> tuple[bytes, bytes]:
    """(csr_pem, private_key_pem) for a fresh P-256 key, or for ``key``."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return csr.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass
class Enrolled:
    agent_id: str
    key_pem: bytes
    chain_pem: bytes
    bundle_pem: bytes
    endpoint: str

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.bundle_pem, self.key_pem, self.chain_pem)

    @property
    def serial(self) -> str:
        return format(x509.load_pem_x509_certificate(self.chain_pem).serial_number, "x")


class Enroller:
    def __init__(self, server: ServerHandle, admin: AsyncAdminClient) -> None:
        self.server = server
        self.admin = admin
        self.bundle = (server.config.ca_dir / "bundle.pem").read_bytes()

    def api_channel(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            self.server.api_address, grpc.ssl_channel_credentials(self.bundle)
        )

    async def token(
        self, pool: str = "default", labels: Mapping[str, str] | None = None, **kw: Any
    ) -> str:
        _, secret = await self.admin.create_bootstrap_token(pool, labels=labels, **kw)
        return secret

    async def enroll(
        self,
        name: str,
        *,
        pool: str = "default",
        labels: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> Enrolled:
        token = token or await self.token(pool, labels)
        csr, key_pem = make_csr()
        async with self.api_channel() as channel:
            response = await enrollment_pb2_grpc.EnrollmentServiceStub(channel).Enroll(
                enrollment_pb2.EnrollRequest(
                    token=token, csr_pem=csr, name=name, labels=labels or {}
                )
            )
        return Enrolled(
            agent_id=response.agent_id,
            key_pem=key_pem,
            chain_pem=response.certificate_chain_pem,
            bundle_pem=response.trust_bundle_pem,
            endpoint=response.agent_endpoint,
        )


class SimAgent:
    """One Connect stream; ``send`` and ``receive`` one message at a time."""

    def __init__(self, endpoint: str, credentials: grpc.ChannelCredentials) -> None:
        self.channel = grpc.aio.secure_channel(endpoint, credentials)
        self._out: asyncio.Queue[agent_pb2.AgentMessage | None] = asyncio.Queue()
        self.call = agent_pb2_grpc.AgentServiceStub(self.channel).Connect(self._requests())
        # Reading in one background task: cancelling a pending read would cancel the call.
        self._in: asyncio.Queue[agent_pb2.ServerMessage | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        self._beats: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        try:
            while (message := await self.call.read()) is not grpc.aio.EOF:
                self._in.put_nowait(message)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            self._in.put_nowait(None)

    @classmethod
    def of(cls, enrolled: Enrolled) -> SimAgent:
        return cls(enrolled.endpoint, enrolled.credentials())

    async def _requests(self) -> Any:
        while (message := await self._out.get()) is not None:
            yield message

    def keep_alive(self, interval: float = 0.5) -> None:
        """Heartbeat in the background, as a live agent does (silent streams are closed)."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                self.send(heartbeat=agent_pb2.Heartbeat())

        self._beats = asyncio.create_task(beat())

    def send(self, **body: Any) -> None:
        self._out.put_nowait(agent_pb2.AgentMessage(**body))

    async def hello(
        self,
        capabilities: tuple[str, ...] = ("echo", "sleep"),
        max_concurrency: int = 1,
        in_flight: tuple[tuple[str, int], ...] = (),
        labels: Mapping[str, str] | None = None,
    ) -> agent_pb2.Welcome:
        self.send(
            hello=agent_pb2.Hello(
                agent_version="test",
                capabilities=capabilities,
                max_concurrency=max_concurrency,
                labels=labels or {},
                in_flight=[common_pb2.AttemptRef(task_id=t, attempt=a) for t, a in in_flight],
            )
        )
        message = await self.receive()
        assert message.WhichOneof("body") == "welcome", message
        return message.welcome

    async def receive(self, timeout: float = 10.0) -> agent_pb2.ServerMessage:
        message = await asyncio.wait_for(self._in.get(), timeout)
        if message is None:
            self._in.put_nowait(None)
            raise EOFError("stream ended")
        return message

    async def expect(self, kind: str, timeout: float = 10.0) -> Any:
        """The next message of ``kind``, skipping others (acks, cancels) that come first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            message = await self.receive(max(0.01, deadline - loop.time()))
            if message.WhichOneof("body") == kind:
                return getattr(message, kind)

    async def finish(
        self,
        assignment: agent_pb2.Assignment,
        output: bytes = b"",
        outcome: int = agent_pb2.OUTCOME_SUCCEEDED,
        **kw: Any,
    ) -> agent_pb2.Ack:
        self.send(
            result=agent_pb2.Result(
                task_id=assignment.task_id,
                attempt=assignment.attempt,
                outcome=outcome,
                output=output,
                **kw,
            )
        )
        return await self.expect("ack")

    async def status(self) -> grpc.StatusCode:
        """The code the stream ended with (waits for the end)."""
        return await self.call.code()

    async def close(self) -> None:
        self._out.put_nowait(None)
        self.call.cancel()
        self._reader.cancel()
        if self._beats is not None:
            self._beats.cancel()
        await self.channel.close()
