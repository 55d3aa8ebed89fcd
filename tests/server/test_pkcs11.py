"""The CA's keys in a PKCS#11 token, for real: SoftHSM2, set up here in a temporary
directory. ``muster ca init`` makes the keys in the token and writes no key file; a server
signs enrollments, renewals and CRLs with the token's intermediate key; a wrong PIN file
is a clear error that names the file and never the PIN."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.verification import PolicyBuilder, Store

from muster import AsyncAdminClient
from muster.errors import ConfigError
from muster.server.app import start_server
from muster.server.ca import CAError, CertificateAuthority, sign_certificate
from muster.server.ca.authority import key_ref
from muster.server.ca.keystore import key_store
from muster.server.ca.pkcs11 import Pkcs11KeyStore, TokenError, parse_spec
from muster.server.config import ServerConfig
from tests.agentsim import Enroller, SimAgent
from tests.conftest import client_config, server_config
from tests.e2e.procs import env, run
from tests.server.test_crl import (
    as_openssl,
    ca_pem,
    fetch,
    needs_openssl,
    openssl_serials,
    openssl_verifies,
)
from tests.server.test_renewal import renew

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")  # Debian's softhsm2 package
SOFTHSM2_UTIL = shutil.which("softhsm2-util")
PIN = "4711-muster-test"


@dataclass(frozen=True)
class Token:
    conf: Path
    pin_file: Path

    @property
    def spec(self) -> str:
        return f"pkcs11:module={MODULE};token=muster;pin-file={self.pin_file}"

    def environ(self, spec: str | None = None) -> dict[str, str]:
        """A ``muster`` process's environment: this token, configured as the CA signer."""
        return env(SOFTHSM2_CONF=str(self.conf), MUSTER_CA_SIGNER=spec or self.spec)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    """A fresh SoftHSM2 token labelled ``muster``, for this module's tests and processes.

    SoftHSM2 reads ``SOFTHSM2_CONF`` once per process, when the module is first loaded,
    so the tests in this process share one token directory."""
    if SOFTHSM2_UTIL is None or not MODULE.is_file():
        pytest.skip(
            f"needs Debian's softhsm2 (softhsm2-util and {MODULE}): apt-get install softhsm2"
        )
    pytest.importorskip("pkcs11", reason="needs python-pkcs11 (pip install 'muster-fleet[hsm]')")
    home = tmp_path_factory.mktemp("softhsm")
    (home / "tokens").mkdir()
    conf = home / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {home / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    pin_file = home / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(conf))
        init = [SOFTHSM2_UTIL, "--init-token", "--free", "--label", "muster"]
        subprocess.run(
            [*init, "--pin", PIN, "--so-pin", "so-" + PIN],  # a throwaway test token's PINs
            check=True,
            capture_output=True,
        )
        yield Token(conf, pin_file)


@pytest.fixture
def store(token: Token) -> Pkcs11KeyStore:
    return Pkcs11KeyStore.from_spec(token.spec)


