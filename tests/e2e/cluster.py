"""A cluster of real ``muster server`` replicas on one fresh Postgres database and one Redis
prefix, and real agents spread over them, for the end-to-end tests whose subject is several
replicas: failover, crashes, handover, budgets shared across replicas.

``async with replica_cluster(tmp_path) as cluster:`` starts replicas a and b (one CA, made
by ``ca init`` in a/ and copied to b/, or shared by b/ as one volume would be with
``shared_ca``) and stops whatever still runs on the way out;
``cluster.start(name)`` restarts one, ``start_agents(cluster, ...)`` enrolls agents that
know the replicas in the orders given.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from muster import AsyncAdminClient, ClientConfig
from tests.conftest import FANOUT_SECRET, REDIS_URL
from tests.e2e import procs
from tests.pg import fresh_database

TIMINGS = {
    "MUSTER_HEARTBEAT_INTERVAL": "1s",
    "MUSTER_LEASE_DURATION": "5s",
    "MUSTER_POLL_INTERVAL": "0.5s",
    "MUSTER_SHUTDOWN_GRACE": "2s",
}
"""Short enough that a lost agent or replica is noticed within seconds."""

EVERY_OTHER = (("a", "b"), ("b", "a"), ("a", "b"), ("b", "a"))
"""Four agents, two preferring replica a and two b, each failing over to the other."""


@dataclass
class Replica:
    """One running ``muster server`` process and the addresses it bound."""

    name: str
    data_dir: Path
    environ: dict[str, str]
    """The environment it was started with."""
    process: asyncio.subprocess.Process
    api: str
    agent: str
    metrics: str
    """host:port of /metrics; empty when the cluster runs without it."""
    log: Path

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "ca" / "bundle.pem"

    def client_config(self, token: str | None = None) -> ClientConfig:
        """Through this replica's API, as ``token`` or else as the first admin."""
        return ClientConfig(
            address=self.api,
            token=token or (self.data_dir / "admin.token").read_text().strip(),
            ca_file=self.ca_file,
        )


@dataclass
class Cluster:
    url: str
    """The database all replicas share."""
    tmp: Path
    """Data directories (tmp/NAME), logs and agent state live here."""
    environ: dict[str, dict[str, str]]
    """Replica name: the environment it starts with (ports aside on a same-port restart)."""
    replicas: list[Replica] = field(default_factory=list)
    """The latest process of each replica, in start order."""
    logs: list[Path] = field(default_factory=list)
    """Every replica's and agent's log, each once (a restart appends to its log)."""

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    async def start(self, name: str, *, same_ports: bool = False) -> Replica:
        """Start replica ``name``, or start it again once its process has ended, in its
        place in ``replicas``. ``same_ports``: bind the addresses the previous process had,
        as a planned restart does, so agents that know only those find it again."""
        previous = next((r for r in self.replicas if r.name == name), None)
        if previous is not None and previous.process.returncode is None:
            raise RuntimeError(f"replica {name} is still running")
        environ = dict(self.environ[name])
        if same_ports:
            if previous is None:
                raise ValueError(f"replica {name} never ran: it has no ports to reuse")
            environ["MUSTER_API_ADDR"] = previous.api
            environ["MUSTER_AGENT_ADDR"] = previous.agent
            if previous.metrics:
                environ["MUSTER_METRICS_ADDR"] = previous.metrics
        data = self.tmp / name
        (data / "endpoints.json").unlink(missing_ok=True)  # so the wait sees this start's
        log = self.tmp / f"{name}.log"
        process = await procs.spawn(
            "server", "--data-dir", str(data), cwd=self.tmp, log=log, environ=environ
        )
        try:
            endpoints = await procs.wait_for_file(data / "endpoints.json")
        except BaseException:
            await procs.stop(process, signal.SIGKILL)
            raise
        replica = Replica(
            name,
            data,
            environ,
            process,
            endpoints["api"],
            endpoints["agent"],
            endpoints.get("metrics") or "",
            log,
        )
        if previous is None:
            self.replicas.append(replica)
        else:
            self.replicas[self.replicas.index(previous)] = replica
        self.keep_log(log)
        return replica

    async def stop(self, timeout: float = 20) -> None:
        """SIGTERM every replica still running, all at once."""
        await asyncio.gather(*(procs.stop(r.process, timeout=timeout) for r in self.replicas))

    def keep_log(self, path: Path) -> None:
        """Add ``path`` to ``logs`` unless it is there already."""
        if path not in self.logs:
            self.logs.append(path)


