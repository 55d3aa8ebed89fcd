"""Connection limits on both listeners, seen from raw sockets: a connection that never
speaks is closed at the handshake timeout, one that carries no call at the idle timeout,
and an agent connection cannot open more streams than its cap.

The HTTP/2 side is spoken by hand (a few frames, HPACK literals only): a hostile client
ignores the limits the server advertises, so the test must be able to as well.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from muster.server.app import ServerHandle, start_server
from muster.server.config import ServerConfig
from muster.v1 import agent_pb2, agent_pb2_grpc
from tests.agentsim import Enrolled, Enroller, SimAgent, make_csr
from tests.conftest import server_config

pytestmark = pytest.mark.slow

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x1, 0x3, 0x4, 0x6, 0x7
END_HEADERS, ACK = 0x4, 0x1
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
REFUSED_STREAM = 0x7

HANDSHAKE = 1.0
IDLE = 1.0
STREAMS = 2
MESSAGE = 1024 + 65536


@pytest.fixture
async def limited(tmp_path: Path, backend: dict[str, object]) -> AsyncIterator[ServerHandle]:
    """A server with short limits, so each shows within a second or two."""
    handle = await start_server(
        server_config(
            tmp_path / "data",
            handshake_timeout=timedelta(seconds=HANDSHAKE),
            connection_idle_timeout=timedelta(seconds=IDLE),
            agent_max_streams_per_connection=STREAMS,
            max_payload_bytes=1024,
            max_message_bytes=MESSAGE,
            **backend,
        )
    )
    try:
        yield handle
    finally:
        await handle.stop(grace=1.0)


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (reading and discarding meanwhile)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(limit):
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, ssl.SSLError):
            pass
    return loop.time() - start


def test_defaults() -> None:
    config = ServerConfig()
    assert config.handshake_timeout == timedelta(seconds=10)
    assert config.connection_idle_timeout == timedelta(minutes=5)
    assert config.agent_max_streams_per_connection == 4
    assert config.max_message_bytes == 4 << 20


async def test_silent_connections_are_closed_at_the_handshake_timeout(
    limited: ServerHandle,
) -> None:
    """Raw TCP to both listeners, never a byte sent: closed after about 1 s (grpc's own
    default would hold them for 120 s)."""
    ports = [limited.api_port, limited.agent_port] * 3
    connections = [await asyncio.open_connection("127.0.0.1", port) for port in ports]
    try:
        held = await asyncio.gather(*(_closed_after(r, 10.0) for r, _ in connections))
    finally:
        for _, writer in connections:
            writer.close()
    assert all(HANDSHAKE * 0.5 <= seconds < HANDSHAKE + 3 for seconds in held), held


async def test_tls_without_http2_is_closed_at_the_handshake_timeout(
    limited: ServerHandle,
) -> None:
    """A client that finishes TLS and then says nothing is closed as well."""
    context = ssl.create_default_context(cafile=limited.config.ca_dir / "bundle.pem")
    context.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", limited.api_port, ssl=context, server_hostname="localhost"
    )
    try:
        held = await _closed_after(reader, 10.0)
    finally:
        writer.close()
    assert held < HANDSHAKE + 3, held


async def test_messages_over_the_size_cap_are_refused(limited: ServerHandle) -> None:
    """``max_message_bytes`` is what the listener enforces: just under it reaches the
    service (NOT_FOUND for an unknown health service), just over is RESOURCE_EXHAUSTED."""
    bundle = (limited.config.ca_dir / "bundle.pem").read_bytes()
    async with grpc.aio.secure_channel(
        limited.api_address, grpc.ssl_channel_credentials(bundle)
    ) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for size, code in [
            (MESSAGE - 100, grpc.StatusCode.NOT_FOUND),
            (MESSAGE + 1, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Check(health_pb2.HealthCheckRequest(service="x" * size), timeout=10)
            assert caught.value.code() == code


class RawH2:
    """Just enough HTTP/2 over TLS to open streams and read what the server answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.server_settings: dict[int, int] = {}

    @classmethod
    async def connect(cls, port: int, bundle: Path, cert: tuple[Path, Path] | None = None) -> RawH2:
        context = ssl.create_default_context(cafile=bundle)
        if cert is not None:
            context.load_cert_chain(*cert)
        context.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
        connection = cls(reader, writer)
        writer.write(PREFACE + _frame(SETTINGS, 0, 0, b""))
        # The server's SETTINGS first; acknowledge it so its limits are in force.
        kind, flags, _, payload = await connection.frame()
        assert kind == SETTINGS and not flags & ACK
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            connection.server_settings[key] = value
        writer.write(_frame(SETTINGS, ACK, 0, b""))
        await writer.drain()
        return connection

    async def frame(self) -> tuple[int, int, int, bytes]:
        head = await self.reader.readexactly(9)
        length = int.from_bytes(head[:3], "big")
        kind, flags, stream = head[3], head[4], int.from_bytes(head[5:], "big") & 0x7FFFFFFF
        return kind, flags, stream, await self.reader.readexactly(length)

    def open_stream(self, stream: int, path: str) -> None:
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        block = b"".join(b"\x00" + _string(k) + _string(v) for k, v in headers)
        self.writer.write(_frame(HEADERS, END_HEADERS, stream, block))

    def close(self) -> None:
        self.writer.close()


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def _string(text: str) -> bytes:
    """An HPACK string literal, not Huffman coded (every string here is < 127 bytes)."""
    data = text.encode()
    assert len(data) < 127
    return bytes([len(data)]) + data


