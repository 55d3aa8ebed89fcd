"""The signing seam: a key that only ever sees TBS bytes signs certificates and CRLs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from muster.server.ca.der import DERError, assemble_signed, encode_element, signed_parts
from muster.server.ca.keystore import CertifiedKey, FileKeyStore
from muster.server.ca.signer import (
    CAPublicKey,
    SigningKey,
    SoftwareKey,
    sign_certificate,
    sign_crl,
)

NOW = datetime(2026, 12, 6, tzinfo=UTC)
NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seam")])


class BytesOnlyKey:
    """Holds its key like an HSM would: callers get the public key and signatures only."""

    def __init__(self, key: SigningKey) -> None:
        self._inner = SoftwareKey(key)
        self.signed: list[bytes] = []

    def public_key(self) -> CAPublicKey:
        return self._inner.public_key()

    def sign(self, data: bytes) -> bytes:
        self.signed.append(data)
        return self._inner.sign(data)


KEYS = {
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


def _builder(public: CAPublicKey) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(public)
        .serial_number(12345)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_a_certificate_signed_through_the_seam_verifies(kind: str) -> None:
    key = BytesOnlyKey(KEYS[kind]())
    cert = sign_certificate(key, _builder(key.public_key()))
    assert key.signed == [cert.tbs_certificate_bytes]
    cert.verify_directly_issued_by(cert)  # self-signed: its own key checks it
    assert cert.serial_number == 12345


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_a_crl_signed_through_the_seam_verifies(kind: str) -> None:
    key = BytesOnlyKey(KEYS[kind]())
    revoked = x509.RevokedCertificateBuilder().serial_number(77).revocation_date(NOW).build()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(NAME)
        .last_update(NOW)
        .next_update(NOW + timedelta(hours=1))
        .add_revoked_certificate(revoked)
    )
    crl = sign_crl(key, builder)
    assert crl.is_signature_valid(key.public_key())
    assert crl.get_revoked_certificate_by_serial_number(77) is not None


def test_a_signature_that_does_not_verify_is_refused() -> None:
    class Liar(BytesOnlyKey):
        def sign(self, data: bytes) -> bytes:
            return super().sign(data + b"x")

    key = Liar(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ValueError, match="does not verify"):
        sign_certificate(key, _builder(key.public_key()))


def test_der_round_trip_and_errors() -> None:
    long_content = b"a" * 300
    element = encode_element(0x04, long_content)
    assert element[:4] == b"\x04\x82\x01\x2c"
    tbs, alg = encode_element(0x30, b"\x02\x01\x01"), encode_element(0x30, b"\x06\x00")
    signed = assemble_signed(tbs, alg, b"sig")
    assert signed_parts(signed) == (tbs, alg)
    for bad in (b"", b"\x30", signed + b"\x00", b"\x04\x00", b"\x30\x85" + b"\x00" * 5):
        with pytest.raises(DERError):
            signed_parts(bad)


def test_file_key_store_round_trip_and_containment(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path)
    key, ref = store.create("ec-p256", "intermediate-1")
    assert ref == "file:keys/intermediate-1.key"
    assert (tmp_path / "keys" / "intermediate-1.key").stat().st_mode & 0o777 == 0o600
    opened = store.open(ref)
    assert opened.public_key() == key.public_key()
    cert = sign_certificate(opened, _builder(opened.public_key()))
    assert CertifiedKey(cert, opened).certificate == cert
    with pytest.raises(FileExistsError):
        store.create("ec-p256", "intermediate-1")
    for bad in ("file:../outside.key", "file:/etc/passwd", "pkcs11:x", "file:keys/none.key"):
        with pytest.raises(ValueError):
            store.open(bad)
    with pytest.raises(ValueError, match="does not belong"):
        CertifiedKey(cert, SoftwareKey(ec.generate_private_key(ec.SECP256R1())))
