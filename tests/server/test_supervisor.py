"""One supervisor owns every background task of a server (server/supervisor.py): a crash
of any of them is logged by name, turns health NOT_SERVING for every service and stops
the server cleanly; ``muster server`` then exits non-zero."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from muster.server.app import API_SERVICES, ServerHandle, start_server
from muster.server.audit import AuditWriter
from muster.server.dispatch.suspicion import Report
from muster.server.drain import Drain
from muster.server.quotas import LeaseRequest, RedisQuotaStore
from muster.server.supervisor import Crash, Supervisor
from tests.conftest import REDIS_URL, forget_redis, server_config
from tests.e2e import procs
from tests.test_audit import event, open_db, rows_by_seq

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICES = ["", *(service.full_name for service in API_SERVICES)]

LOOPS = ["audit-writer", "fanout-publish", "fanout-subscribe", "reaper", "server-certificate"]
"""Long-lived tasks: killed by cancelling the task the supervisor holds by name."""
DRAINS = ["group-commit", "inflight-release", "quota-decisions", "suspicion-reports"]
"""On-demand writers: killed by cancelling the writer that an item just started."""


# -- the supervisor alone --------------------------------------------------------------


async def test_a_task_that_returns_raises_or_is_cancelled_is_a_crash_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[Crash] = []
    supervisor = Supervisor()
    supervisor.on_crash(seen.append)
    stay = asyncio.Event()

    async def returns() -> None:
        return None

    async def raises() -> None:
        raise ValueError("boom")

    supervisor.start("returns", returns())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [(c.name, c.reason) for c in seen] == [("returns", "returned while it must run")]
    supervisor.start("raises", raises())
    waiting = supervisor.start("waits", stay.wait())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.wait([waiting])
    await asyncio.sleep(0)
    assert len(seen) == 1  # the listeners hear the first crash only; every one is logged
    assert "background task raises crashed (raised ValueError: boom)" in caplog.text
    assert "background task waits crashed (was cancelled)" in caplog.text
    late: list[Crash] = []
    supervisor.on_crash(late.append)  # a listener added later hears it at once
    assert late == seen


async def test_after_stop_ends_are_expected_and_drain_crashes_arrive_through_the_hook() -> None:
    seen: list[Crash] = []
    supervisor = Supervisor()
    supervisor.on_crash(seen.append)

    async def flush(items: list[int]) -> None:
        raise RuntimeError("writer bug")

    drain: Drain[int] = Drain(flush, name="test-drain")
    supervisor.adopt("test-drain", drain)
    assert supervisor.drains == {"test-drain": drain}
    drain.put(1)
    await drain.wait()
    assert [c.name for c in seen] == ["test-drain"]
    assert isinstance(seen[0].error, RuntimeError)

    quiet = Supervisor()
    quiet.on_crash(seen.append)
    task = quiet.start("loop", asyncio.Event().wait())
    quiet.stop()
    task.cancel()
    await asyncio.wait([task])
    await asyncio.sleep(0)
    assert len(seen) == 1 and quiet.crash is None
    with pytest.raises(ValueError, match="already supervised"):
        quiet.watch("loop", task)


async def test_a_crashed_audit_writer_still_writes_what_it_held_when_closed(
    tmp_path: Path,
) -> None:
    db = await open_db(f"sqlite+aiosqlite:///{tmp_path / 'muster.db'}")
    try:
        writer = AuditWriter(db, batch_size=100, flush_interval=60)  # holds events a while
        writer.start()
        for n in range(3):
            await writer.submit(event(n))
        await asyncio.sleep(0)
        assert writer.task is not None and writer.depth == 3
        writer.task.cancel()  # the crash: the supervisor reports it; close must not lose
        await asyncio.wait([writer.task])
        await writer.close()
        assert [row.details["n"] for row in await rows_by_seq(db)] == [0, 1, 2]
    finally:
        await db.close()


# -- each task of a real server --------------------------------------------------------


@pytest.fixture
async def settings(backend: dict[str, object]) -> AsyncIterator[dict[str, object]]:
    """The backend's settings, with Redis on embedded too: fan-out's loops run only then."""
    if backend.get("redis_url"):
        yield backend
        return
    prefix = f"muster-test-{secrets.token_hex(6)}"
    yield {**backend, "redis_url": REDIS_URL, "redis_prefix": prefix}
    await forget_redis(prefix)


async def _probe(_conn: Any, items: Any) -> list[None]:
    return [None] * len(items)


async def kill(handle: ServerHandle, name: str) -> Callable[[], None] | None:
    """Crash the supervised task ``name``; returns a check of what a drain's caller saw."""
    supervisor = handle.supervisor
    if name in LOOPS:
        supervisor.tasks[name].cancel()
        return None
    drain = supervisor.drains[name]
    future: asyncio.Future[Any]
    if name == "group-commit":
        future = handle.db.group.submit_many(("supervisor-test",), _probe, None)
    elif name == "quota-decisions":
        # Two decisions asked together always queue for the writer (a lone one may go
        # by itself); one turn of the loop queues them and starts the writer.
        store = handle._quotas.store
        assert isinstance(store, RedisQuotaStore)
        lease = [LeaseRequest("supervisor-test", 10)]
        future = asyncio.ensure_future(
            store.acquire_leases_many([("a", lease), ("b", lease)], ttl=60)
        )
        await asyncio.sleep(0)
    elif name == "inflight-release":
        drain.put(("tenant", "pool", "holder"))
    else:
        drain.put(Report("excess_credit", "agent", "actor", "peer", "log"))
    assert drain.task is not None
    drain.task.cancel()
    if name not in ("group-commit", "quota-decisions"):
        return None

    def caller_failed() -> None:
        # A caller queued behind a crashed writer fails; it does not hang.
        assert future.done() and future.exception() is not None

    return caller_failed


