"""``muster server --workers N`` with real processes: N workers share the api and agent
ports (SO_REUSEPORT) and both serve connections; a worker killed with SIGKILL is
restarted and loses no accepted task; SIGTERM to the parent drains every worker and
exits 0; more than one worker on SQLite is refused."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from muster import AsyncAdminClient, AsyncClient, ClientConfig
from muster.server.config import ServerConfig
from muster.server.storage.models import AuditEvent, Task
from muster.server.workers import (
    MAX_RESTART_DELAY,
    WorkerSupervisor,
    restart_delay,
    worker_environ,
    worker_metrics_addr,
    worker_replica_id,
)
from tests.conftest import BACKEND, FANOUT_SECRET, REDIS_URL, forget_redis
from tests.e2e import procs
from tests.e2e.cluster import TIMINGS
from tests.pg import fresh_database

postgres_only = pytest.mark.skipif(
    BACKEND != "postgres", reason="runs in the Postgres pass (make test)"
)


def test_restart_delay_doubles_from_half_a_second_to_a_cap() -> None:
    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay(7) == MAX_RESTART_DELAY == restart_delay(10_000)


def test_each_worker_has_its_own_replica_id_and_metrics_port() -> None:
    assert worker_replica_id("ctl-1", 3) == "ctl-1-w3"
    assert len(worker_replica_id("x" * 200, 12)) <= 100  # the audit chain's column
    assert worker_metrics_addr("0.0.0.0:9464", 2) == "0.0.0.0:9466"
    assert worker_metrics_addr("[::1]:9464", 1) == "[::1]:9465"
    assert worker_metrics_addr("127.0.0.1:0", 1) == "127.0.0.1:0"
    assert worker_metrics_addr("", 1) == ""


def test_a_worker_is_configured_by_its_environment_alone(tmp_path: Path) -> None:
    """What the parent hands a worker is a whole configuration: read back, it is the
    parent's, plus the worker's own name, metrics port and SO_REUSEPORT."""
    parent = ServerConfig(
        data_dir=tmp_path,
        database_url="postgresql+asyncpg://u:pw@db/muster",
        redis_url="redis://127.0.0.1:6379/0",
        fanout_secret="s" * 32,
        replica_id="ctl",
        metrics_addr="127.0.0.1:9500",
        trust_domain="example.org",
        workers=4,
    )
    environ = worker_environ(
        parent,
        2,
        api_addr="127.0.0.1:7443",
        agent_addr="127.0.0.1:7444",
        log_level="INFO",
        base={"MUSTER_REDIS_URL": parent.redis_url, "MUSTER_FANOUT_SECRET": "s" * 32},
    )
    worker = ServerConfig.from_env(environ)
    assert (worker.workers, worker.worker_index, worker.reuse_port) == (1, 2, True)
    assert (worker.replica_id, worker.metrics_addr) == ("ctl-w2", "127.0.0.1:9502")
    assert (worker.database_url, worker.trust_domain) == (parent.database_url, "example.org")
    assert worker.endpoints_file == tmp_path / "endpoints.worker2.json"


async def test_more_than_one_worker_on_sqlite_is_refused(tmp_path: Path) -> None:
    code, _, err = await procs.run(
        "server",
        "--workers",
        "2",
        "--data-dir",
        str(tmp_path / "data"),
        cwd=tmp_path,
        environ=procs.env(MUSTER_API_ADDR="127.0.0.1:0", MUSTER_AGENT_ADDR="127.0.0.1:0"),
    )
    assert code == 1, err
    assert "workers: more than one needs PostgreSQL (database_url) and Redis" in err
    assert not (tmp_path / "data" / "endpoints.json").exists()


async def test_a_worker_that_cannot_start_stops_the_parent_with_its_code(tmp_path: Path) -> None:
    """Worker 0 cannot reach its database: the parent starts no other worker, exits with
    worker 0's code and leaves no endpoints.json."""
    log = tmp_path / "server.log"
    parent = await procs.spawn(
        "server", "--workers", "2", "--data-dir", str(tmp_path / "data"), cwd=tmp_path, log=log,
        environ=procs.env(
            MUSTER_API_ADDR="127.0.0.1:0",
            MUSTER_AGENT_ADDR="127.0.0.1:0",
            MUSTER_METRICS_ADDR="",
            MUSTER_DATABASE_URL="postgresql+asyncpg://muster@127.0.0.1:1/nowhere",
            MUSTER_REDIS_URL="redis://127.0.0.1:1/0",
            MUSTER_FANOUT_SECRET=FANOUT_SECRET,
        ),
    )  # fmt: skip
    code = await asyncio.wait_for(parent.wait(), 60)
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert "ERROR muster.server.workers: worker 0 (pid " in text
    assert "exited with code 1 before it was ready; stopping" in text
    assert "worker 1 [" not in text  # never started
    assert not (tmp_path / "data" / "endpoints.json").exists()


