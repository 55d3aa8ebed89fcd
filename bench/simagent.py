"""Lightweight simulated agents: the real protocol over real mTLS, many per process.

A :class:`SimAgent` enrolls through ``EnrollmentService`` like ``muster agent`` does and
keeps one ``AgentService.Connect`` stream on its own TLS connection, reconnecting with the
daemon's pacing (:class:`muster.agent.backoff.Backoff`). Its tasks are no-ops: an Assignment is
answered at once with Accepted, a successful Result and one Credit, so the load measures
the control plane and not an executor. :class:`RawAgent` keeps the same kind of stream
open against the raw grpc.aio echo server (the reference).

Two framings of the same events (agent.proto, AgentBatch/ServerBatch): one message per
event, as agents written before batches do (the default), or ``batched``: Hello asks for
ServerBatch, and what queued up meanwhile is written as one AgentBatch.
``BENCH_SIM_BATCHES=1`` in the environment makes batched the default (fleet processes
inherit it; not a ``MUSTER_*`` name, which ``procs.child_env`` keeps from children).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from muster import AsyncAdminClient, batching
from muster.agent.backoff import Backoff
from muster.v1 import agent_pb2, agent_pb2_grpc, enrollment_pb2, enrollment_pb2_grpc

KIND = "noop"
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # A connection of its own per agent: channels with equal arguments would otherwise
    # share one subchannel (and one TCP connection) through grpc's global pool.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
]
REFUSED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
STABLE_STREAM = 10.0
WELCOME_TIMEOUT = 15.0
"""The daemon's default ``welcome_timeout``."""
BATCHES_ENV = "BENCH_SIM_BATCHES"
"""``1``: simulated agents batch by default (see the module docstring)."""


def batches_by_default() -> bool:
    return os.environ.get(BATCHES_ENV, "") == "1"


