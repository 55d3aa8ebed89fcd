"""CA rotation on running servers, over real TLS on loopback: the intermediate, then the
root in three steps, driven through the ``muster ca`` commands; what replicas, the
listeners, and connected and later agents see at each step."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from muster import AsyncAdminClient
from muster.cli import main
from muster.server.app import ServerHandle, start_server
from muster.server.audit.verify import verify
from muster.server.ca import CertificateAuthority
from muster.server.ca.crl import ca_id
from muster.server.ca.keystore import CertifiedKey, FileKeyStore
from muster.server.ca.rotation import import_directory
from muster.server.ca.signer import private_key_pem
from muster.server.ca.state import CARecord, CAState, authority_key_id, key_id
from muster.server.clock import ManualClock
from muster.server.dispatch.session import ROOT_ROTATED
from muster.server.storage import ca as ca_store
from muster.server.storage.database import Database
from muster.server.storage.migrate import ensure_schema
from muster.server.storage.models import Agent, AuditEvent, Certificate
from muster.server.storage.types import utcnow
from muster.v1 import agent_pb2, agent_pb2_grpc
from tests.agentsim import Enrolled, Enroller, SimAgent, make_csr
from tests.conftest import client_config, server_config
from tests.testca import TestCA

pytestmark = pytest.mark.slow


@dataclass(frozen=True, slots=True)
class Ran:
    code: int
    out: str
    err: str


async def muster_ca(server: ServerHandle, *argv: str) -> Ran:
    """``muster ca ARGV`` against ``server``'s data directory and database, run through the
    dispatcher in a thread (it runs its own event loop, as the command does)."""
    config = server.config
    args = ["ca", *argv, "--data-dir", str(config.data_dir)]
    if config.database_url:
        args += ["--database-url", config.database_url]

    def run() -> Ran:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(args)
        return Ran(code, out.getvalue(), err.getvalue())

    return await asyncio.to_thread(run)


async def rotated(server: ServerHandle, *argv: str) -> Ran:
    """A rotation that succeeds, then this replica's reload pass (the reaper's, done now)."""
    ran = await muster_ca(server, *argv)
    assert ran.code == 0, ran.err
    await server.ca_reloader.refresh()
    return ran


async def status(server: ServerHandle) -> dict[str, dict[str, object]]:
    ran = await muster_ca(server, "status", "--json")
    assert ran.code == 0, ran.err
    shown = json.loads(ran.out)
    return {"bundle": {"version": shown["bundle_version"]}} | {
        c["ca_id"]: c for c in shown["certificates"]
    }


def issuer_of(chain_pem: bytes) -> str:
    """The ca_id of the intermediate that follows the leaf in a chain."""
    return ca_id(x509.load_pem_x509_certificates(chain_pem)[1])


def roots_of(bundle_pem: bytes) -> list[str]:
    return sorted(ca_id(c) for c in x509.load_pem_x509_certificates(bundle_pem))


async def renew(enrolled: Enrolled) -> tuple[Enrolled, agent_pb2.RenewResponse]:
    """Renew over mTLS with ``enrolled``'s certificate."""
    csr, key_pem = make_csr()
    async with grpc.aio.secure_channel(enrolled.endpoint, enrolled.credentials()) as channel:
        response = await agent_pb2_grpc.AgentServiceStub(channel).Renew(
            agent_pb2.RenewRequest(csr_pem=csr), timeout=10
        )
    return replace(enrolled, key_pem=key_pem, chain_pem=response.certificate_chain_pem), response


async def connect(enrolled: Enrolled) -> tuple[SimAgent, agent_pb2.Welcome]:
    agent = SimAgent.of(enrolled)
    welcome = await agent.hello()
    agent.keep_alive()
    return agent, welcome