async def test_idle_connection_is_closed_at_the_idle_timeout(limited: ServerHandle) -> None:
    """TLS and HTTP/2 done, no call ever: the server says GOAWAY after about 1 s."""
    connection = await RawH2.connect(limited.api_port, limited.config.ca_dir / "bundle.pem")
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        async with asyncio.timeout(10):
            while True:
                kind, flags, _, payload = await connection.frame()
                if kind == PING and not flags & ACK:
                    connection.writer.write(_frame(PING, ACK, 0, payload))
                if kind == GOAWAY:
                    break
    finally:
        connection.close()
    assert IDLE * 0.5 <= loop.time() - start < IDLE + 3


def _files(enrolled: Enrolled, directory: Path) -> tuple[Path, Path]:
    chain, key = directory / "agent.pem", directory / "agent.key"
    chain.write_bytes(enrolled.chain_pem)
    key.write_bytes(enrolled.key_pem)
    key.chmod(0o600)
    return chain, key


async def test_streams_beyond_the_cap_on_one_agent_connection_are_refused(
    limited: ServerHandle, enroller: Enroller, tmp_path: Path
) -> None:
    """The cap is advertised, and a client that ignores it has the extra stream reset
    with REFUSED_STREAM, while the streams within the cap stay open."""
    enrolled = await enroller.enroll("capped")
    connection = await RawH2.connect(
        limited.agent_port, limited.config.ca_dir / "bundle.pem", _files(enrolled, tmp_path)
    )
    try:
        assert connection.server_settings.get(SETTINGS_MAX_CONCURRENT_STREAMS) == STREAMS
        path = "/muster.v1.AgentService/Connect"
        for n in range(STREAMS + 1):
            connection.open_stream(1 + 2 * n, path)
        await connection.writer.drain()
        refused: list[int] = []
        async with asyncio.timeout(5):
            while not refused:
                kind, _, stream, payload = await connection.frame()
                if kind == RST_STREAM:
                    refused.append(stream)
                    assert int.from_bytes(payload, "big") == REFUSED_STREAM
                assert kind != GOAWAY, payload
        assert refused == [1 + 2 * STREAMS]
    finally:
        connection.close()


async def test_an_agent_within_the_cap_is_served(limited: ServerHandle, enroller: Enroller) -> None:
    """What an agent does on one connection fits the smallest cap allowed (2): its
    Connect stream and a Renew beside it."""
    agent = SimAgent.of(await enroller.enroll("fits"))
    try:
        await agent.hello()
        stub = agent_pb2_grpc.AgentServiceStub(agent.channel)
        csr, _ = make_csr()
        response = await stub.Renew(agent_pb2.RenewRequest(csr_pem=csr), timeout=10)
        assert response.certificate_chain_pem
        agent.send(heartbeat=agent_pb2.Heartbeat())
        assert agent.call.done() is False
    finally:
        await agent.close()