# -- the key store ----------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "ed25519"])
def test_a_key_made_in_the_token_signs_as_x509_expects_and_never_leaves(
    token: Token, store: Pkcs11KeyStore, key_type: str
) -> None:
    import pkcs11

    key, ref = store.create(key_type, f"unit-{key_type}")
    assert ref == f"pkcs11:unit-{key_type}"
    assert store.open(ref) is key  # one session per key, however often it is opened
    assert Pkcs11KeyStore.from_spec(token.spec) is store  # one login per token and process

    data = b"to be signed " * 100
    signature = key.sign(data)
    public = key.public_key()
    if key_type == "ed25519":
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signature, data)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        digest = hashes.SHA384() if key_type == "ec-p384" else hashes.SHA256()
        assert public.curve.name == ("secp384r1" if key_type == "ec-p384" else "secp256r1")
        public.verify(signature, data, ec.ECDSA(digest))  # DER Ecdsa-Sig-Value
        with pytest.raises(InvalidSignature):
            public.verify(signature, data + b"!", ec.ECDSA(digest))

    # What the token says about the private half: made there, and it stays there.
    # This process is logged in to the token (the store did it), so a session of the
    # test's own sees the private objects.
    session = pkcs11.lib(str(MODULE)).get_token(token_label="muster").open()
    try:
        private = session.get_key(pkcs11.ObjectClass.PRIVATE_KEY, label=f"unit-{key_type}")
        assert private[pkcs11.Attribute.SENSITIVE] is True
        assert private[pkcs11.Attribute.EXTRACTABLE] is False
        assert private[pkcs11.Attribute.NEVER_EXTRACTABLE] is True
        assert private[pkcs11.Attribute.LOCAL] is True  # generated on the token
        assert private[pkcs11.Attribute.DECRYPT] is False
        with pytest.raises(pkcs11.AttributeSensitive):
            private[pkcs11.Attribute.VALUE]
        public_object = session.get_key(pkcs11.ObjectClass.PUBLIC_KEY, label=f"unit-{key_type}")
        assert len(private[pkcs11.Attribute.ID]) == 16
        assert public_object[pkcs11.Attribute.ID] == private[pkcs11.Attribute.ID]
    finally:
        session.close()

    # The seam: a certificate signed by the token verifies under the token's public key.
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "signed in the token")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
    )
    _verify_signed_by(sign_certificate(key, builder), public)


def _verify_signed_by(certificate: x509.Certificate, public: object) -> None:
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(certificate.signature, certificate.tbs_certificate_bytes)
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        algorithm = certificate.signature_hash_algorithm
        assert algorithm is not None
        public.verify(certificate.signature, certificate.tbs_certificate_bytes, ec.ECDSA(algorithm))


def test_a_taken_name_a_missing_key_and_a_foreign_reference_are_refused(
    store: Pkcs11KeyStore,
) -> None:
    store.create("ec-p256", "taken")
    with pytest.raises(FileExistsError, match="already holds a key labelled 'taken'"):
        store.create("ec-p256", "taken")
    with pytest.raises(ValueError, match="holds no private key labelled 'absent'"):
        store.open("pkcs11:absent")
    with pytest.raises(ValueError, match="not a PKCS#11 key"):
        store.open("file:intermediate.key")
    with pytest.raises(ValueError, match="a label is 1-64"):
        store.open("pkcs11:../x")
    with pytest.raises(TokenError, match="unknown key type"):
        store.create("rsa-2048", "rsa")


# -- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hsm:module=/x.so", "must be empty"),
        ("pkcs11:module=/x.so;token=t", "missing pin-file"),
        ("pkcs11:module=x.so;token=t;pin-file=/p", "absolute path"),
        ("pkcs11:module=/x.so;token=t;pin-file=/p;token=u", "token is given twice"),
        ("pkcs11:module=/x.so;token=;pin-file=/p", "token is empty"),
        ("pkcs11:module=/x.so;token=t;pin=secret-1234", "the PIN goes in a file"),
        ("pkcs11:module=/x.so;token=t;secret-1234", "expected name=value"),
    ],
)
def test_a_bad_signer_setting_is_refused_at_start_without_echoing_unknown_values(
    spec: str, message: str
) -> None:
    for attempt in (lambda: parse_spec(spec), lambda: ServerConfig(ca_signer=spec)):
        with pytest.raises(ConfigError, match=message) as refused:
            attempt()
        assert "secret-1234" not in str(refused.value)


def test_a_good_spec_names_module_token_and_pin_file() -> None:
    spec = parse_spec("pkcs11:pin-file=/run/credentials/muster/pin;token=ca 1;module=/lib/p.so")
    assert (spec.module, spec.token, spec.pin_file) == (
        Path("/lib/p.so"),
        "ca 1",
        Path("/run/credentials/muster/pin"),
    )


# -- the CA in the token, end to end ----------------------------------------------------


