"""CA rotation with real processes: two ``muster server`` replicas sharing one CA directory,
real ``muster agent`` processes, tasks submitted without pause, and the operator's
``muster ca`` commands run as a subprocess, as on a real host.

Root rotation: ``rotate-root --prepare`` (agents are pushed a bundle with both roots),
``--activate`` (agents are told to renew and end up under the new root), ``--retire``
(refused while the agent that was offline during --prepare still depends on the old
root; once it is back and renewed, the old root is dropped everywhere). No task fails.
Intermediate rotation: agents keep running tasks; their next certificates, and the
servers', come from the new intermediate."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from muster import AsyncClient, TaskState
from muster.v1 import agent_pb2, agent_pb2_grpc
from tests.conftest import BACKEND
from tests.e2e import procs
from tests.e2e.cluster import (
    Cluster,
    Replica,
    replica_cluster,
    start_agents,
    stop_agents,
    until_connected,
)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(BACKEND != "postgres", reason="runs in the Postgres pass (make test)"),
]

ORDERS = (("a", "b"), ("b", "a"), ("a", "b"))
"""Three agents over the two replicas."""
OFFLINE = 2
"""The agent stopped before --prepare and started again between --activate and --retire."""
WAIT = 30.0
"""How long any one step of a rotation may take to reach every agent."""


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with replica_cluster(tmp_path, shared_ca=True) as cluster:
        yield cluster


# Certificates ---------------------------------------------------------------


def certificates(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def ca_id(certificate: x509.Certificate) -> str:
    """As ``ca_certificates.ca_id``: the first 16 hex digits of the DER's SHA-256."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()[:16]


def issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def chain(agent: str, cluster: Cluster) -> list[x509.Certificate]:
    """The agent's certificate and the intermediate that issued it, as it holds them."""
    return certificates((cluster.tmp / agent / "agent.pem").read_bytes())


def chains_to(root: x509.Certificate, agent: str, cluster: Cluster) -> bool:
    leaf, intermediate, *_ = chain(agent, cluster)
    return issued_by(leaf, intermediate) and issued_by(intermediate, root)


def bundle_of(agent: str, cluster: Cluster) -> set[str]:
    """ca_ids of the roots in the agent's bundle.pem."""
    return {ca_id(c) for c in certificates((cluster.tmp / agent / "bundle.pem").read_bytes())}


def streams_opened(agent: str, cluster: Cluster) -> int:
    """How many streams the agent has had welcomed, as its log says."""
    return (cluster.tmp / f"{agent}.log").read_text(errors="replace").count(": connected to ")


def aki(certificate: x509.Certificate) -> bytes | None:
    ext = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    return ext.value.key_identifier


def ski(certificate: x509.Certificate) -> bytes:
    return certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


async def served_certificate(replica: Replica) -> x509.Certificate:
    """The certificate a new connection to the replica's API listener is served."""
    host, port = replica.api.rsplit(":", 1)
    pem = await asyncio.to_thread(ssl.get_server_certificate, (host, int(port)))
    return x509.load_pem_x509_certificate(pem.encode())


# The operator's commands ----------------------------------------------------


async def muster_ca(cluster: Cluster, *args: str) -> tuple[int, str, str]:
    """``muster ca ARGS`` on replica a's host: its data dir, database and settings."""
    a = cluster.replica("a")
    return await procs.run(
        "ca", *args, "--data-dir", str(a.data_dir), cwd=cluster.tmp, environ=a.environ
    )


async def ca_ok(cluster: Cluster, *args: str) -> str:
    code, out, err = await muster_ca(cluster, *args)
    assert code == 0, f"muster ca {' '.join(args)}: exit {code}\n{out}\n{err}"
    return out


async def ca_status(cluster: Cluster) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(await ca_ok(cluster, "status", "--json"))
    return status