@asynccontextmanager
async def replica_cluster(
    tmp: Path,
    *,
    names: Sequence[str] = ("a", "b"),
    metrics: bool = False,
    environ: Mapping[str, str] | None = None,
    shared_ca: bool = False,
) -> AsyncIterator[Cluster]:
    """Replicas ``names`` on a fresh database and a Redis prefix of their own, /metrics on
    loopback if ``metrics``, the ``TIMINGS`` with ``environ`` over them; all stopped and the
    database dropped on exit. ``shared_ca``: every replica's ``ca/`` is the first one's
    (a symlink), as CA rotation with file keys needs."""
    prefix = f"muster-test-{secrets.token_hex(6)}"
    async with fresh_database() as url:
        first = names[0]
        code, _, err = await procs.run("ca", "init", "--data-dir", str(tmp / first), cwd=tmp)
        assert code == 0, err
        for name in names[1:]:
            if shared_ca:
                (tmp / name).mkdir(mode=0o700)
                (tmp / name / "ca").symlink_to(tmp / first / "ca", target_is_directory=True)
            else:
                shutil.copytree(tmp / first / "ca", tmp / name / "ca")
        cluster = Cluster(
            url,
            tmp,
            {
                name: procs.env(
                    MUSTER_DATABASE_URL=url,
                    MUSTER_REDIS_URL=REDIS_URL,
                    MUSTER_FANOUT_SECRET=FANOUT_SECRET,
                    MUSTER_REDIS_PREFIX=prefix,
                    MUSTER_REPLICA_ID=name,
                    MUSTER_API_ADDR="127.0.0.1:0",
                    MUSTER_AGENT_ADDR="127.0.0.1:0",
                    MUSTER_METRICS_ADDR="127.0.0.1:0" if metrics else "",
                    **TIMINGS,
                    **(environ or {}),
                )
                for name in names
            },
        )
        try:
            for name in names:
                await cluster.start(name)
            yield cluster
        finally:
            await cluster.stop()


@dataclass
class AgentProcess:
    """One running ``muster agent`` process."""

    name: str
    process: asyncio.subprocess.Process
    log: Path


async def start_agents(
    cluster: Cluster,
    orders: Sequence[Sequence[str]] = EVERY_OTHER,
    *,
    enroll_through: str = "a",
    concurrency: int = 8,
    names: Sequence[str] | None = None,
    args: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> list[AgentProcess]:
    """One agent per entry of ``orders``, which names the replicas it knows, in the order it
    tries them. All enroll through ``enroll_through`` with one bootstrap token, are called
    ``names`` (default agent-0, agent-1, ...), get ``args`` after the common ones and
    ``environ`` on top of a clean environment; state and log under ``cluster.tmp``."""
    names = list(names) if names is not None else [f"agent-{i}" for i in range(len(orders))]
    assert len(names) == len(orders), (names, orders)
    enroll = cluster.replica(enroll_through)
    async with AsyncAdminClient(enroll.client_config()) as admin:
        _, token = await admin.create_bootstrap_token("default", max_uses=len(orders))
    agents = []
    for name, order in zip(names, orders, strict=True):
        targets = ",".join(cluster.replica(r).agent for r in order)
        log = cluster.tmp / f"{name}.log"
        cluster.keep_log(log)
        process = await procs.spawn(
            "agent",
            "--server", enroll.api,
            "--ca-file", str(enroll.ca_file),
            "--state-dir", str(cluster.tmp / name),
            "--name", name,
            "--agent-server", f"ipv4:{targets}",
            "--tls-server-name", "localhost",
            "--concurrency", str(concurrency),
            *args,
            cwd=cluster.tmp,
            log=log,
            environ=procs.env(MUSTER_BOOTSTRAP_TOKEN=token, **(environ or {})),
        )  # fmt: skip
        agents.append(AgentProcess(name, process, log))
    return agents


async def stop_agents(
    agents: Sequence[AgentProcess], sig: int = signal.SIGTERM, timeout: float = 20
) -> None:
    """Send ``sig`` to every agent still running, all at once, and wait for them to end."""
    await asyncio.gather(
        *(procs.stop(a.process, sig, timeout) for a in agents if a.process.returncode is None)
    )


async def connected_per_replica(cluster: Cluster) -> list[int]:
    """How many agents each replica holds a live stream of, as the cluster-wide presence
    says (asked of a replica that is up). ``Agent.connected`` is cluster-wide: the replica
    holding the stream is ``Agent.replica``."""
    live = next(r for r in cluster.replicas if r.process.returncode is None)
    async with AsyncAdminClient(live.client_config()) as admin:
        agents = await admin.list_agents()
    return [sum(1 for a in agents if a.connected and a.replica == r.name) for r in cluster.replicas]


async def until_connected(cluster: Cluster, count: int, timeout: float = 60) -> list[int]:
    """Wait until ``count`` agents are connected in all: how many each replica holds."""
    async with asyncio.timeout(timeout):
        while sum(counts := await connected_per_replica(cluster)) < count:
            await asyncio.sleep(0.3)
    return counts