async def test_wrong_or_unreadable_pin_files_are_clear_errors_that_never_show_the_pin(
    token: Token, tmp_path: Path
) -> None:
    # In separate processes: this one is logged in already (PKCS#11 logs in once per
    # application), so only a fresh process shows what a wrong PIN does.
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("not-the-pin-9876\n")
    spec = token.spec.replace(str(token.pin_file), str(wrong))
    code, out, err = await run(
        "ca", "init", "--data-dir", str(tmp_path / "a"), cwd=tmp_path, environ=token.environ(spec)
    )
    assert code == 1, (out, err)
    assert f"refused the PIN in {wrong}" in err
    assert "not-the-pin-9876" not in out + err and PIN not in out + err
    assert not (tmp_path / "a" / "ca" / "root.pem").exists()

    missing = tmp_path / "no-such-pin"
    code, _, err = await run(
        "server",
        "--data-dir",
        str(tmp_path / "b"),
        cwd=tmp_path,
        environ=token.environ(token.spec.replace(str(token.pin_file), str(missing))),
    )
    assert code == 1
    assert f"cannot read the PIN file {missing}" in err


@needs_openssl
async def test_enroll_renew_and_crl_with_the_intermediate_key_in_the_token(
    token: Token, tmp_path: Path, backend: dict[str, object]
) -> None:
    data = tmp_path / "data"
    code, out, err = await run(
        "ca", "init", "--data-dir", str(data), cwd=tmp_path, environ=token.environ()
    )
    assert code == 0, err
    assert "in the PKCS#11 token" in out
    ca_dir = data / "ca"
    assert not (ca_dir / "intermediate.key").exists()
    assert not (ca_dir / "root.key").exists()
    assert _private_key_files(data) == []
    inter_ref = key_ref(ca_dir, "intermediate")
    assert inter_ref.startswith("pkcs11:muster-intermediate-")
    assert key_ref(ca_dir, "root").startswith("pkcs11:muster-root-")

    # Without the token configured, the CA says where its key is instead of failing oddly.
    with pytest.raises(CAError, match="MUSTER_CA_SIGNER"):
        CertificateAuthority.load(ca_dir, "muster.local")

    config = server_config(data, ca_signer=token.spec, **backend)
    token_key = key_store(config).open(inter_ref)
    handle = await start_server(config)
    try:
        intermediate = handle.ca.intermediate_certificate
        assert intermediate.public_key() == token_key.public_key()
        root = x509.load_pem_x509_certificate((ca_dir / "root.pem").read_bytes())
        async with AsyncAdminClient(client_config(handle)) as admin:
            enroller = Enroller(handle, admin)
            first = await enroller.enroll("hsm-agent")
            _verify_chain(first.chain_pem, root, intermediate)

            renewed = await renew(first)
            _verify_chain(renewed.chain_pem, root, intermediate)
            assert renewed.serial != first.serial
            agent = SimAgent.of(renewed)  # the listener takes the renewed certificate
            try:
                await agent.hello()
            finally:
                await agent.close()

            # Revocation follows the lineage: the renewed certificate goes with its parent.
            revoked = await admin.revoke_certificate(first.serial, reason="superseded")
            assert set(revoked) == {first.serial, renewed.serial}
            crl = await fetch(handle.metrics_port, "/ca/crl")
            assert crl.crl.is_signature_valid(token_key.public_key())
            assert await openssl_verifies(crl.body, ca_pem(handle.ca), tmp_path)
            assert await openssl_serials(crl.body, tmp_path) == {as_openssl(s) for s in revoked}
    finally:
        await handle.stop(grace=1.0)
    # The server wrote its own TLS key (data/server), and still no CA key anywhere.
    assert [p for p in _private_key_files(data) if p.parent.name != "server"] == []


def _private_key_files(root: Path) -> list[Path]:
    return [
        path for path in root.rglob("*") if path.is_file() and b"PRIVATE KEY" in path.read_bytes()
    ]


def _verify_chain(chain_pem: bytes, root: x509.Certificate, intermediate: x509.Certificate) -> None:
    chain = x509.load_pem_x509_certificates(chain_pem)
    assert chain[1] == intermediate
    chain[0].verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    verifier = PolicyBuilder().store(Store([root])).build_client_verifier()
    verifier.verify(chain[0], chain[1:])
