"""The published CRL: served over HTTP on the metrics listener, signed by the issuing
intermediate and accepted by ``openssl crl -verify``, listing a revocation on the next
fetch (made on this replica or another one sharing the database), rebuilt before it goes
stale (a manual clock, no sleeps), and named by every certificate issued with crl_url."""

from __future__ import annotations

import asyncio
import http.client
import shutil
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry
from sqlalchemy import event, update

from muster import AsyncAdminClient
from muster.cli import main
from muster.errors import ConfigError
from muster.server.app import ServerHandle, start_server
from muster.server.ca import CertificateAuthority, FileSigner
from muster.server.ca.authority import random_serial
from muster.server.ca.crl import RevokedEntry, build_crl, ca_id, crl_reason
from muster.server.ca.keystore import FileKeyStore
from muster.server.ca.signer import sign_certificate
from muster.server.clock import ManualClock
from muster.server.config import ServerConfig
from muster.server.metrics.http import Handler, Reply, start_metrics_server
from muster.server.storage.models import CACertificate, Certificate
from muster.server.storage.types import utcnow
from tests.agentsim import Enrolled, Enroller
from tests.conftest import client_config, server_config

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command")

CRL_URL = "http://crl.example:9464/ca/crl/{ca}"
LIFETIME = timedelta(hours=1)
BURST = 12


@dataclass
class Fetched:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def crl(self) -> x509.CertificateRevocationList:
        assert self.status == 200, self.status
        assert self.headers["content-type"] == "application/pkix-crl"
        return x509.load_der_x509_crl(self.body)


async def fetch(port: int | None, path: str, method: str = "GET") -> Fetched:
    """A real HTTP request to a metrics listener (http.client, in a thread)."""

    def request() -> Fetched:
        assert port is not None
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            headers = {name.lower(): value for name, value in response.getheaders()}
            return Fetched(response.status, headers, response.read())
        finally:
            connection.close()

    return await asyncio.to_thread(request)


async def openssl(*args: str, der: bytes, tmp_path: Path) -> tuple[int, str]:
    """``openssl crl -inform DER -in <der> ARGS``: (exit code, stdout + stderr)."""
    assert OPENSSL is not None
    path = tmp_path / f"crl-{time.monotonic_ns()}.der"
    path.write_bytes(der)
    process = await asyncio.create_subprocess_exec(
        OPENSSL,
        "crl",
        "-inform",
        "DER",
        "-in",
        str(path),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


async def openssl_verifies(der: bytes, ca_pem: bytes, tmp_path: Path) -> bool:
    cafile = tmp_path / f"ca-{time.monotonic_ns()}.pem"
    cafile.write_bytes(ca_pem)
    code, out = await openssl(
        "-verify", "-CAfile", str(cafile), "-noout", der=der, tmp_path=tmp_path
    )
    assert (code == 0) == ("verify OK" in out), out
    return code == 0


async def openssl_serials(der: bytes, tmp_path: Path) -> set[str]:
    """The serials ``openssl crl -text`` lists (upper-case hex, as openssl prints them)."""
    code, out = await openssl("-text", "-noout", der=der, tmp_path=tmp_path)
    assert code == 0, out
    return {
        line.split(":", 1)[1].strip()
        for line in out.splitlines()
        if line.strip().startswith("Serial Number:")
    }


def as_openssl(serial: str) -> str:
    """A serial as ``openssl crl -text`` prints it: upper-case hex of even length."""
    digits = format(int(serial, 16), "X")
    return digits.zfill(len(digits) + len(digits) % 2)


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def ca_pem(ca: CertificateAuthority) -> bytes:
    """What ``openssl crl -verify -CAfile`` needs: the intermediate and its root."""
    return ca.intermediate_pem + ca.bundle_pem


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def server(
    tmp_path: Path, backend: dict[str, object], clock: ManualClock
) -> AsyncIterator[ServerHandle]:
    """A server that names its CRLs in what it issues, on a manual clock."""
    config = server_config(tmp_path / "data", crl_url=CRL_URL, **backend)
    handle = await start_server(config, clock=clock)
    try:
        yield handle
    finally:
        await handle.stop(grace=1.0)


@needs_openssl
async def test_the_crl_verifies_and_lists_a_revocation_on_the_next_fetch(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient, tmp_path: Path
) -> None:
    first = await fetch(server.metrics_port, "/ca/crl")
    crl = first.crl
    assert await openssl_verifies(first.body, ca_pem(server.ca), tmp_path)
    foreign = CertificateAuthority.generate("muster.local")
    assert not await openssl_verifies(first.body, ca_pem(foreign), tmp_path)
    assert crl.issuer == server.ca.intermediate_certificate.subject
    assert crl.is_signature_valid(server.ca.signer.public_key())
    now = datetime.now(UTC)
    assert crl.next_update_utc is not None
    assert crl.next_update_utc > now
    assert crl.next_update_utc - crl.last_update_utc == LIFETIME
    ski = server.ca.intermediate_certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    )
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert aki.value.key_identifier == ski.value.digest
    assert len(crl) == 0

    agent = await enroller.enroll("to-revoke")
    kept = await enroller.enroll("to-keep")
    assert await admin.revoke_agent("to-revoke") == [agent.serial]
    second = await fetch(server.metrics_port, "/ca/crl")
    assert await openssl_verifies(second.body, ca_pem(server.ca), tmp_path)
    assert await openssl_serials(second.body, tmp_path) == {as_openssl(agent.serial)}
    assert crl_number(second.crl) > crl_number(crl)
    entry = second.crl.get_revoked_certificate_by_serial_number(int(agent.serial, 16))
    assert entry is not None
    with pytest.raises(x509.ExtensionNotFound):  # "revoked by an administrator": no code
        entry.extensions.get_extension_for_class(x509.CRLReason)

    await admin.revoke_certificate(kept.serial, reason="Key compromise: laptop stolen")
    third = (await fetch(server.metrics_port, "/ca/crl")).crl
    assert crl_number(third) > crl_number(second.crl)
    entry = third.get_revoked_certificate_by_serial_number(int(kept.serial, 16))
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    assert len(third) == 2


