"""Cluster-wide presence: "connected" means connected to any replica, whichever replica is
asked; a replica's rows live while it refreshes them and expire once it is killed."""

from __future__ import annotations

import asyncio
import shutil
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import event, func, select

from muster import Agent, AsyncAdminClient, AsyncClient
from muster.server.app import ServerHandle, start_server
from muster.server.ca import CertificateAuthority
from muster.server.dispatch.presence import Presence
from muster.server.storage.models import AgentSession
from muster.server.storage.types import utcnow
from muster.v1 import agent_pb2
from tests.agentsim import Enroller, SimAgent
from tests.conftest import BACKEND, client_config, server_config
from tests.e2e import procs
from tests.pg import fresh_database

pytestmark = pytest.mark.slow

postgres_only = pytest.mark.skipif(
    BACKEND != "postgres", reason="runs in the Postgres pass (make test)"
)


async def until(read: Callable[[], Any], check: Callable[[Any], bool], timeout: float = 5.0) -> Any:
    """Read until ``check`` holds (the end of a stream is written as the stream ends, not
    when the agent closes its side)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await read()
        if check(value) or loop.time() > deadline:
            return value
        await asyncio.sleep(0.05)


@contextmanager
def shifted(presence: Presence, by: timedelta) -> Iterator[None]:
    """Move a replica's presence clock ahead (its readers and writers alike)."""
    original = presence.clock
    presence.clock = lambda: original() + by
    try:
        yield
    finally:
        presence.clock = original


@contextmanager
def pinned(presence: Presence, when: datetime) -> Iterator[None]:
    """Stop a replica's presence clock at ``when`` (its readers and writers alike)."""
    original = presence.clock
    presence.clock = lambda: when
    try:
        yield
    finally:
        presence.clock = original


def leaf_not_after(chain_pem: bytes) -> datetime:
    return x509.load_pem_x509_certificate(chain_pem).not_valid_after_utc


async def test_a_connected_agent_lists_with_replica_kinds_concurrency_in_flight_and_expiry(
    server: ServerHandle, admin: AsyncAdminClient, enroller: Enroller, client: AsyncClient
) -> None:
    enrolled = await enroller.enroll("worker-1")
    before = await admin.get_agent("worker-1")
    assert (before.connected, before.last_seen_at, before.capabilities) == (False, None, ())
    agent = SimAgent.of(enrolled)
    await agent.hello(capabilities=("sleep", "echo"), max_concurrency=3)
    agent.keep_alive()
    [listed] = await admin.list_agents()
    assert listed.connected
    assert listed.replica == server.config.resolved_replica_id
    assert listed.capabilities == ("echo", "sleep")
    assert (listed.max_concurrency, listed.in_flight) == (3, 0)
    assert listed.certificate_expires_at == leaf_not_after(enrolled.chain_pem)
    assert listed.connected_at is not None and listed.last_seen_at is not None

    task = await client.submit("sleep", {"seconds": 60})
    assignment = await agent.expect("assignment")
    agent.send(accepted=agent_pb2.Accepted(task_id=task.task_id, attempt=assignment.attempt))
    busy = await until(lambda: admin.get_agent("worker-1"), lambda a: a.in_flight == 1)
    assert busy.in_flight == 1

    await agent.close()
    gone: Agent = await until(lambda: admin.get_agent("worker-1"), lambda a: not a.connected)
    assert not gone.connected
    assert (gone.replica, gone.connected_at) == ("", None)
    # What it last declared stays known; last_seen_at was written when the stream ended.
    assert (gone.capabilities, gone.max_concurrency) == (("echo", "sleep"), 3)
    assert gone.last_seen_at is not None and gone.last_seen_at >= listed.last_seen_at
    assert gone.certificate_expires_at == leaf_not_after(enrolled.chain_pem)