async def refused_at_handshake(enrolled: Enrolled) -> grpc.StatusCode:
    """The status of a Renew attempted with ``enrolled``'s certificate and bundle."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await renew(enrolled)
    return refused.value.code()


async def active(server: ServerHandle, role: str) -> str:
    async with server.db.transaction() as session:
        state = await ca_store.load(session)
    record = state.active_root if role == "root" else state.active_intermediate
    assert record is not None
    return record.ca_id


async def test_first_start_records_the_ca_directory_once(
    tmp_path: Path, backend: dict[str, object]
) -> None:
    """Two replicas importing at once: one records the directory's root and
    intermediate (bundle version 1) and assigns them the certificates issued before."""
    ca_dir = tmp_path / "ca"
    ca = CertificateAuthority.init(ca_dir, "muster.local")
    url = str(backend.get("database_url") or f"sqlite+aiosqlite:///{tmp_path / 'muster.db'}")
    first, second = Database(url, audit_chain="a"), Database(url, audit_chain="b")
    try:
        await ensure_schema(first, "yes")
        async with first.transaction() as session:
            now = utcnow()
            session.add(Agent(agent_id="old", pool="p", labels={}, token_id="t", enrolled_at=now))
            await session.flush()
            session.add(
                Certificate(
                    serial="ab", agent_id="old", public_key_fingerprint="k", token_id="t",
                    reason="enroll", chain_pem=b"", not_before=now,
                    not_after=now + timedelta(hours=1),
                )
            )  # fmt: skip

        async def importing(db: Database) -> object:
            async with db.transaction() as session:
                return await import_directory(session, ca_dir, actor="test")

        results = await asyncio.gather(importing(first), importing(second))
        assert sum(r is not None for r in results) == 1
        assert await importing(first) is None  # and never again
        async with first.transaction() as session:
            state = await ca_store.load(session)
            issuer = (await session.execute(select(Certificate.issuer_id))).scalar_one()
        assert [(r.role, r.state, r.bundle_version) for r in state.records] in (
            [("root", "active", 1), ("intermediate", "active", 1)],
            [("intermediate", "active", 1), ("root", "active", 1)],
        )
        assert issuer == ca.issuer_id == ca_id(ca.intermediate_certificate)
        assert state.active_root is not None and state.active_root.ca_id == ca_id(ca.roots[0])
    finally:
        await first.close()
        await second.close()


@pytest.fixture
async def pair(
    tmp_path: Path, backend: dict[str, object]
) -> AsyncIterator[tuple[ServerHandle, ServerHandle]]:
    """Two replicas of one database; b has its own copy of a's CA directory (not shared)."""
    CertificateAuthority.init(tmp_path / "a" / "ca", "muster.local")
    shutil.copytree(tmp_path / "a" / "ca", tmp_path / "b" / "ca")
    url = str(backend.get("database_url") or f"sqlite+aiosqlite:///{tmp_path / 'a' / 'muster.db'}")
    handles = []
    try:
        for name in ("a", "b"):
            config = server_config(tmp_path / name, database_url=url, replica_id=name)
            handles.append(await start_server(config))
        yield handles[0], handles[1]
    finally:
        await asyncio.gather(*(h.stop(grace=1.0) for h in handles))