def records(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``muster ca status --json``'s certificates by ca_id."""
    return {r["ca_id"]: r for r in status["certificates"]}


async def admin_cli(cluster: Cluster, *args: str) -> str:
    """``muster ARGS`` as the first admin, through replica a's API."""
    a = cluster.replica("a")
    environ = procs.env(
        MUSTER_ADDR=a.api,
        MUSTER_TOKEN_FILE=str(a.data_dir / "admin.token"),
        MUSTER_CA_FILE=str(a.ca_file),
    )
    code, out, err = await procs.run(*args, cwd=cluster.tmp, environ=environ)
    assert code == 0, f"muster {' '.join(args)}: exit {code}\n{out}\n{err}"
    return out


# Waiting and load -----------------------------------------------------------


async def until(what: str, predicate: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` after WAIT seconds."""
    try:
        async with asyncio.timeout(WAIT):
            while True:
                result = predicate()
                if await result if isinstance(result, Awaitable) else result:
                    return
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"not within {WAIT:g}s: {what}") from None


@dataclass
class Load:
    """Tasks submitted back to back through every replica, a few at a time, each waited for
    to its end. Every task gets a client of its own, made with the CA file as it is at that
    moment, as a CLI or SDK user's would be."""

    replicas: list[Replica]
    workers: int = 4
    phase: str = "before"
    submitted: Counter[str] = field(default_factory=Counter)
    """Tasks submitted in each phase."""
    states: Counter[str] = field(default_factory=Counter)
    retried: int = 0
    """Tasks that needed more than one attempt (and still succeeded)."""
    failures: list[str] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        await asyncio.gather(*(self._worker(i) for i in range(self.workers)))

    async def _worker(self, n: int) -> None:
        while not self.stopping.is_set():
            replica = self.replicas[n % len(self.replicas)]
            n += 1
            async with AsyncClient(replica.client_config()) as client:
                task = await client.submit("sleep", {"seconds": 0.1})
                self.submitted[self.phase] += 1
                done = await client.wait(task.task_id, timeout=60)
            self.states[done.state.name] += 1
            self.retried += done.attempt > 1
            if done.state is not TaskState.SUCCEEDED:
                self.failures.append(f"{done.task_id}: {done.state.name} {done.error}")

    @property
    def finished(self) -> int:
        return sum(self.states.values())

    @property
    def total(self) -> int:
        return sum(self.submitted.values())


@dataclass
class Running:
    load: Load
    task: asyncio.Task[None]

    async def until_more(self, count: int = 10) -> None:
        """Until ``count`` more tasks have finished: work goes on (a submit or wait that
        failed, say because TLS did, ends the load and is raised here)."""
        target = self.load.finished + count

        def done() -> bool:
            if self.task.done():
                self.task.result()
                raise AssertionError("the load stopped")
            return self.load.finished >= target

        await until(f"{count} more tasks finished", done)

    async def stop(self) -> Load:
        self.load.stopping.set()
        await self.task
        return self.load


def start_load(cluster: Cluster) -> Running:
    load = Load(cluster.replicas)
    return Running(load, asyncio.create_task(load.run(), name="load"))


async def listener_answer(
    replica: Replica, key_pem: bytes, chain_pem: bytes, roots_pem: bytes
) -> grpc.StatusCode:
    """What the replica's agent listener answers a Renew (with no CSR) from this identity:
    UNAVAILABLE when the TLS handshake refuses the certificate, another code when the
    listener took it and the service answered."""
    creds = grpc.ssl_channel_credentials(roots_pem, key_pem, chain_pem)
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(replica.agent, creds, options=options) as channel:
        try:
            await agent_pb2_grpc.AgentServiceStub(channel).Renew(
                agent_pb2.RenewRequest(csr_pem=b""), timeout=5
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def report(name: str, agents: int, load: Load, started: float) -> None:
    print(
        f"\n{name}: {agents} agents, {load.total} tasks run during rotation "
        f"({dict(load.submitted)}), {len(load.failures)} failures, {load.retried} retried, "
        f"wall time {time.monotonic() - started:.1f}s"
    )


# The tests --------------------------------------------------------------------


async def test_root_rotation_with_live_agents_and_one_offline_loses_no_task(
    cluster: Cluster,
) -> None:
    started = time.monotonic()
    ca_dir = cluster.replica("a").data_dir / "ca"
    (old_root,) = certificates((ca_dir / "bundle.pem").read_bytes())
    old = ca_id(old_root)
    agents = await start_agents(cluster, ORDERS, concurrency=4)
    names = [a.name for a in agents]
    online = [n for i, n in enumerate(names) if i != OFFLINE]
    offline = names[OFFLINE]
    running = start_load(cluster)
    try:
        await until_connected(cluster, len(agents))
        await running.until_more()
        # An identity under the old root, kept to knock on the listener after --retire.
        old_key = (cluster.tmp / online[0] / "agent.key").read_bytes()
        old_chain = (cluster.tmp / online[0] / "agent.pem").read_bytes()
        assert await procs.stop(agents[OFFLINE].process) == 0

        running.load.phase = "prepare"
        await ca_ok(cluster, "rotate-root", "--prepare")
        roots = certificates((ca_dir / "bundle.pem").read_bytes())
        (new_root,) = [r for r in roots if ca_id(r) != old]
        new = ca_id(new_root)
        await until(
            "the bundle with both roots pushed to the connected agents",
            lambda: all(bundle_of(n, cluster) == {old, new} for n in online),
        )
        assert bundle_of(offline, cluster) == {old}
        await running.until_more()

        running.load.phase = "activate"
        await ca_ok(cluster, "rotate-root", "--activate")
        await until(
            "connected agents renewed under the new root",
            lambda: all(chains_to(new_root, n, cluster) for n in online),
        )
        await until_connected(cluster, len(online))
        await running.until_more()
        # The offline agent's certificate still depends on the old root.
        code, out, err = await muster_ca(cluster, "rotate-root", "--retire")
        assert code == 2 and offline in out + err, (code, out, err)

        # It comes back under the old root, is given the bundle and renews.
        (agents[OFFLINE],) = await start_agents(cluster, [ORDERS[OFFLINE]], names=[offline])
        await until(
            "the offline agent back and renewed under the new root",
            lambda: (
                chains_to(new_root, offline, cluster) and bundle_of(offline, cluster) == {old, new}
            ),
        )
        await until_connected(cluster, len(agents))
        await running.until_more()
        for replica in cluster.replicas:  # the old root still opens the listener
            answer = await listener_answer(replica, old_key, old_chain, pem(new_root))
            assert answer != grpc.StatusCode.UNAVAILABLE, replica.name

        running.load.phase = "retire"
        await ca_ok(cluster, "rotate-root", "--retire")
        await until(
            "every agent's bundle without the old root",
            lambda: all(bundle_of(n, cluster) == {new} for n in names),
        )
        for replica in cluster.replicas:

            async def refuses_old(r: Replica = replica) -> bool:
                answer = await listener_answer(r, old_key, old_chain, pem(new_root))
                return answer == grpc.StatusCode.UNAVAILABLE

            await until(
                f"replica {replica.name} refusing a certificate under the old root", refuses_old
            )
        await running.until_more()
    finally:
        try:
            load = await running.stop()
        finally:
            await stop_agents(agents)

    assert load.failures == [] and set(load.states) == {"SUCCEEDED"}, load.failures
    assert all(chains_to(new_root, n, cluster) for n in names)
    status = records(await ca_status(cluster))
    assert status[old]["state"] == "retired"
    assert status[new]["state"] == "active"
    report("root rotation", len(agents), load, started)


async def test_intermediate_rotation_keeps_agents_working_and_issues_from_the_new_one(
    cluster: Cluster,
) -> None:
    started = time.monotonic()
    agents = await start_agents(cluster, ORDERS, concurrency=4)
    names = [a.name for a in agents]
    running = start_load(cluster)
    try:
        await until_connected(cluster, len(agents))
        await running.until_more()
        old_intermediate = chain(names[0], cluster)[1]
        bundles = {n: bundle_of(n, cluster) for n in names}
        streams = {n: streams_opened(n, cluster) for n in names}

        running.load.phase = "rotate-intermediate"
        await ca_ok(cluster, "rotate-intermediate")
        status = records(await ca_status(cluster))
        (new,) = [
            i for i, r in status.items() if r["role"] == "intermediate" and r["state"] == "active"
        ]
        assert status[ca_id(old_intermediate)]["state"] == "previous"
        await running.until_more()
        # Agents notice nothing: the same streams and bundle, and work goes on.
        assert {n: streams_opened(n, cluster) for n in names} == streams

        running.load.phase = "agents rotate"
        await admin_cli(cluster, "agents", "rotate", "--all")
        await until(
            "every agent's next certificate from the new intermediate",
            lambda: all(ca_id(chain(n, cluster)[1]) == new for n in names),
        )
        new_intermediate = chain(names[0], cluster)[1]
        for replica in cluster.replicas:

            async def serves_new(r: Replica = replica) -> bool:
                return aki(await served_certificate(r)) == ski(new_intermediate)

            await until(f"replica {replica.name} serving a certificate from it", serves_new)
        await until_connected(cluster, len(agents))
        await running.until_more()
    finally:
        try:
            load = await running.stop()
        finally:
            await stop_agents(agents)

    assert load.failures == [] and set(load.states) == {"SUCCEEDED"}, load.failures
    assert {n: bundle_of(n, cluster) for n in names} == bundles
    status = records(await ca_status(cluster))
    assert status[new]["state"] == "active"
    assert status[new]["leaves"] >= len(agents)
    report("intermediate rotation", len(agents), load, started)