@dataclass(frozen=True)
class Creds:
    """An enrolled identity, as JSON-friendly strings so fleet processes can load it."""

    agent_id: str
    key_pem: str
    chain_pem: str
    bundle_pem: str

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.bundle_pem.encode(), self.key_pem.encode(), self.chain_pem.encode()
        )

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def make_csr(name: str) -> tuple[bytes, bytes]:
    """(csr_pem, key_pem) for a fresh P-256 key, the agent daemon's default key type."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return csr.public_bytes(serialization.Encoding.PEM), key_pem


async def enroll(
    api: str, bundle_pem: bytes, token: str, name: str, csr_pem: bytes, key_pem: bytes
) -> tuple[Creds, enrollment_pb2.EnrollResponse]:
    """One enrollment over a fresh TLS connection, as a new agent host does it."""
    channel = grpc.aio.secure_channel(
        api, grpc.ssl_channel_credentials(bundle_pem), options=CHANNEL_OPTIONS
    )
    try:
        response = await enrollment_pb2_grpc.EnrollmentServiceStub(channel).Enroll(
            enrollment_pb2.EnrollRequest(token=token, csr_pem=csr_pem, name=name), timeout=60
        )
    finally:
        await channel.close()
    creds = Creds(
        response.agent_id,
        key_pem.decode(),
        response.certificate_chain_pem.decode(),
        response.trust_bundle_pem.decode(),
    )
    return creds, response


async def enroll_many(
    admin: AsyncAdminClient,
    api: str,
    bundle_pem: bytes,
    count: int,
    *,
    prefix: str,
    concurrency: int = 16,
) -> list[Creds]:
    """Enroll ``count`` agents named ``prefix-<i>``, ``concurrency`` at a time (setup, untimed)."""
    out: list[Creds | None] = [None] * count
    workers = max(1, min(concurrency, count))
    share = -(-count // workers)

    async def worker(w: int) -> None:
        mine = range(w * share, min(count, (w + 1) * share))
        if not mine:
            return
        _, token = await admin.create_bootstrap_token("default", ttl=3600, max_uses=len(mine))
        for i in mine:
            csr, key = make_csr(f"{prefix}-{i}")
            out[i] = (await enroll(api, bundle_pem, token, f"{prefix}-{i}", csr, key))[0]

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return [c for c in out if c is not None]


class _Close:
    """Queued to the writer: half-close the stream."""


class Stats:
    """Counters shared by the agents of one process (read by the fleet's status line)."""

    def __init__(self) -> None:
        self.connected = 0
        self.welcomes = 0
        self.fresh: set[int] = set()
        """Agents (by index) welcomed since the last ``mark()``."""
        self.last_welcome = 0.0
        self.acked = 0
        self.last_ack = 0.0
        self.ended: dict[str, int] = {}
        self.assigned: dict[str, float] | None = None
        """task_id -> monotonic time its Assignment arrived, when recording."""

    def mark(self) -> None:
        self.fresh = set()
        self.last_welcome = 0.0

    def end(self, code: str) -> None:
        self.ended[code] = self.ended.get(code, 0) + 1


class SimAgent:
    """One simulated agent; ``await run()`` until ``stop()`` or the server refuses it."""

    def __init__(
        self,
        index: int,
        creds: Creds,
        endpoint: str,
        stats: Stats,
        *,
        max_concurrency: int = 4,
        kinds: Sequence[str] = (KIND,),
        on_end: Callable[[SimAgent, grpc.StatusCode], None] | None = None,
        batched: bool | None = None,
    ) -> None:
        self.index = index
        self.batched = batches_by_default() if batched is None else batched
        """Ask for ServerBatch in Hello, and send AgentBatch when the server reads them."""
        self.creds = creds
        self.endpoint = endpoint
        self.stats = stats
        self.max_concurrency = max_concurrency
        self.kinds = list(kinds)
        self.on_end = on_end
        self._credentials = creds.channel_credentials()
        self._backoff = Backoff(0.2, 30.0)
        self._stopping = False
        self._call: Any = None
        self.refused: grpc.StatusCode | None = None
        self.ended_at = 0.0

    def stop(self) -> None:
        self._stopping = True
        if self._call is not None:
            self._call.cancel()

    async def run(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            outcome = await self._session()
            self.ended_at = time.monotonic()
            if self.on_end is not None and isinstance(outcome, grpc.StatusCode):
                self.on_end(self, outcome)
            if self._stopping:
                return
            if outcome in REFUSED:
                assert isinstance(outcome, grpc.StatusCode)
                self.refused = outcome
                return
            if outcome == "drained" or time.monotonic() - started >= STABLE_STREAM:
                self._backoff.reset(steady=True)
            await asyncio.sleep(self._backoff.next_delay())

    async def _session(self) -> grpc.StatusCode | str:
        stats = self.stats
        channel = grpc.aio.secure_channel(self.endpoint, self._credentials, options=CHANNEL_OPTIONS)
        out: asyncio.Queue[agent_pb2.AgentMessage | _Close] = asyncio.Queue()
        helpers: list[asyncio.Task[None]] = []
        connected = False
        drained = False
        try:
            call = agent_pb2_grpc.AgentServiceStub(channel).Connect()
            self._call = call
            hello = agent_pb2.Hello(
                agent_version="bench-sim", capabilities=self.kinds,
                max_concurrency=self.max_concurrency, batches=self.batched,
            )  # fmt: skip
            try:
                async with asyncio.timeout(WELCOME_TIMEOUT):
                    await call.write(agent_pb2.AgentMessage(hello=hello))
                    first = await call.read()
            except TimeoutError:
                # As the daemon does: a stream that never gets its Welcome is given up.
                call.cancel()
                stats.end("no-welcome-in-time")
                return "timeout"
            if not isinstance(first, agent_pb2.ServerMessage) or not first.HasField("welcome"):
                stats.end("no-welcome")
                return "closed"
            connected = True
            now = time.monotonic()
            stats.connected += 1
            stats.welcomes += 1
            stats.fresh.add(self.index)
            stats.last_welcome = max(stats.last_welcome, now)
            interval = first.welcome.heartbeat_interval.ToTimedelta().total_seconds() or 10.0
            batching_out = self.batched and first.welcome.batches
            helpers.append(asyncio.create_task(_writer(call, out, batched=batching_out)))
            helpers.append(asyncio.create_task(_heartbeats(out, interval)))
            while True:
                message = await call.read()
                if not isinstance(message, agent_pb2.ServerMessage):
                    break
                if message.WhichOneof("body") == "batch":
                    for item in message.batch.messages:
                        drained = _answer(item, out, stats) or drained
                else:
                    drained = _answer(message, out, stats) or drained
            stats.end("OK")
            return "drained" if drained else "closed"
        except grpc.aio.AioRpcError as err:
            stats.end(err.code().name)
            return err.code()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            return "closed"
        finally:
            self._call = None
            if connected:
                stats.connected -= 1
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                with contextlib.suppress(BaseException):
                    await helper
            await channel.close()


def _answer(
    message: agent_pb2.ServerMessage,
    out: asyncio.Queue[agent_pb2.AgentMessage | _Close],
    stats: Stats,
) -> bool:
    """React to one server message (alone or from a batch); True for Drain."""
    body = message.WhichOneof("body")
    if body == "assignment":
        a = message.assignment
        if stats.assigned is not None:
            stats.assigned[a.task_id] = time.monotonic()
        out.put_nowait(
            agent_pb2.AgentMessage(
                accepted=agent_pb2.Accepted(task_id=a.task_id, attempt=a.attempt)
            )
        )
        out.put_nowait(
            agent_pb2.AgentMessage(
                result=agent_pb2.Result(
                    task_id=a.task_id, attempt=a.attempt, outcome=agent_pb2.OUTCOME_SUCCEEDED
                )
            )
        )
        out.put_nowait(agent_pb2.AgentMessage(credit=agent_pb2.Credit(credits=1)))
    elif body == "ack":
        stats.acked += 1
        stats.last_ack = time.monotonic()
    elif body == "drain":
        out.put_nowait(_Close())
        return True
    return False


async def _writer(
    call: Any, out: asyncio.Queue[agent_pb2.AgentMessage | _Close], *, batched: bool = False
) -> None:
    """The only coroutine that writes: a grpc.aio call takes one write at a time. Batched,
    what queued up while it wrote goes out as one AgentBatch."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        while True:
            taken = [await out.get()]
            while (
                batched
                and len(taken) < batching.MAX_ITEMS
                and not isinstance(taken[-1], _Close)
                and not out.empty()
            ):
                taken.append(out.get_nowait())
            messages = [m for m in taken if not isinstance(m, _Close)]
            for group in batching.split(messages) if messages else []:
                if len(group) == 1:
                    await call.write(group[0])
                else:
                    await call.write(
                        agent_pb2.AgentMessage(batch=agent_pb2.AgentBatch(messages=group))
                    )
            if isinstance(taken[-1], _Close):
                await call.done_writing()
                return


async def _heartbeats(out: asyncio.Queue[agent_pb2.AgentMessage | _Close], interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        out.put_nowait(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))


# The raw reference ---------------------------------------------------------------------

ECHO_METHOD = "/bench.Raw/Echo"
UNARY_METHOD = "/bench.Raw/Call"
HELLO_BYTES = len(
    agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(agent_version="bench-sim", capabilities=[KIND], max_concurrency=4)
    ).SerializeToString()
)
HEARTBEAT_BYTES = max(
    1, len(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()).SerializeToString())
)


class RawAgent:
    """An idle bidi stream on its own mTLS connection to the raw echo server: the ceiling.

    Sends a Hello-sized message, waits for its echo (connected), then a Heartbeat-sized
    message every ``interval`` seconds, as a simulated Muster agent does.
    """

    def __init__(
        self, index: int, creds: Creds, endpoint: str, stats: Stats, interval: float = 5.0
    ) -> None:
        self.index = index
        self.endpoint = endpoint
        self.stats = stats
        self.interval = interval
        self._credentials = creds.channel_credentials()
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True

    async def run(self) -> None:
        stats = self.stats
        channel = grpc.aio.secure_channel(self.endpoint, self._credentials, options=CHANNEL_OPTIONS)
        connected = False
        try:
            call: Any = channel.stream_stream(ECHO_METHOD)()
            await call.write(b"h" * HELLO_BYTES)
            await call.read()
            connected = True
            stats.connected += 1
            stats.welcomes += 1
            stats.fresh.add(self.index)
            stats.last_welcome = max(stats.last_welcome, time.monotonic())
            while not self._stopping:
                await asyncio.sleep(self.interval)
                await call.write(b"b" * HEARTBEAT_BYTES)
                await call.read()
        except grpc.aio.AioRpcError as err:
            stats.end(err.code().name)
        finally:
            if connected:
                stats.connected -= 1
            await channel.close()