async def test_a_replica_without_the_issuing_key_refuses_to_issue(
    pair: tuple[ServerHandle, ServerHandle],
) -> None:
    a, b = pair
    assert a.ca.issuer_id == b.ca.issuer_id and b.ca.bundle_version == 1  # one record
    await rotated(a, "rotate-intermediate")
    async with AsyncAdminClient(client_config(a)) as admin:
        on_a = await Enroller(a, admin).enroll("on-a")
        assert issuer_of(on_a.chain_pem) == a.ca.issuer_id == await active(a, "intermediate")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await Enroller(b, admin).enroll("on-b")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot use the key of the issuing intermediate" in (refused.value.details() or "")
    assert "shared volume" in (refused.value.details() or "")
    # b keeps serving: its certificate from the old intermediate is still valid and trusted.
    await b.ca_reloader.refresh()
    assert b.ca.cannot_issue is not None
    assert issuer_of(b.server_certificates.current.chain_pem) != a.ca.issuer_id
    agent, welcome = await connect(replace(on_a, endpoint=b.agent_endpoint))
    assert welcome.agent_id == "on-a"
    await agent.close()
    # Given the key (what a shared CA directory does), b issues from the new intermediate.
    shutil.copytree(a.config.ca_dir / "keys", b.config.ca_dir / "keys")
    await b.ca_reloader.refresh()
    assert b.ca.cannot_issue is None
    assert issuer_of(b.server_certificates.current.chain_pem) == a.ca.issuer_id
    async with AsyncAdminClient(client_config(a)) as admin:
        on_b = await Enroller(b, admin).enroll("on-b")
    assert issuer_of(on_b.chain_pem) == a.ca.issuer_id


async def test_the_reaper_pass_reloads_the_ca_by_itself(
    tmp_path: Path, backend: dict[str, object]
) -> None:
    """No request needed: the next pass after a rotation reloads, reissues the server
    certificate from the new intermediate and rewrites the bundle file."""
    clock = ManualClock()
    handle = await start_server(server_config(tmp_path / "data", **backend), clock=clock)
    try:
        await clock.wait_for_sleepers(2)  # the reaper and the server certificate's renewal
        first = handle.server_certificates.current
        ran = await muster_ca(handle, "rotate-intermediate")
        assert ran.code == 0, ran.err
        new = await active(handle, "intermediate")
        assert handle.ca.issuer_id != new  # nothing issued, no pass yet
        parked = clock.sleepers
        clock.advance(handle.config.poll_interval)
        await clock.wait_for_sleepers(parked)
        assert handle.ca.issuer_id == new
        current = handle.server_certificates.current
        assert current.serial != first.serial and issuer_of(current.chain_pem) == new
    finally:
        await handle.stop(grace=1.0)