async def test_unchanged_crl_is_served_from_cache_and_rebuilt_before_it_goes_stale(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient, clock: ManualClock
) -> None:
    first = (await fetch(server.metrics_port, "/ca/crl")).body
    assert (await fetch(server.metrics_port, "/ca/crl")).body == first  # unchanged
    first_crl = x509.load_der_x509_crl(first)

    clock.advance(LIFETIME / 2 - timedelta(seconds=1))
    assert (await fetch(server.metrics_port, "/ca/crl")).body == first  # still more than half left

    clock.advance(timedelta(seconds=2))
    rebuilt = (await fetch(server.metrics_port, "/ca/crl")).crl
    assert rebuilt.last_update_utc == clock.now().replace(microsecond=0)
    assert rebuilt.next_update_utc is not None and first_crl.next_update_utc is not None
    assert rebuilt.next_update_utc > first_crl.next_update_utc
    assert crl_number(rebuilt) > crl_number(first_crl)

    # A revoked certificate stays listed until it expires, and not after.
    agent = await enroller.enroll("expiring")
    await admin.revoke_agent("expiring")
    listed = (await fetch(server.metrics_port, "/ca/crl")).crl
    assert listed.get_revoked_certificate_by_serial_number(int(agent.serial, 16)) is not None
    clock.advance(server.config.cert_lifetime + timedelta(minutes=1))
    later = (await fetch(server.metrics_port, "/ca/crl")).crl
    assert later.get_revoked_certificate_by_serial_number(int(agent.serial, 16)) is None
    assert later.next_update_utc is not None
    assert later.next_update_utc - clock.now() > LIFETIME / 2