STAND_IN = """
import json, os, signal, socket, sys, time
from pathlib import Path

# A stand-in worker: reports ready as `muster server` does, then follows the plan
# in argv[1] for this worker's start number (a line per start in argv[2]).
index = int(os.environ["MUSTER_WORKER_INDEX"])
starts = Path(sys.argv[2]) / f"{index}.starts"
with starts.open("a") as f:
    f.write(f"{os.getpid()}\\n")
start = len(starts.read_text().split())
plan = json.loads(sys.argv[1]).get(str(index), [])
step = plan[start - 1] if start <= len(plan) else "serve"
if step == "die-before-ready":
    sys.exit(4)
control = socket.socket(fileno=int(os.environ["MUSTER_WORKER_CONTROL_FD"]))
ready = {"pid": os.getpid(), "replica_id": os.environ["MUSTER_REPLICA_ID"],
         "api": os.environ["MUSTER_API_ADDR"], "agent": os.environ["MUSTER_AGENT_ADDR"],
         "metrics": os.environ["MUSTER_METRICS_ADDR"]}
control.sendall(json.dumps(ready).encode() + b"\\n")
if step == "die":
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(1)
"""


def stand_in_config(tmp_path: Path) -> ServerConfig:
    """Two workers; the database and Redis URLs only pass validation (never dialled)."""
    config = ServerConfig(
        data_dir=tmp_path / "data",
        api_addr="127.0.0.1:0",
        agent_addr="127.0.0.1:0",
        metrics_addr="",
        database_url="postgresql+asyncpg://muster@127.0.0.1:1/unused",
        redis_url="redis://127.0.0.1:1/0",
        fanout_secret=FANOUT_SECRET,
        workers=2,
    )
    config.data_dir.mkdir()
    return config


def stand_in(tmp_path: Path, plan: dict[str, list[str]]) -> list[str]:
    """The command of a stand-in worker following ``plan`` (worker index: steps)."""
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return [sys.executable, str(script), json.dumps(plan), str(tmp_path)]


def started(tmp_path: Path, index: int) -> list[int]:
    """The pids of stand-in worker ``index``'s starts so far."""
    path = tmp_path / f"{index}.starts"
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