async def test_a_new_intermediate_issues_at_once_and_the_old_one_stays_trusted(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    old = server.ca.issuer_id
    before = await enroller.enroll("before")
    renewing = await enroller.enroll("renewing")
    ran = await muster_ca(server, "rotate-intermediate")
    assert ran.code == 0, ran.err
    assert "issues from now on" in ran.out
    new = await active(server, "intermediate")
    assert new != old
    # Before this replica's reload pass: issuing follows the record at once.
    after = await enroller.enroll("after")
    assert issuer_of(after.chain_pem) == new
    renewed, response = await renew(renewing)
    assert issuer_of(renewed.chain_pem) == new
    assert response.trust_bundle_version == 1  # the roots did not change
    async with server.db.transaction() as session:
        recorded = dict(
            (await session.execute(select(Certificate.serial, Certificate.issuer_id))).all()
        )
    assert recorded[after.serial] == recorded[renewed.serial] == new
    assert recorded[before.serial] == old
    # A leaf of the old intermediate still connects; the server moves to the new one.
    agent, _ = await connect(before)
    await server.ca_reloader.refresh()
    assert issuer_of(server.server_certificates.current.chain_pem) == new
    shown = await status(server)
    assert (shown[new]["state"], shown[new]["leaves"]) == ("active", 2)
    assert (shown[old]["state"], shown[old]["leaves"]) == ("previous", 2)
    assert shown["bundle"]["version"] == 1
    await agent.close()
    await server.flush_audit()
    assert [e.target for e in await admin.query_audit(action="ca.rotate_intermediate")] == [new]


async def test_a_root_rotates_in_three_steps_under_live_agents(
    server: ServerHandle, enroller: Enroller, tmp_path: Path
) -> None:
    old_root = await active(server, "root")
    stays = await enroller.enroll("stays")  # connected through all three steps
    offline = await enroller.enroll("offline")  # away from --prepare to --activate
    stream, welcome = await connect(stays)
    assert (welcome.trust_bundle.version, roots_of(welcome.trust_bundle.roots_pem)) == (
        1,
        [old_root],
    )

    # --prepare: the bundle gains the new root; connected and new streams are given it.
    ran = await rotated(server, "rotate-root", "--prepare")
    assert "prepared root" in ran.out
    async with server.db.transaction() as session:
        state = await ca_store.load(session)
    prepared = state.having("root", "prepared")[0]
    new_root = prepared.ca_id
    pushed = await stream.expect("trust_bundle")
    assert (pushed.version, roots_of(pushed.roots_pem)) == (2, sorted([old_root, new_root]))
    assert roots_of((server.config.ca_dir / "bundle.pem").read_bytes()) == roots_of(
        pushed.roots_pem
    )
    later = await enroller.enroll("later")
    assert roots_of(later.bundle_pem) == roots_of(pushed.roots_pem)
    later_stream, later_welcome = await connect(later)
    assert later_welcome.trust_bundle.version == 2
    # The agent listener trusts either root: a certificate under the new one gets past
    # TLS (and is then refused as one this server never issued), a foreign one does not.
    minted = mint_under(server, state.children(new_root)[0], replace(later, agent_id="later"))
    assert await refused_at_handshake(minted) == grpc.StatusCode.PERMISSION_DENIED
    foreign = TestCA.new("muster.local").mint_agent("later")
    stranger = replace(later, key_pem=foreign.private_key_pem, chain_pem=foreign.chain_pem)
    assert await refused_at_handshake(stranger) == grpc.StatusCode.UNAVAILABLE

    # --activate: servers and, after a Renew, agents move to the new root.
    await rotated(server, "rotate-root", "--activate")
    assert await active(server, "root") == new_root
    assert chains_to(server.server_certificates.current.chain_pem, new_root, state)
    renew_asked = await stream.expect("renew")
    assert renew_asked.reason == ROOT_ROTATED
    moved, response = await renew(stays)
    assert issuer_of(moved.chain_pem) == await active(server, "intermediate")
    assert response.trust_bundle_version == 2
    assert roots_of(response.trust_bundle_pem) == sorted([old_root, new_root])
    # A peer that trusts only the new root reaches both listeners.
    only_new = tmp_path / "new-root.pem"
    only_new.write_bytes(prepared.pem)
    new_stream, new_welcome = await connect(replace(moved, bundle_pem=prepared.pem))
    assert new_welcome.agent_id == "stays"
    await stream.close()
    async with AsyncAdminClient(replace(client_config(server), ca_file=only_new)) as admin:
        assert {a.agent_id for a in await admin.list_agents()} >= {"stays", "offline"}
    # The agent that was offline still trusts only the old root and holds an old-root
    # certificate: it connects, gets the bundle in Welcome, and is asked to renew.
    back, back_welcome = await connect(offline)
    assert back_welcome.trust_bundle.version == 2
    assert (await back.expect("renew")).reason == ROOT_ROTATED

    # --retire: refused while an agent's newest live certificate is under the old root.
    refused = await muster_ca(server, "rotate-root", "--retire")
    assert refused.code == 2
    assert "later" in refused.err and "offline" in refused.err and "stays" not in refused.err
    assert (await status(server))["bundle"]["version"] == 2  # nothing changed
    for enrolled, agent in ((offline, back), (later, later_stream)):
        await renew(enrolled)
        await agent.close()
    await rotated(server, "rotate-root", "--retire")
    pushed = await new_stream.expect("trust_bundle")
    assert (pushed.version, roots_of(pushed.roots_pem)) == (3, [new_root])
    assert roots_of((server.config.ca_dir / "bundle.pem").read_bytes()) == [new_root]
    # A certificate under the old root, unexpired and unrevoked, no longer gets in.
    assert await refused_at_handshake(later) == grpc.StatusCode.UNAVAILABLE
    shown = await status(server)
    assert (shown[old_root]["state"], shown[new_root]["state"]) == ("retired", "active")
    assert shown["bundle"]["version"] == 3
    assert gauge(server.registry, "muster_trust_bundle_version") == 3
    await new_stream.close()
    await server.flush_audit()
    async with server.db.transaction() as session:
        actions = (
            await session.execute(select(AuditEvent.action).where(AuditEvent.action.like("ca.%")))
        ).scalars()
        assert set(actions) >= {
            "ca.import",
            "ca.prepare_root",
            "ca.activate_root",
            "ca.retire_root",
        }
    report = await verify(server.db)
    assert report.ok and any(c.chain.startswith("cli@") for c in report.chains)


async def test_retire_with_force_cuts_off_agents_still_on_the_old_root(
    server: ServerHandle, enroller: Enroller
) -> None:
    stuck = await enroller.enroll("stuck")
    await rotated(server, "rotate-root", "--prepare")
    await rotated(server, "rotate-root", "--activate")
    assert (await muster_ca(server, "rotate-root", "--retire")).code == 2
    ran = await rotated(server, "rotate-root", "--retire", "--force")
    assert "forced: 1 agent(s)" in ran.out
    stuck_now = replace(stuck, bundle_pem=(server.config.ca_dir / "bundle.pem").read_bytes())
    assert await refused_at_handshake(stuck_now) == grpc.StatusCode.UNAVAILABLE


async def test_the_commands_refuse_what_the_state_does_not_allow(server: ServerHandle) -> None:
    for argv, message in (
        (("rotate-root", "--activate"), "no prepared root"),
        (("rotate-root", "--retire"), "no previous root"),
        (("rotate-root", "--prepare", "--force"), "--force goes with --retire only"),
    ):
        ran = await muster_ca(server, *argv)
        assert (ran.code, ran.out) == (2, ""), argv
        assert message in ran.err
    await rotated(server, "rotate-root", "--prepare")
    again = await muster_ca(server, "rotate-root", "--prepare")
    assert again.code == 2 and "already prepared" in again.err
    assert (await muster_ca(server, "rotate-root")).code == 2  # a step is required
    shown = await muster_ca(server, "status")
    assert shown.code == 0
    lines = shown.out.splitlines()
    assert lines[0] == "trust bundle version 2"
    assert lines[1].split()[:4] == ["CA", "ID", "ROLE", "STATE"]
    assert sum(" prepared " in line for line in lines) == 3  # root, cross-signed, intermediate


async def test_status_without_a_database_says_so(tmp_path: Path) -> None:
    def run() -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["ca", "status", "--data-dir", str(tmp_path / "nothing")])
        return code, err.getvalue()

    code, err = await asyncio.to_thread(run)
    assert code == 2 and "no database at" in err


def mint_under(server: ServerHandle, record: CARecord, enrolled: Enrolled) -> Enrolled:
    """A certificate for ``enrolled``'s agent from a (prepared) intermediate, outside the
    server's records: what TLS alone makes of it."""
    signer = CertifiedKey(
        record.certificate, FileKeyStore(server.config.ca_dir).open(record.key_ref)
    )
    ca = CertificateAuthority(server.ca.trust_domain, signer=signer, roots=list(server.ca.roots))
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue_agent_certificate(key.public_key(), enrolled.agent_id)
    return replace(enrolled, key_pem=private_key_pem(key), chain_pem=issued.chain_pem)


def chains_to(chain_pem: bytes, root_id: str, state: CAState) -> bool:
    """Whether a server chain's leaf was issued by an intermediate under ``root_id``."""
    chain = x509.load_pem_x509_certificates(chain_pem)
    intermediate = state.get(ca_id(chain[1]))
    return (
        authority_key_id(chain[0]) == key_id(chain[1])
        and intermediate is not None
        and intermediate.parent_id == root_id
    )


def gauge(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    assert value is not None
    return value
