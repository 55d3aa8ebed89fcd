"""Postgres goes away under a running server: audit events spool to disk and, once it is
back, every one of them arrives exactly once, in order, and the chain verifies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select

from muster import AsyncAdminClient, AsyncClient
from muster.server.app import ServerHandle, start_server
from muster.server.audit import AuditRecord
from muster.server.audit.verify import verify
from muster.server.storage.database import Database
from muster.server.storage.models import AuditEvent
from muster.v1 import admin_pb2, admin_pb2_grpc
from tests.agentsim import Enroller, SimAgent
from tests.conftest import client_config, server_config
from tests.pg import admin_execute, database_name, fresh_database

pytestmark = pytest.mark.slow


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        try:
            yield url
        finally:
            await allow_connections(url, True)


async def allow_connections(url: str, allowed: bool) -> None:
    await admin_execute(f'ALTER DATABASE "{database_name(url)}" ALLOW_CONNECTIONS {allowed}')


async def cut(url: str) -> None:
    """Refuse new connections to the server's database, then end the ones it holds."""
    await allow_connections(url, False)
    await admin_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{database_name(url)}'"
    )


class Producer:
    """Submits numbered events through the server's batch writer, as the hot path does."""

    def __init__(self, handle: ServerHandle) -> None:
        self.handle = handle
        self.produced: list[str] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            for _ in range(20):
                record = AuditRecord(
                    actor="producer",
                    action="test.event",
                    target=f"n{len(self.produced)}",
                    details={"n": len(self.produced)},
                )
                await self.handle._audit.submit(record)
                self.produced.append(record.event_id)
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def refused_call(handle: ServerHandle, request_id: str) -> None:
    """An RPC with a bad token: the server refuses it and audits that through the writer."""
    bundle = (handle.config.ca_dir / "bundle.pem").read_bytes()
    async with grpc.aio.secure_channel(
        handle.api_address, grpc.ssl_channel_credentials(bundle)
    ) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.QueryAudit(
                admin_pb2.QueryAuditRequest(),
                metadata=[("authorization", "Bearer not-a-token"), ("x-request-id", request_id)],
                timeout=5,
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def spool_metric(registry: CollectorRegistry) -> float:
    value = registry.get_sample_value("muster_audit_spool_bytes")
    assert value is not None
    return value


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def stored(url: str) -> tuple[list[str], dict[str, int], list[str]]:
    """The producer's event ids in chain order, the count per event id, and auth failures."""
    db = Database(url, audit_chain="check")
    try:
        async with db.transaction() as session:
            chain_order = (
                await session.execute(
                    select(AuditEvent.event_id)
                    .where(AuditEvent.actor == "producer")
                    .order_by(AuditEvent.chain, AuditEvent.seq)
                )
            ).scalars()
            counts = await session.execute(
                select(AuditEvent.event_id, func.count()).group_by(AuditEvent.event_id)
            )
            failures = (
                await session.execute(
                    select(AuditEvent.request_id).where(AuditEvent.action == "auth.failure")
                )
            ).scalars()
            return list(chain_order), {e: n for e, n in counts.tuples()}, list(failures)
    finally:
        await db.close()


async def verified(url: str) -> str:
    db = Database(url, audit_chain="check")
    try:
        report = await verify(db)
    finally:
        await db.close()
    assert report.ok, [str(b) for b in report.breaks]
    return report.summary()


async def test_every_event_arrives_exactly_once_across_a_postgres_outage(
    pg_url: str, tmp_path: Path
) -> None:
    handle = await start_server(server_config(tmp_path / "data", database_url=pg_url))
    producer = Producer(handle)
    try:
        producer.start()
        await wait_until(lambda: len(producer.produced) > 300)
        await handle.flush_audit()

        await cut(pg_url)
        requests = [f"outage-{i}" for i in range(3)]
        for request_id in requests:
            await refused_call(handle, request_id)
        during = len(producer.produced)
        await wait_until(lambda: spool_metric(handle.registry) > 0)
        await wait_until(lambda: len(producer.produced) > during + 1000)
        assert handle._audit.spool_bytes > 0
        assert handle._audit.depth < 10_000  # spooled, not piling up in memory

        await allow_connections(pg_url, True)
        await wait_until(lambda: len(producer.produced) > during + 1500)
        await producer.stop()
        await asyncio.wait_for(handle.flush_audit(), 10)
        await wait_until(lambda: spool_metric(handle.registry) == 0)
    finally:
        await producer.stop() if not producer._stop.is_set() else None
        await handle.stop(grace=1.0)

    chain_order, counts, failures = await stored(pg_url)
    assert chain_order == producer.produced  # all of them, once each, in the order produced
    assert set(counts.values()) == {1}
    assert set(requests) <= set(failures)
    assert not list((tmp_path / "data" / "audit-spool").glob("*.jsonl"))
    assert (await verified(pg_url)).startswith("OK: ")


async def test_a_server_stopped_during_an_outage_replays_its_spool_at_the_next_start(
    pg_url: str, tmp_path: Path
) -> None:
    config = server_config(tmp_path / "data", database_url=pg_url)
    handle = await start_server(config)
    produced = []
    try:
        await cut(pg_url)
        for n in range(200):
            record = AuditRecord(actor="producer", action="test.event", details={"n": n})
            await handle._audit.submit(record)
            produced.append(record.event_id)
    finally:
        await handle.stop(grace=0.5)  # the database is still away: the spool keeps them
    spooled = list((tmp_path / "data" / "audit-spool").glob("*.jsonl"))
    assert spooled and spooled[0].stat().st_size > 0

    await allow_connections(pg_url, True)
    handle = await start_server(config)
    try:
        await wait_until(lambda: handle._audit.spool_bytes == 0)
        await handle.flush_audit()
    finally:
        await handle.stop(grace=0.5)
    chain_order, counts, _ = await stored(pg_url)
    assert chain_order == produced
    assert set(counts.values()) == {1}
    assert (await verified(pg_url)).startswith("OK: ")


async def test_a_stream_that_ends_during_an_outage_has_its_disconnect_kept_on_disk(
    pg_url: str, tmp_path: Path
) -> None:
    """Stream events are committed before the stream goes on; with the database away, the
    disconnect is fsynced to the spool instead, and replayed once the database is back.
    The stream holds a task, so its release fails first (Postgres refusing connections
    raises asyncpg's own errors, not SQLAlchemy's)."""
    handle = await start_server(server_config(tmp_path / "data", database_url=pg_url))
    try:
        async with AsyncAdminClient(client_config(handle)) as admin:
            agent = SimAgent.of(await Enroller(handle, admin).enroll("cut-off"))
        session_id = (await agent.hello()).session_id
        async with AsyncClient(client_config(handle)) as client:
            task = await client.submit("echo", b"")
        assert (await agent.expect("assignment")).task_id == task.task_id
        await cut(pg_url)
        await agent.close()
        await wait_until(lambda: not handle.hub.streams())  # released: the event is on disk
        assert handle._audit.spool_bytes > 0
        await allow_connections(pg_url, True)
        await asyncio.wait_for(handle.flush_audit(), 15)
        await wait_until(lambda: handle._audit.spool_bytes == 0)
    finally:
        await handle.stop(grace=1.0)
    db = Database(pg_url, audit_chain="check")
    try:
        async with db.transaction() as session:
            actions = (
                await session.execute(
                    select(AuditEvent.action)
                    .where(AuditEvent.target == session_id)
                    .order_by(AuditEvent.seq)
                )
            ).scalars()
            assert list(actions) == ["stream.connect", "stream.disconnect"]
    finally:
        await db.close()
    assert (await verified(pg_url)).startswith("OK: ")