async def test_the_parent_restarts_dying_workers_counting_deaths_in_a_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stand-in worker processes (the parent's logic, without a database): worker 1 dies
    right after being ready, then before being ready, then after again; each restart
    waits the delay for one more death in a row; the healthy worker 0 is left alone; a
    stop reaches every worker and the parent reports 0."""
    config = stand_in_config(tmp_path)
    plan = {"1": ["die", "die-before-ready", "die"]}
    deaths: list[int] = []

    def delay(failures: int) -> float:
        deaths.append(failures)
        return 0.01

    supervisor = WorkerSupervisor(
        config,
        log_level="INFO",
        command=stand_in(tmp_path, plan),
        environ=procs.env(),
        delay=delay,
    )
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="muster.server.workers")
    running = asyncio.create_task(supervisor.run(stop))

    def starts(index: int) -> list[int]:
        return started(tmp_path, index)

    async def restarted() -> bool:
        return "worker 1 restarted" in caplog.text and len(starts(1)) == 4

    try:
        await until(restarted, 30, "worker 1 is ready on its fourth start")
        endpoints = json.loads(config.endpoints_file.read_text())
        assert [w["pid"] for w in endpoints["workers"]] == [starts(0)[0], starts(1)[3]]
    finally:
        stop.set()
        code = await asyncio.wait_for(running, 30)
    assert code == 0
    assert deaths == [1, 2, 3]
    assert len(starts(0)) == 1
    assert caplog.text.count("exited with code 3 unexpectedly") == 2
    assert caplog.text.count("exited with code 4 unexpectedly") == 1
    assert not config.endpoints_file.exists()
    assert not any(alive(pid) for pid in [*starts(0), *starts(1)])


async def test_a_stop_during_a_restart_delay_ends_the_wait_and_counts_only_live_workers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker 1 dies and waits out a long delay: a stop ends the wait at once, worker 1
    is not started again, and worker 0's clean exit makes the parent's code 0."""
    config = stand_in_config(tmp_path)
    supervisor = WorkerSupervisor(
        config,
        log_level="INFO",
        command=stand_in(tmp_path, {"1": ["die"]}),
        environ=procs.env(),
        delay=lambda _: 600.0,
    )
    stop = asyncio.Event()
    caplog.set_level(logging.INFO, logger="muster.server.workers")
    running = asyncio.create_task(supervisor.run(stop))

    async def waiting() -> bool:
        return "restarting it in 600.0s" in caplog.text

    try:
        await until(waiting, 30, "worker 1 died and waits for its restart")
    finally:
        stop.set()
        code = await asyncio.wait_for(running, 30)
    assert code == 0
    assert (len(started(tmp_path, 0)), len(started(tmp_path, 1))) == (1, 1)
    assert not alive(started(tmp_path, 0)[0])


def scrape(address: str) -> dict[str, float]:
    """``grpc_server_handled_total`` of one worker, per ``service/method``."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "grpc_server_handled_total":
                key = f"{sample.labels['grpc_service']}/{sample.labels['grpc_method']}"
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def until(predicate: Any, timeout: float, what: str) -> Any:
    """Poll ``predicate`` (async, returns a truthy value when done) for up to ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while not (value := await predicate()):
                await asyncio.sleep(0.3)
    except TimeoutError:
        raise AssertionError(f"not within {timeout}s: {what}") from None
    return value


@postgres_only
@pytest.mark.timeout(300)
async def test_two_workers_share_the_ports_survive_a_kill_and_drain_on_sigterm(
    tmp_path: Path,
) -> None:
    prefix = f"muster-test-{secrets.token_hex(6)}"
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    async with fresh_database() as url:
        environ = procs.env(
            MUSTER_DATABASE_URL=url,
            MUSTER_REDIS_URL=REDIS_URL,
            MUSTER_FANOUT_SECRET=FANOUT_SECRET,
            MUSTER_REDIS_PREFIX=prefix,
            MUSTER_REPLICA_ID="host",
            MUSTER_API_ADDR="127.0.0.1:0",
            MUSTER_AGENT_ADDR="127.0.0.1:0",
            MUSTER_METRICS_ADDR="127.0.0.1:0",
            **TIMINGS,
        )
        parent = await procs.spawn(
            "server", "--workers", "2", "--data-dir", str(data), cwd=tmp_path, log=log,
            environ=environ,
        )  # fmt: skip
        agents: list[asyncio.subprocess.Process] = []
        try:
            endpoints = await procs.wait_for_file(data / "endpoints.json", timeout=90)
            await _check_workers(parent.pid, endpoints, url)
            admin_config = procs.admin_config(data, endpoints)
            agents = await _start_agents(tmp_path, admin_config, endpoints["agent"], 4)
            async with AsyncAdminClient(admin_config) as admin:
                await _until_connected(admin, 4)

                # Many client connections through the one api port: the kernel gives
                # each worker some, and each worker counts its own Submits.
                first = await _submit(admin_config, 60, {"seconds": 0}, connections=24)
                await _until_succeeded(url, first)
                per_worker = [scrape(w["metrics"]) for w in endpoints["workers"]]
                submits = [m.get("muster.v1.TaskService/Submit", 0) for m in per_worker]
                assert all(n > 0 for n in submits) and sum(submits) == 60, submits

                # SIGKILL the worker holding the most agents while tasks are running.
                held = await _agents_per_replica(admin)
                print(f"Submits per worker: {submits}; agents per worker: {held}")
                victim = max(endpoints["workers"], key=lambda w: held.get(w["replica_id"], 0))
                orphans = {
                    agent.agent_id: agent.connected_at or datetime.max.replace(tzinfo=UTC)
                    for agent in await admin.list_agents()
                    if agent.connected and agent.replica == victim["replica_id"]
                }
                assert orphans, held
                second = await _submit(admin_config, 200, {"seconds": 0.2}, connections=4)
                os.kill(victim["pid"], signal.SIGKILL)

                async def restarted() -> dict[str, Any] | None:
                    now = await procs.wait_for_file(data / "endpoints.json")
                    pid = now["workers"][victim["index"]]["pid"]
                    return now if pid not in (None, victim["pid"]) else None

                after = await until(restarted, 60, "the parent restarts the killed worker")
                assert "restarting it in" in log.read_text()
                assert not alive(victim["pid"])
                await _until_succeeded(url, second, timeout=120)  # no accepted task lost

                async def reconnected() -> bool:
                    # The killed worker's agents hold new streams (its presence rows
                    # outlive it by a few seconds, so "connected" alone proves nothing).
                    now = {a.agent_id: a for a in await admin.list_agents()}
                    return all(
                        now[name].connected and (now[name].connected_at or since) > since
                        for name, since in orphans.items()
                    )

                await until(reconnected, 60, "the killed worker's agents reconnect")
                await _until_connected(admin, 4)
                third = await _submit(admin_config, 40, {"seconds": 0}, connections=8)
                await _until_succeeded(url, third)
                assert await _finishes(url, [*first, *second, *third]) == 300
        finally:
            # The parent first, its agents still connected: every worker drains them.
            code = await procs.stop(parent, timeout=60)
            for agent in agents:
                if agent.returncode is None:
                    await procs.stop(agent, timeout=20)
        assert code == 0, log.read_text()[-4000:]
        assert not (data / "endpoints.json").exists()
        for worker in after["workers"]:
            assert not alive(worker["pid"]), worker
        text = log.read_text()
        assert "worker 0 [" in text and "worker 1 [" in text  # each line says whose it is
        # One audit chain per worker, intact: the killed worker's went on after its restart.
        for worker in ("host-w0", "host-w1"):
            code, out, err = await procs.run(
                "audit", "verify", "--database-url", url, "--chain", worker, cwd=tmp_path
            )
            assert (code, out.startswith("OK: ")) == (0, True), (worker, out, err)
        await forget_redis(prefix)


@postgres_only
@pytest.mark.timeout(120)
async def test_workers_drain_and_exit_when_their_parent_dies(tmp_path: Path) -> None:
    """SIGKILL to the parent, which cannot forward anything: each worker sees its end of
    the socket pair close and shuts down by itself."""
    prefix = f"muster-test-{secrets.token_hex(6)}"
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    async with fresh_database() as url:
        parent = await procs.spawn(
            "server", "--workers", "2", "--data-dir", str(data), cwd=tmp_path, log=log,
            environ=procs.env(
                MUSTER_DATABASE_URL=url,
                MUSTER_REDIS_URL=REDIS_URL,
                MUSTER_FANOUT_SECRET=FANOUT_SECRET,
                MUSTER_REDIS_PREFIX=prefix,
                MUSTER_API_ADDR="127.0.0.1:0",
                MUSTER_AGENT_ADDR="127.0.0.1:0",
                MUSTER_METRICS_ADDR="",
                **TIMINGS,
            ),
        )  # fmt: skip
        try:
            endpoints = await procs.wait_for_file(data / "endpoints.json", timeout=90)
            pids = [w["pid"] for w in endpoints["workers"]]
            assert all(alive(pid) for pid in pids)
        finally:
            await procs.stop(parent, signal.SIGKILL)

        async def gone() -> bool:
            return not any(alive(pid) for pid in pids)

        await until(gone, 30, "both workers exit after their parent died")
        text = log.read_text()
        assert text.count("the --workers parent process is gone: shutting down") == 2, text
        assert text.count("muster.server.app: server stopped") == 2, text
        await forget_redis(prefix)


async def _check_workers(parent: int, endpoints: dict[str, Any], url: str) -> None:
    """Two worker processes of this parent, named apart, one api and agent port between
    them, and no setting (secrets included) on their command lines."""
    workers = endpoints["workers"]
    assert [w["index"] for w in workers] == [0, 1]
    assert [w["replica_id"] for w in workers] == ["host-w0", "host-w1"]
    pids = {w["pid"] for w in workers}
    assert len(pids) == 2 and parent not in pids
    assert len({w["metrics"] for w in workers}) == 2
    assert endpoints["pid"] == parent
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        assert f"PPid:\t{parent}\n" in status
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[-3:] == [b"muster", b"server", b""], argv
        command_line = b" ".join(argv)
        assert FANOUT_SECRET.encode() not in command_line
        assert url.encode() not in command_line


async def _start_agents(
    tmp: Path, admin_config: ClientConfig, agent_endpoint: str, count: int
) -> list[asyncio.subprocess.Process]:
    async with AsyncAdminClient(admin_config) as admin:
        _, token = await admin.create_bootstrap_token("default", max_uses=count)
    agents = []
    for i in range(count):
        name = f"agent-{i}"
        process = await procs.spawn(
            "agent",
            "--server", admin_config.address,
            "--ca-file", str(admin_config.ca_file),
            "--state-dir", str(tmp / name),
            "--name", name,
            "--agent-server", f"ipv4:{agent_endpoint}",
            "--tls-server-name", "localhost",
            "--concurrency", "8",
            cwd=tmp,
            log=tmp / f"{name}.log",
            environ=procs.env(MUSTER_BOOTSTRAP_TOKEN=token),
        )  # fmt: skip
        agents.append(process)
    return agents


async def _agents_per_replica(admin: AsyncAdminClient) -> dict[str, int]:
    held: dict[str, int] = {}
    for agent in await admin.list_agents():
        if agent.connected:
            held[agent.replica] = held.get(agent.replica, 0) + 1
    return held


async def _until_connected(admin: AsyncAdminClient, count: int) -> None:
    async def connected() -> bool:
        return sum((await _agents_per_replica(admin)).values()) >= count

    await until(connected, 60, f"{count} agents connected")


async def _submit(
    config: ClientConfig, count: int, payload: dict[str, float], *, connections: int
) -> list[str]:
    """Submit ``count`` sleep tasks over ``connections`` clients (a connection each)."""
    clients = [AsyncClient(config) for _ in range(connections)]
    try:
        tasks = await asyncio.gather(
            *(clients[i % connections].submit("sleep", payload) for i in range(count))
        )
    finally:
        for client in clients:
            await client.close()
    return [task.task_id for task in tasks]


async def _until_succeeded(url: str, ids: list[str], timeout: float = 60) -> None:
    engine = create_async_engine(url)
    try:

        async def done() -> bool:
            async with engine.connect() as conn:
                rows = await conn.execute(
                    select(func.count()).where(Task.task_id.in_(ids), Task.state == "SUCCEEDED")
                )
                return rows.scalar_one() == len(ids)

        await until(done, timeout, f"{len(ids)} tasks succeeded")
    finally:
        await engine.dispose()


async def _finishes(url: str, ids: list[str]) -> int:
    """How many tasks of ``ids`` have exactly one ``task.finish`` audit row."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(AuditEvent.target, func.count())
                .where(AuditEvent.action == "task.finish", AuditEvent.target.in_(ids))
                .group_by(AuditEvent.target)
            )
            return sum(1 for _, n in rows if n == 1)
    finally:
        await engine.dispose()