async def test_heartbeats_cost_no_presence_write_and_a_refresh_is_one_pass_per_interval(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    agents = []
    for i in range(4):
        agent = SimAgent.of(await enroller.enroll(f"beating-{i}"))
        await agent.hello()
        agent.keep_alive(interval=0.05)  # 80 heartbeats a second in all
        agents.append(agent)
    first = await admin.get_agent("beating-0")
    refreshes: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE AGENT_SESSIONS"):
            refreshes.append(statement)

    engine = server.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        window = 2.0
        await asyncio.sleep(window)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    interval = server.presence.refresh_every.total_seconds()
    # Some 160 heartbeats; at most one refresh per interval (plus one the window cut).
    assert 1 <= len(refreshes) <= window / interval + 1
    later = await admin.get_agent("beating-0")
    assert first.last_seen_at is not None and later.last_seen_at is not None
    assert later.last_seen_at > first.last_seen_at  # written by the refresh, in batches
    for agent in agents:
        await agent.close()


async def test_a_dead_replicas_agents_stop_counting_once_its_rows_expire(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    """Another replica that recorded a stream and then died (no disconnect, no refresh):
    its row counts until it expires, then no longer, and a later pass deletes it."""
    enrolled = await enroller.enroll("orphan")
    # Pinned clocks: how long the test itself takes must not move the ghost's row
    # across the deletion line (this replica deletes rows expired a ttl of its own ago).
    start = utcnow()
    ghost = Presence(
        server.db, replica="ghost", refresh_every=timedelta(seconds=5), clock=lambda: start
    )
    await ghost.connected(
        session_id="s_ghost",
        agent_id="orphan",
        capabilities=["echo"],
        max_concurrency=2,
        cert_serial=enrolled.serial,
        cert_not_after=leaf_not_after(enrolled.chain_pem),
    )
    alive = await admin.get_agent("orphan")
    assert (alive.connected, alive.replica, alive.max_concurrency) == (True, "ghost", 2)
    await server.presence.refresh()  # this replica's pass keeps only its own rows alive

    async def rows() -> int:
        async with server.db.transaction() as session:
            count = await session.scalar(select(func.count()).select_from(AgentSession))
        return int(count or 0)

    expiry = start + ghost.ttl
    with pinned(server.presence, expiry - timedelta(seconds=1)):
        assert (await admin.get_agent("orphan")).connected
    with pinned(server.presence, expiry + server.presence.ttl / 2):
        expired = await admin.get_agent("orphan")
        assert (expired.connected, expired.replica) == (False, "")
        await server.presence.refresh()
        assert await rows() == 1  # expired, kept a little longer
    with pinned(server.presence, expiry + server.presence.ttl + timedelta(seconds=1)):
        await server.presence.refresh()
        assert await rows() == 0


# Two replicas on one Postgres


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[ServerHandle, ServerHandle]]:
    async with fresh_database() as url:
        CertificateAuthority.init(tmp_path / "a" / "ca", "muster.local")
        shutil.copytree(tmp_path / "a" / "ca", tmp_path / "b" / "ca")
        handles = [
            await start_server(server_config(tmp_path / n, database_url=url, replica_id=n))
            for n in ("a", "b")
        ]
        try:
            yield handles[0], handles[1]
        finally:
            await asyncio.gather(*(h.stop(grace=1.0) for h in handles))


@postgres_only
async def test_an_agent_on_replica_b_is_connected_when_asked_through_replica_a(
    pair: tuple[ServerHandle, ServerHandle],
) -> None:
    a, b = pair
    async with AsyncAdminClient(client_config(a)) as admin_a:
        enrolled = await Enroller(a, admin_a).enroll("far-away")
        agent = SimAgent(b.agent_endpoint, enrolled.credentials())
        await agent.hello(capabilities=("render",), max_concurrency=4)
        agent.keep_alive()
        [seen] = await admin_a.list_agents()
        assert (seen.agent_id, seen.connected, seen.replica) == ("far-away", True, "b")
        assert (seen.capabilities, seen.max_concurrency) == (("render",), 4)
        assert not a.hub.is_connected("far-away")  # replica a holds no stream of it
        await agent.close()
        gone = await until(lambda: admin_a.get_agent("far-away"), lambda x: not x.connected)
        assert (gone.connected, gone.replica) == (False, "")


@postgres_only
@pytest.mark.timeout(120)
async def test_after_replica_b_is_sigkilled_its_agent_stops_counting_by_expiry(
    tmp_path: Path,
) -> None:
    async with fresh_database() as url:
        a = await start_server(server_config(tmp_path / "a", database_url=url, replica_id="a"))
        shutil.copytree(tmp_path / "a" / "ca", tmp_path / "b" / "ca")
        environ = procs.env(
            MUSTER_DATABASE_URL=url,
            MUSTER_REPLICA_ID="b",
            MUSTER_API_ADDR="127.0.0.1:0",
            MUSTER_AGENT_ADDR="127.0.0.1:0",
            MUSTER_METRICS_ADDR="",
            MUSTER_HEARTBEAT_INTERVAL="5s",
            MUSTER_LEASE_DURATION="20s",
        )
        b = await procs.spawn(
            "server",
            "--data-dir",
            str(tmp_path / "b"),
            cwd=tmp_path,
            log=tmp_path / "b.log",
            environ=environ,
        )
        try:
            endpoints = await procs.wait_for_file(tmp_path / "b" / "endpoints.json")
            async with AsyncAdminClient(client_config(a)) as admin:
                enrolled = await Enroller(a, admin).enroll("stranded")
                agent = SimAgent(endpoints["agent"], enrolled.credentials())
                await agent.hello()
                agent.keep_alive()
                assert (await admin.get_agent("stranded")).replica == "b"
                await procs.stop(b, signal.SIGKILL)
                # No disconnect was written: the row counts until it expires (B's ttl is
                # three of its 5 s refresh intervals), then not.
                assert (await admin.get_agent("stranded")).connected
                with shifted(a.presence, timedelta(seconds=16)):
                    stranded = await admin.get_agent("stranded")
                assert (stranded.connected, stranded.replica) == (False, "")
                await agent.close()
        finally:
            if b.returncode is None:
                await procs.stop(b, signal.SIGKILL)
            await a.stop(grace=1.0)


def test_presence_ttl_is_three_refresh_intervals() -> None:
    presence = Presence(None, replica="r", refresh_every=timedelta(seconds=5))  # type: ignore[arg-type]
    assert presence.ttl == timedelta(seconds=15)
    assert presence.instance.startswith("r:")
    assert Presence(None, replica="r", refresh_every=timedelta(seconds=5)).instance != (  # type: ignore[arg-type]
        presence.instance
    )
    assert presence.now() <= utcnow()
