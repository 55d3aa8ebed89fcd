"""Enrollment: bootstrap tokens and CSRs through the real EnrollmentService over TLS."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from muster import AsyncAdminClient
from muster.server.app import ServerHandle
from muster.v1 import enrollment_pb2, enrollment_pb2_grpc
from tests.agentsim import Enroller, make_csr


async def enroll_raw(enroller: Enroller, **fields: object) -> enrollment_pb2.EnrollResponse:
    async with enroller.api_channel() as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        return await stub.Enroll(enrollment_pb2.EnrollRequest(**fields))  # type: ignore[arg-type]


async def expect_code(code: grpc.StatusCode, enroller: Enroller, **fields: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await enroll_raw(enroller, **fields)
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


async def test_enrollment_issues_a_spiffe_certificate(
    enroller: Enroller, server: ServerHandle
) -> None:
    token = await enroller.token("builds", {"zone": "a"})
    csr, _ = make_csr()
    response = await enroll_raw(
        enroller, token=token, csr_pem=csr, name="build-01", labels={"gpu": "no"}
    )
    assert response.agent_id == "build-01"
    assert response.spiffe_id == "spiffe://muster.local/agent/build-01"
    assert response.pool == "builds"
    assert dict(response.labels) == {"zone": "a", "gpu": "no"}
    assert response.agent_endpoint == server.agent_endpoint
    leaf = x509.load_pem_x509_certificate(response.certificate_chain_pem)
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [response.spiffe_id]
    assert response.trust_bundle_pem == (server.config.ca_dir / "bundle.pem").read_bytes()


async def test_a_token_is_single_use_but_a_retry_with_the_same_key_gets_the_same_certificate(
    enroller: Enroller,
) -> None:
    token = await enroller.token()
    csr, _ = make_csr()
    first = await enroll_raw(enroller, token=token, csr_pem=csr, name="a1")
    again = await enroll_raw(enroller, token=token, csr_pem=csr, name="a1")
    assert again.certificate_chain_pem == first.certificate_chain_pem
    other_csr, _ = make_csr()
    details = await expect_code(
        grpc.StatusCode.UNAUTHENTICATED, enroller, token=token, csr_pem=other_csr, name="a2"
    )
    assert details == "bootstrap token is invalid, expired or used up"


async def test_unknown_malformed_and_expired_tokens_look_the_same(
    enroller: Enroller, admin: AsyncAdminClient
) -> None:
    csr, _ = make_csr()
    real = await enroller.token()
    forged = real[: real.index(".") + 1] + "A" * 43
    _, short = await admin.create_bootstrap_token("default", ttl=timedelta(seconds=1))
    await asyncio.sleep(1.2)
    messages = {
        await expect_code(grpc.StatusCode.UNAUTHENTICATED, enroller, token=t, csr_pem=csr)
        for t in ("", "nonsense", forged, "mbt_0123456789abcdef." + "x" * 43, short)
    }
    assert messages == {"bootstrap token is invalid, expired or used up"}


async def test_multi_use_token_enrolls_that_many_agents(enroller: Enroller) -> None:
    token = await enroller.token(max_uses=2)
    for name in ("m1", "m2"):
        await enroll_raw(enroller, token=token, csr_pem=make_csr()[0], name=name)
    await expect_code(
        grpc.StatusCode.UNAUTHENTICATED, enroller, token=token, csr_pem=make_csr()[0], name="m3"
    )


async def test_concurrent_redemptions_of_a_single_use_token_enroll_one_agent(
    enroller: Enroller,
) -> None:
    token = await enroller.token()
    results = await asyncio.gather(
        *(
            enroll_raw(enroller, token=token, csr_pem=make_csr()[0], name=f"race-{i}")
            for i in range(8)
        ),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, enrollment_pb2.EnrollResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1
    assert {r.code() for r in refused} == {grpc.StatusCode.UNAUTHENTICATED}


def _csr_with(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    "csr",
    [
        pytest.param(b"", id="empty"),
        pytest.param(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            id="garbage",
        ),
        pytest.param(_csr_with(rsa.generate_private_key(65537, 2048)), id="rsa-2048"),
        pytest.param(_csr_with(ec.generate_private_key(ec.SECP256K1())), id="secp256k1"),
    ],
)
async def test_bad_csrs_are_invalid_argument_and_do_not_spend_the_token(
    enroller: Enroller, admin: AsyncAdminClient, csr: bytes
) -> None:
    token = await enroller.token()
    details = await expect_code(
        grpc.StatusCode.INVALID_ARGUMENT, enroller, token=token, csr_pem=csr, name="weak"
    )
    assert details.startswith("csr_pem: ")
    assert await admin.list_agents() == []
    # The token was not spent: a good CSR still enrolls with it.
    await enroll_raw(enroller, token=token, csr_pem=make_csr()[0], name="weak")


async def test_token_scope_is_enforced(enroller: Enroller) -> None:
    token = await enroller.token("builds", {"zone": "a"}, name_pattern="build-*")
    csr = make_csr()[0]
    await expect_code(
        grpc.StatusCode.PERMISSION_DENIED, enroller, token=token, csr_pem=csr, name="web-1"
    )
    await expect_code(
        grpc.StatusCode.PERMISSION_DENIED,
        enroller,
        token=token,
        csr_pem=csr,
        name="build-1",
        pool="prod",
    )
    await expect_code(
        grpc.StatusCode.PERMISSION_DENIED,
        enroller,
        token=token,
        csr_pem=csr,
        name="build-1",
        labels={"zone": "b"},
    )
    await expect_code(
        grpc.StatusCode.INVALID_ARGUMENT, enroller, token=token, csr_pem=csr, name="Build 1"
    )
    # None of those refusals spent the single use.
    response = await enroll_raw(enroller, token=token, csr_pem=csr, name="build-1")
    assert response.pool == "builds"


async def test_enrollment_is_audited_without_secrets(
    enroller: Enroller, admin: AsyncAdminClient
) -> None:
    token = await enroller.token()
    await enroll_raw(enroller, token=token, csr_pem=make_csr()[0], name="audited")
    await expect_code(
        grpc.StatusCode.UNAUTHENTICATED, enroller, token=token, csr_pem=make_csr()[0], name="again"
    )
    events = await admin.query_audit(limit=100)
    actions = [(e.action, e.outcome) for e in events]
    for expected in [
        ("token.create", "ok"),
        ("token.redeem", "ok"),
        ("agent.enroll", "ok"),
        ("cert.issue", "ok"),
        ("agent.enroll", "denied"),
    ]:
        assert expected in actions
    secret_part = token.split(".", 1)[1]
    assert all(secret_part not in repr(e) for e in events)


async def test_a_taken_name_is_already_exists_and_does_not_spend_the_token(
    enroller: Enroller,
) -> None:
    await enroll_raw(enroller, token=await enroller.token(), csr_pem=make_csr()[0], name="dup")
    token = await enroller.token()
    await expect_code(
        grpc.StatusCode.ALREADY_EXISTS, enroller, token=token, csr_pem=make_csr()[0], name="dup"
    )
    response = await enroll_raw(enroller, token=token, csr_pem=make_csr()[0], name="dup-2")
    assert response.agent_id == "dup-2"


async def test_concurrent_enrollments_of_one_name_enroll_one_agent(
    enroller: Enroller, admin: AsyncAdminClient
) -> None:
    tokens = [await enroller.token() for _ in range(6)]
    results = await asyncio.gather(
        *(enroll_raw(enroller, token=t, csr_pem=make_csr()[0], name="same") for t in tokens),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, enrollment_pb2.EnrollResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1
    assert {r.code() for r in refused} == {grpc.StatusCode.ALREADY_EXISTS}
    assert [a.agent_id for a in await admin.list_agents()] == ["same"]