async def test_routes_head_bundle_and_not_found(server: ServerHandle) -> None:
    got = await fetch(server.metrics_port, "/ca/crl")
    head = await fetch(server.metrics_port, "/ca/crl", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(len(got.body))
    assert head.headers["content-type"] == "application/pkix-crl"

    active = ca_id(server.ca.intermediate_certificate)
    assert (await fetch(server.metrics_port, f"/ca/crl/{active}")).body == got.body
    for path in (
        "/ca/crl/" + "0" * 16,
        "/ca/crl/not-an-id",
        f"/ca/crl/{active}/more",
        "/ca/crl/",
        f"/ca/crl/{active.upper()}",
        "/ca/nothing",
        "/ca",
    ):
        assert (await fetch(server.metrics_port, path)).status == 404, path
    assert (await fetch(server.metrics_port, "/ca/crl", method="POST")).status == 405

    bundle = await fetch(server.metrics_port, "/ca/bundle.pem")
    assert bundle.status == 200
    assert bundle.headers["content-type"] == "application/x-pem-file"
    roots = x509.load_pem_x509_certificates(bundle.body)
    assert roots == list(server.ca.roots)
    assert bundle.body == (server.config.ca_dir / "bundle.pem").read_bytes()
    assert (await fetch(server.metrics_port, "/metrics")).status == 200  # the scrape is still there


async def test_a_burst_of_fetches_shares_its_checks_and_each_sees_the_revocation(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient
) -> None:
    """Requests waiting for a check that began after they arrived take its answer: a
    burst costs a few queries, not one each, and none is answered from before it came."""
    await fetch(server.metrics_port, "/ca/crl")
    agent = await enroller.enroll("burst")
    await admin.revoke_agent("burst")
    checks: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "count(" in statement.lower() and "certificates" in statement:
            checks.append(statement)

    async def raw_get() -> bytes:
        assert server.metrics_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.metrics_port)
        writer.write(b"GET /ca/crl HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = await reader.read()
        writer.close()
        return answer.partition(b"\r\n\r\n")[2]

    engine = server.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        bodies = await asyncio.gather(*(raw_get() for _ in range(BURST)))
    finally:
        event.remove(engine, "before_cursor_execute", count)
    for body in bodies:
        crl = x509.load_der_x509_crl(body)
        assert crl.get_revoked_certificate_by_serial_number(int(agent.serial, 16)) is not None
    assert 1 <= len(checks) < BURST / 2, len(checks)


@needs_openssl
async def test_a_revocation_on_another_replica_shows_on_the_next_fetch(
    server: ServerHandle,
    enroller: Enroller,
    backend: dict[str, object],
    tmp_path: Path,
) -> None:
    await fetch(server.metrics_port, "/ca/crl")  # cached
    shutil.copytree(server.config.ca_dir, tmp_path / "b" / "ca")
    other = await start_server(
        server_config(
            tmp_path / "b",
            **{**backend, "database_url": server.config.resolved_database_url},
            replica_id="b",
        )
    )
    try:
        agent = await enroller.enroll("revoked-elsewhere")
        async with AsyncAdminClient(client_config(other)) as admin_b:
            assert await admin_b.revoke_agent("revoked-elsewhere") == [agent.serial]
        der = (await fetch(server.metrics_port, "/ca/crl")).body
        assert as_openssl(agent.serial) in await openssl_serials(der, tmp_path)
        assert await openssl_verifies(der, ca_pem(server.ca), tmp_path)
    finally:
        await other.stop(grace=1.0)


@needs_openssl
async def test_muster_agents_revoke_then_the_crl_lists_it_within_a_second(
    server: ServerHandle, enroller: Enroller, tmp_path: Path
) -> None:
    agent = await enroller.enroll("cli-revoked")
    await fetch(server.metrics_port, "/ca/crl")  # a cached CRL without it
    config = server.config
    code = await asyncio.to_thread(
        main,
        [
            "agents",
            "revoke",
            "cli-revoked",
            "--addr",
            server.api_address,
            "--token-file",
            str(config.admin_token_file),
            "--ca-file",
            str(config.ca_dir / "bundle.pem"),
        ],
    )
    assert code == 0
    revoked = time.monotonic()
    der = (await fetch(server.metrics_port, "/ca/crl")).body
    listed = as_openssl(agent.serial) in await openssl_serials(der, tmp_path)
    elapsed = time.monotonic() - revoked
    assert listed
    assert elapsed < 1.0, elapsed


@needs_openssl
async def test_every_intermediate_that_is_not_retired_has_its_own_crl(
    server: ServerHandle, enroller: Enroller, admin: AsyncAdminClient, tmp_path: Path
) -> None:
    """An intermediate of ``ca_certificates`` (as rotation leaves a previous one) is served
    at /ca/crl/<ca_id>, signed with its own key, listing only what it issued."""
    config = server.config
    root = FileSigner.load(config.ca_dir / "root.pem", config.ca_dir / "root.key")
    key, key_ref = FileKeyStore(config.ca_dir).create("ec-p256", "test-previous")
    now = datetime.now(UTC).replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Muster Intermediate CA previous")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    previous = sign_certificate(root, builder)
    previous_id = ca_id(previous)
    async with server.db.transaction() as session:
        session.add(
            CACertificate(
                ca_id=previous_id,
                role="intermediate",
                state="previous",
                parent_id=ca_id(root.certificate),
                certificate_pem=previous.public_bytes(serialization.Encoding.PEM),
                key_ref=key_ref,
                not_before=previous.not_valid_before_utc,
                not_after=previous.not_valid_after_utc,
                created_at=utcnow(),
                updated_at=utcnow(),
                bundle_version=1,
            )
        )
    # Two leaves recorded as the previous intermediate's: one revoked, one still live.
    old: list[Enrolled] = [await enroller.enroll(f"old-{i}") for i in range(2)]
    current = await enroller.enroll("current")
    async with server.db.transaction() as session:
        await session.execute(
            update(Certificate)
            .where(Certificate.serial.in_([e.serial for e in old]))
            .values(issuer_id=previous_id)
        )
    await admin.revoke_certificate(old[0].serial)
    await admin.revoke_certificate(current.serial)

    der = (await fetch(server.metrics_port, f"/ca/crl/{previous_id}")).body
    chain = previous.public_bytes(serialization.Encoding.PEM) + server.ca.bundle_pem
    assert await openssl_verifies(der, chain, tmp_path)
    assert not await openssl_verifies(der, ca_pem(server.ca), tmp_path)
    assert await openssl_serials(der, tmp_path) == {as_openssl(old[0].serial)}
    active = (await fetch(server.metrics_port, "/ca/crl")).body
    assert await openssl_serials(active, tmp_path) == {as_openssl(current.serial)}

    async with server.db.transaction() as session:
        await session.execute(
            update(CACertificate)
            .where(CACertificate.ca_id == previous_id)
            .values(state="retired", updated_at=utcnow())
        )
    assert (await fetch(server.metrics_port, f"/ca/crl/{previous_id}")).status == 404
    root_id = ca_id(root.certificate)
    assert (await fetch(server.metrics_port, f"/ca/crl/{root_id}")).status == 404  # a root


async def test_issued_certificates_name_the_crl_with_the_issuer_substituted(
    server: ServerHandle, enroller: Enroller
) -> None:
    expected = CRL_URL.replace("{ca}", ca_id(server.ca.intermediate_certificate))
    agent = await enroller.enroll("with-dp")
    leaf = x509.load_pem_x509_certificate(agent.chain_pem)
    server_leaf = x509.load_pem_x509_certificate(server.server_certificates.current.chain_pem)
    for cert in (leaf, server_leaf):
        assert distribution_urls(cert) == [expected]


async def test_no_distribution_point_without_crl_url(tmp_path: Path) -> None:
    handle = await start_server(server_config(tmp_path / "data", metrics_addr=""))
    try:
        chain = handle.server_certificates.current.chain_pem
        assert distribution_urls(x509.load_pem_x509_certificate(chain)) == []
    finally:
        await handle.stop(grace=1.0)
    generated = CertificateAuthority.generate("muster.local")
    leaf = _issue(generated)
    assert distribution_urls(leaf) == []
    fixed = CertificateAuthority(
        "muster.local",
        signer=generated.signer,
        roots=generated.roots,
        crl_url="https://pki.example/muster.crl",
    )
    assert distribution_urls(_issue(fixed)) == ["https://pki.example/muster.crl"]


def _issue(ca: CertificateAuthority) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return ca.issue_agent_certificate(key, "unit").certificate


def distribution_urls(cert: x509.Certificate) -> list[str]:
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    return [
        name.value
        for point in points
        for name in point.full_name or []
        if isinstance(name, x509.UniformResourceIdentifier)
    ]


def test_crl_settings_are_validated() -> None:
    config = ServerConfig.from_env(
        {"MUSTER_CRL_URL": "http://h:9464/ca/crl/{ca}", "MUSTER_CRL_LIFETIME": "2h"}
    )
    assert config.crl_url == "http://h:9464/ca/crl/{ca}"
    assert config.crl_lifetime == timedelta(hours=2)
    for bad in ("ftp://h/crl", "http://h/a b", "http://h/{issuer}", "h/crl", "http://h/é"):
        with pytest.raises(ConfigError, match="crl_url"):
            ServerConfig(crl_url=bad)
    for lifetime in (timedelta(seconds=30), timedelta(days=8)):
        with pytest.raises(ConfigError, match="crl_lifetime"):
            ServerConfig(crl_lifetime=lifetime)


def test_reasons_map_to_crl_reason_codes() -> None:
    assert crl_reason("keyCompromise") is x509.ReasonFlags.key_compromise
    assert crl_reason("key compromise: laptop stolen") is x509.ReasonFlags.key_compromise
    assert crl_reason("CA_COMPROMISE") is x509.ReasonFlags.ca_compromise
    assert crl_reason("superseded") is x509.ReasonFlags.superseded
    assert crl_reason("re-enrolled") is x509.ReasonFlags.superseded
    assert crl_reason("agent removed by an administrator") is (
        x509.ReasonFlags.cessation_of_operation
    )
    assert crl_reason("cessation of operation") is x509.ReasonFlags.cessation_of_operation
    for none in (None, "", "revoked by an administrator", "certificate hold", "unspecified"):
        assert crl_reason(none) is None


def test_build_crl_is_a_function_of_its_inputs() -> None:
    """What the HSM signer is handed: (signer, entries, now, lifetime, number)."""
    ca = CertificateAuthority.generate("muster.local", key_type="ed25519")
    now = datetime(2030, 1, 2, 3, 4, 5, 678, tzinfo=UTC)
    crl = build_crl(
        ca.signer,
        [RevokedEntry(0xABC, now, x509.ReasonFlags.superseded), RevokedEntry(7, now)],
        now=now,
        lifetime=timedelta(hours=6),
        number=42,
    )
    assert crl.is_signature_valid(ca.signer.public_key())
    assert crl.last_update_utc == now.replace(microsecond=0)
    assert crl.next_update_utc == now.replace(microsecond=0) + timedelta(hours=6)
    assert crl_number(crl) == 42
    assert {entry.serial_number for entry in crl} == {0xABC, 7}
    for bad in ({"lifetime": timedelta(0), "number": 1}, {"lifetime": LIFETIME, "number": -1}):
        with pytest.raises(ValueError):
            build_crl(ca.signer, [], now=now, **bad)  # type: ignore[arg-type]


async def test_metrics_routes_answer_404_for_none_and_500_for_an_error() -> None:
    async def missing(rest: str) -> Reply | None:
        return None if rest != "there" else Reply("text/plain", b"here\n")

    async def broken(_: str) -> Reply | None:
        raise RuntimeError("boom")

    routes: dict[str, Handler] = {"/things/": missing, "/broken": broken}
    async with await start_metrics_server(CollectorRegistry(), routes=routes) as endpoint:
        assert (await fetch(endpoint.port, "/things/there")).body == b"here\n"
        assert (await fetch(endpoint.port, "/things/else")).status == 404
        assert (await fetch(endpoint.port, "/broken")).status == 500
    for clash in ("/metrics", "/healthz/", "relative"):
        with pytest.raises(ValueError, match="route"):
            await start_metrics_server(CollectorRegistry(), routes={clash: missing})