async def watch(stub: health_pb2_grpc.HealthStub, service: str) -> Any:
    call = stub.Watch(health_pb2.HealthCheckRequest(service=service))
    first = await call.read()
    assert first.status == SERVING, service
    return call


@pytest.mark.parametrize("name", LOOPS + DRAINS)
async def test_a_crash_of_any_background_task_turns_health_not_serving_and_stops_the_server(
    name: str, tmp_path: Path, settings: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    handle = await start_server(server_config(tmp_path / "data", **settings))
    try:
        supervisor = handle.supervisor
        assert set(supervisor.tasks) == set(LOOPS), "every long-lived loop is supervised"
        assert set(supervisor.drains) == set(DRAINS), "every on-demand writer is supervised"
        bundle = (handle.config.ca_dir / "bundle.pem").read_bytes()
        credentials = grpc.ssl_channel_credentials(bundle)
        async with grpc.aio.secure_channel(handle.api_address, credentials) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watches = [await watch(stub, service) for service in HEALTH_SERVICES]
            with caplog.at_level(logging.ERROR, logger="muster.server.supervisor"):
                check = await kill(handle, name)
                for service, call in zip(HEALTH_SERVICES, watches, strict=True):
                    update = await asyncio.wait_for(call.read(), 10)
                    assert update.status == NOT_SERVING, service
                await asyncio.wait_for(handle.wait_stopped(), 30)
        assert handle.crash is not None and handle.crash.name == name
        assert f"background task {name} crashed (was cancelled)" in caplog.text
        if check is not None:
            check()
        # Stopped for real, the way stop() does it: the listener is closed and the
        # endpoints file is gone.
        assert not handle.config.endpoints_file.exists()
        async with grpc.aio.secure_channel(handle.api_address, credentials) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            assert info.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
    finally:
        await handle.stop(grace=1.0)


# -- a real `muster server` process ----------------------------------------------------

CRASHING_SERVER = """
import asyncio, signal, sys

import muster.server.app as app


async def reaper(*args, **kwargs):
    # The real reaper swallows its errors; this one fails when the test says so (SIGUSR1).
    fired = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, fired.set)
    await fired.wait()
    raise RuntimeError("injected reaper failure")


app._reaper = reaper
from muster.cli import main

sys.exit(main(["server", *sys.argv[1:]]))
"""


async def test_muster_server_exits_non_zero_after_a_background_task_crashes(
    tmp_path: Path,
) -> None:
    """The real CLI entry point in a real process; only the reaper is replaced (before
    ``main`` runs) by one that raises on SIGUSR1."""
    data = tmp_path / "data"
    log_path = tmp_path / "server.log"
    environ = procs.env(
        MUSTER_API_ADDR="127.0.0.1:0", MUSTER_AGENT_ADDR="127.0.0.1:0", MUSTER_METRICS_ADDR=""
    )
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CRASHING_SERVER,
            "--data-dir",
            str(data),
            cwd=Path(__file__).resolve().parents[2],
            env=environ,
            stdout=log,
            stderr=log,
            stdin=asyncio.subprocess.DEVNULL,
        )
    try:
        endpoints = await procs.wait_for_file(data / "endpoints.json")
        bundle = (data / "ca" / "bundle.pem").read_bytes()
        credentials = grpc.ssl_channel_credentials(bundle)
        async with grpc.aio.secure_channel(endpoints["api"], credentials) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert health.status == SERVING
        proc.send_signal(signal.SIGUSR1)
        code = await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    logged = log_path.read_text()
    assert code == 1, logged
    assert "background task reaper crashed (raised RuntimeError: injected reaper failure)" in (
        logged
    )
    assert "server stopped" in logged
    assert not (data / "endpoints.json").exists()
