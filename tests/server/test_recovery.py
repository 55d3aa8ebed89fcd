"""Recovering agents: removal, re-enrollment tokens bound to one agent id, and enabling
an agent that could not connect anyway."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from muster import AsyncAdminClient
from muster.agent import keys
from muster.agent.state import Identity, StateDir
from muster.errors import ConfigError, InvalidArgumentError, MusterError, NotFoundError
from muster.files import write_atomic
from muster.server.app import ServerHandle
from muster.v1 import enrollment_pb2, enrollment_pb2_grpc
from tests.agent.conftest import AGENT_ID, seed_state
from tests.agentsim import Enrolled, Enroller, SimAgent, make_csr
from tests.testca import TestCA

pytestmark = pytest.mark.slow


async def enroll_raw(
    enroller: Enroller,
    token: str,
    name: str = "",
    csr: bytes | None = None,
    pool: str = "",
    labels: dict[str, str] | None = None,
) -> enrollment_pb2.EnrollResponse:
    async with enroller.api_channel() as channel:
        return await enrollment_pb2_grpc.EnrollmentServiceStub(channel).Enroll(
            enrollment_pb2.EnrollRequest(
                token=token, csr_pem=csr or make_csr()[0], name=name, pool=pool, labels=labels
            ),
            timeout=10,
        )


async def reenroll(enroller: Enroller, agent_id: str, token: str) -> Enrolled:
    csr, key_pem = make_csr()
    response = await enroll_raw(enroller, token, csr=csr)
    assert response.agent_id == agent_id
    return Enrolled(
        agent_id, key_pem, response.certificate_chain_pem, response.trust_bundle_pem,
        response.agent_endpoint,
    )  # fmt: skip


async def test_removing_an_agent_revokes_closes_and_keeps_the_id_taken(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    enrolled = await enroller.enroll("retiree", labels={"zone": "a"})
    agent = SimAgent.of(enrolled)
    try:
        await agent.hello()
        serials = await admin.remove_agent("retiree", reason="host decommissioned")
        assert serials == [enrolled.serial]
        assert await agent.status() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await agent.close()
    record = await admin.get_agent("retiree")
    assert (record.removed, record.enabled) == (True, False)
    assert record.removed_at is not None and all(c.revoked for c in record.certificates)
    assert await admin.remove_agent("retiree") == []  # removing again changes nothing
    # An ordinary token cannot take the id over.
    with pytest.raises(grpc.aio.AioRpcError) as taken:
        await enroll_raw(enroller, await enroller.token(), name="retiree")
    assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "--reenroll retiree" in (taken.value.details() or "")
    with pytest.raises(NotFoundError):
        await admin.remove_agent("nobody")
    await server.flush_audit()
    (row,) = await admin.query_audit(action="agent.remove")
    assert row.target == "retiree"
    assert json.loads(row.details) == {
        "serials": [enrolled.serial],
        "reason": "host decommissioned",
        "tokens_deleted": [],
    }


async def test_removal_voids_reenrollment_tokens_made_before_it(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    await enroller.enroll("undone")
    early, secret = await admin.create_bootstrap_token("", reenroll="undone")
    await admin.remove_agent("undone")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await enroll_raw(enroller, secret)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await admin.get_agent("undone")).removed
    await server.flush_audit()
    (row,) = await admin.query_audit(action="agent.remove")
    assert json.loads(row.details)["tokens_deleted"] == [early.token_id]
    # One made after the removal is the explicit way back.
    _, later = await admin.create_bootstrap_token("", reenroll="undone")
    await reenroll(enroller, "undone", later)


async def test_a_reenrollment_token_brings_a_removed_agent_back_as_itself(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    old = await enroller.enroll("phoenix", pool="builds", labels={"zone": "b"})
    await admin.remove_agent("phoenix")
    token, secret = await admin.create_bootstrap_token("", reenroll="phoenix")
    assert (token.reenroll_agent_id, token.pool, dict(token.labels)) == (
        "phoenix",
        "builds",
        {"zone": "b"},
    )
    assert (token.max_uses, token.name_pattern) == (1, "phoenix")
    assert secret not in json.dumps([e.details for e in await admin.query_audit()])

    new = await reenroll(enroller, "phoenix", secret)
    assert new.serial != old.serial
    record = await admin.get_agent("phoenix")
    assert (record.removed, record.enabled, record.pool) == (False, True, "builds")
    assert record.token_id == token.token_id
    live = [c for c in record.certificates if not c.revoked]
    assert [(c.serial, c.reason) for c in live] == [(new.serial, "reenroll")]
    agent = SimAgent.of(new)
    try:
        welcome = await agent.hello()
        assert (welcome.agent_id, dict(welcome.labels)) == ("phoenix", {"zone": "b"})
    finally:
        await agent.close()
    # Single use: a second redemption (another key) is refused like any used-up token.
    with pytest.raises(grpc.aio.AioRpcError) as used:
        await enroll_raw(enroller, secret)
    assert used.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await server.flush_audit()
    (row,) = await admin.query_audit(action="agent.reenroll")
    assert row.target == "phoenix" and row.actor == f"bootstrap:{token.token_id}"
    details = json.loads(row.details)
    assert (details["was_removed"], details["was_enabled"], details["revoked"]) == (
        True,
        False,
        [],
    )
    issued = [
        json.loads(e.details)["reason"]
        for e in await admin.query_audit(action="cert.issue")
        if e.target == new.serial
    ]
    assert issued == ["reenroll"]


async def test_a_retried_reenrollment_with_the_same_key_returns_the_same_certificate(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    await enroller.enroll("retrying")
    await admin.revoke_agent("retrying")
    _, secret = await admin.create_bootstrap_token("", reenroll="retrying")
    csr, _ = make_csr()
    first = await enroll_raw(enroller, secret, csr=csr)
    again = await enroll_raw(enroller, secret, csr=csr)
    assert again.certificate_chain_pem == first.certificate_chain_pem


async def test_reenrolling_a_live_agent_revokes_its_old_certificates_and_streams(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    """A host rebuilt with its state lost: the old credentials (maybe copied) stop working."""
    old = await enroller.enroll("rebuilt")
    agent = SimAgent.of(old)
    try:
        await agent.hello()
        _, secret = await admin.create_bootstrap_token("", reenroll="rebuilt")
        await reenroll(enroller, "rebuilt", secret)
        # The database poll closes the old stream within poll_interval.
        status = await asyncio.wait_for(agent.status(), 10)
        assert status == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await agent.close()
    record = await admin.get_agent("rebuilt")
    assert [c.revoked for c in record.certificates if c.serial == old.serial] == [True]


async def test_a_reenrollment_token_enrolls_only_its_agent_and_scope(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    await enroller.enroll("bound", labels={"zone": "a"})
    _, secret = await admin.create_bootstrap_token("", reenroll="bound")
    refusals = [
        ({"name": "someone-else"}, grpc.StatusCode.PERMISSION_DENIED),
        ({"pool": "elsewhere"}, grpc.StatusCode.PERMISSION_DENIED),
        ({"labels": {"zone": "b"}}, grpc.StatusCode.PERMISSION_DENIED),
        ({"labels": {"extra": "yes"}}, grpc.StatusCode.PERMISSION_DENIED),
        ({"csr": b"not a csr"}, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for fields, code in refusals:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await enroll_raw(enroller, secret, **fields)  # type: ignore[arg-type]
        assert refused.value.code() == code, fields
    # None of that spent the token.
    await reenroll(enroller, "bound", secret)


async def test_reenrollment_tokens_are_checked_when_made(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    await enroller.enroll("checked", pool="builds", labels={"zone": "a"})
    with pytest.raises(NotFoundError):
        await admin.create_bootstrap_token("", reenroll="nobody")
    for kwargs in (
        {"pool": "other"},
        {"pool": "builds", "labels": {"zone": "b"}},
        {"pool": "", "max_uses": 2},
        {"pool": "", "name_pattern": "*"},
    ):
        pool = str(kwargs.pop("pool"))
        with pytest.raises(InvalidArgumentError):
            await admin.create_bootstrap_token(pool, reenroll="checked", **kwargs)
    # Equal values are fine.
    token, _ = await admin.create_bootstrap_token(
        "builds", labels={"zone": "a"}, reenroll="checked"
    )
    assert token.reenroll_agent_id == "checked"
    assert len(await admin.list_bootstrap_tokens()) == 2  # the enrollment's and this one


async def test_enabling_an_agent_that_cannot_connect_says_so(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    await enroller.enroll("revoked-one")
    await admin.set_agent_enabled("revoked-one", False)
    await admin.revoke_agent("revoked-one")
    with pytest.raises(MusterError, match="--reenroll revoked-one") as refused:
        await admin.set_agent_enabled("revoked-one", True)
    assert "revoked" in str(refused.value)
    assert (await admin.get_agent("revoked-one")).enabled is False  # nothing changed

    await enroller.enroll("removed-one")
    await admin.remove_agent("removed-one")
    with pytest.raises(MusterError, match="was removed"):
        await admin.set_agent_enabled("removed-one", True)

    await enroller.enroll("fine")
    await admin.set_agent_enabled("fine", False)
    assert (await admin.set_agent_enabled("fine", True)).enabled is True


# The agent's side of a re-enrollment: its state dir never holds a mix of old and new.


def test_the_agent_keeps_its_old_credentials_until_the_new_ones_are_complete(
    tmp_path: Path,
) -> None:
    ca = TestCA.new("example.org")
    state = seed_state(tmp_path / "state", ca, "127.0.0.1:7444")
    before = state.load_credentials()
    key = state.reenrollment_key()
    assert state.reenroll_key_path.stat().st_mode & 0o777 == 0o600
    assert state.load_credentials() == before  # the new key waits beside the old one
    again = state.reenrollment_key()  # a retry (lost answer) sends the same public key
    assert keys.public_key_der(again.public_key()) == keys.public_key_der(key.public_key())

    issued = ca.ca.issue_agent_certificate(key.public_key(), AGENT_ID)
    identity = Identity(AGENT_ID, str(issued.spiffe_id), "127.0.0.1:7445", "default", {})
    # A certificate for another key is refused and changes nothing.
    other = ca.ca.issue_agent_certificate(keys.generate_key().public_key(), AGENT_ID)
    with pytest.raises(ConfigError):
        state.save_reenrollment(other.chain_pem, ca.bundle_pem, identity)
    assert state.load_credentials() == before

    creds = state.save_reenrollment(issued.chain_pem, ca.bundle_pem, identity)
    assert keys.cert_matches_key(creds.chain_pem, key)
    assert state.load_credentials() == creds
    assert state.load_identity().agent_endpoint == "127.0.0.1:7445"
    assert state.key_path.stat().st_mode & 0o777 == 0o600
    assert not state.reenroll_key_path.exists()
    assert not list(state.path.glob("*.next"))


def test_a_reenrollment_cut_short_by_a_crash_is_rolled_forward_or_dropped(
    tmp_path: Path,
) -> None:
    ca = TestCA.new("example.org")
    state = seed_state(tmp_path / "state", ca, "127.0.0.1:7444")
    before = (state.load_credentials(), state.load_identity())
    key = state.reenrollment_key()
    issued = ca.ca.issue_agent_certificate(key.public_key(), AGENT_ID)
    identity = Identity(AGENT_ID, str(issued.spiffe_id), "127.0.0.1:9999", "default", {})
    staged = {
        state.key_path: keys.key_to_pem(key),
        state.bundle_path: ca.bundle_pem,
        state.identity_path: identity.to_json(),
    }
    for path, data in staged.items():
        write_atomic(path.with_name(path.name + ".next"), data)
    # Crashed before the certificate was staged: the old identity stays whole.
    StateDir(state.path).ensure()
    assert (state.load_credentials(), state.load_identity()) == before
    for path, data in staged.items():
        write_atomic(path.with_name(path.name + ".next"), data)
    write_atomic(state.chain_path.with_name("agent.pem.next"), issued.chain_pem)
    state.identity_path.with_name("identity.json.next").replace(state.identity_path)
    # Crashed mid-commit: everything staged is rolled forward together.
    StateDir(state.path).ensure()
    assert keys.cert_matches_key(state.load_credentials().chain_pem, key)
    assert state.load_identity().agent_endpoint == "127.0.0.1:9999"
