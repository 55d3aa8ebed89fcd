"""CSR vetting: only allowed public keys with a valid self-signature get through, nothing else."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from muster.server.ca import CsrError, public_key_fingerprint, public_key_from_csr
from muster.server.ca.csr import MAX_CSR_BYTES
from tests.testca import TestCA

pytestmark = pytest.mark.slow

AnyKey = (
    ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | rsa.RSAPrivateKey
    | dsa.DSAPrivateKey
)


@cache
def _rsa(bits: int, exponent: int = 65537) -> rsa.RSAPrivateKey:
    # RSA key generation is the slow part of this file; make each size once.
    return rsa.generate_private_key(public_exponent=exponent, key_size=bits)


def _csr(key: AnyKey, builder: x509.CertificateSigningRequestBuilder | None = None) -> bytes:
    builder = builder or x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")])
    )
    algorithm = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else hashes.SHA256()
    )
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


ALLOWED: dict[str, Callable[[], AnyKey]] = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
    "rsa-3072": lambda: _rsa(3072),
}


@pytest.mark.parametrize("kind", sorted(ALLOWED))
@pytest.mark.parametrize("encoding", ["pem", "der"])
def test_allowed_key_types_are_accepted(kind: str, encoding: str) -> None:
    key = ALLOWED[kind]()
    pem = _csr(key)
    data = (
        pem
        if encoding == "pem"
        else x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    )
    assert public_key_from_csr(data) == key.public_key()


REFUSED: dict[str, tuple[Callable[[], AnyKey], str]] = {
    "rsa-2048": (lambda: _rsa(2048), "2048-bit RSA"),
    "rsa-3072-e3": (lambda: _rsa(3072, exponent=3), "weak public exponent"),
    "ec-p192": (lambda: ec.generate_private_key(ec.SECP192R1()), "secp192r1"),
    "ec-secp256k1": (lambda: ec.generate_private_key(ec.SECP256K1()), "secp256k1"),
    "ec-p521": (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
    "ed448": (ed448.Ed448PrivateKey.generate, "Ed448"),
    "dsa": (lambda: dsa.generate_private_key(key_size=2048), "DSA"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_other_key_types_are_refused(kind: str) -> None:
    make, expected = REFUSED[kind]
    with pytest.raises(CsrError, match=expected) as info:
        public_key_from_csr(_csr(make()))
    assert "; use " in str(info.value)  # the message says what would be accepted


@pytest.mark.parametrize("kind", ["ec-p256", "ed25519", "rsa-3072"])
def test_tampered_signature_is_refused(kind: str) -> None:
    der = bytearray(
        x509.load_pem_x509_csr(_csr(ALLOWED[kind]())).public_bytes(serialization.Encoding.DER)
    )
    der[-1] ^= 0x01  # the last byte belongs to the signature
    with pytest.raises(CsrError, match="signature does not verify"):
        public_key_from_csr(bytes(der))


def test_tampered_subject_is_refused() -> None:
    """Changing the signed part (not the signature) must break verification too."""
    pem = _csr(ec.generate_private_key(ec.SECP256R1()))
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    tampered = der.replace(b"agent", b"admin", 1)
    assert tampered != der
    with pytest.raises(CsrError, match="signature does not verify"):
        public_key_from_csr(tampered)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   \n",
        b"SECRET-GARBAGE " * 10,
        b"-----BEGIN CERTIFICATE REQUEST-----\nU0VDUkVULUdBUkJBR0U=\n"
        b"-----END CERTIFICATE REQUEST-----\n",
        b"\x30\x82\x01\x00SECRET-GARBAGE",
    ],
    ids=["empty", "blank", "text", "pem-garbage", "der-garbage"],
)
def test_garbage_is_refused_without_echoing_it(data: bytes) -> None:
    with pytest.raises(CsrError) as info:
        public_key_from_csr(data)
    assert "SECRET" not in str(info.value)
    assert len(str(info.value)) < 200


def test_a_certificate_is_not_a_csr() -> None:
    chain, _ = TestCA.new().server_credentials()
    with pytest.raises(CsrError, match="not a valid PEM or DER PKCS#10"):
        public_key_from_csr(chain)


def test_oversize_input_is_refused_before_parsing() -> None:
    pem = _csr(ec.generate_private_key(ec.SECP256R1()))
    padded = pem + b"\n" * (MAX_CSR_BYTES + 1 - len(pem))
    assert len(padded) == MAX_CSR_BYTES + 1
    with pytest.raises(CsrError, match=f"the limit is {MAX_CSR_BYTES}") as info:
        public_key_from_csr(padded)
    assert len(str(info.value)) < 200
    # The same CSR within the limit is fine: the size, not the content, was refused.
    assert public_key_from_csr(pem[:MAX_CSR_BYTES])


def test_non_bytes_input_is_refused() -> None:
    pem = _csr(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(CsrError, match="must be bytes"):
        public_key_from_csr(pem.decode())  # type: ignore[arg-type]


def test_csr_error_is_a_value_error() -> None:
    assert issubclass(CsrError, ValueError)


def test_everything_but_the_key_is_ignored() -> None:
    """A CSR asking for a CA certificate, another identity and serverAuth gets none of it."""
    test_ca = TestCA.new("example.org")
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root-of-all")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://example.org/server"),
                    x509.UniformResourceIdentifier("spiffe://evil.org/agent/x"),
                    x509.DNSName("muster-server"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    public_key = public_key_from_csr(_csr(key, greedy))
    cert = test_ca.ca.issue_agent_certificate(public_key, "build-01").certificate

    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "build-01"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://example.org/agent/build-01")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_fingerprint_identifies_the_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    # Two different CSRs for one key give the same fingerprint; another key does not.
    first = public_key_from_csr(_csr(key))
    second = public_key_from_csr(
        _csr(
            key,
            x509.CertificateSigningRequestBuilder().subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "retry")])
            ),
        )
    )
    fingerprint = public_key_fingerprint(first)
    assert fingerprint == public_key_fingerprint(second)
    assert fingerprint != public_key_fingerprint(other.public_key())
    assert fingerprint.startswith("sha256:")
    assert len(fingerprint) == len("sha256:") + 64
    int(fingerprint.removeprefix("sha256:"), 16)
    issued = TestCA.new().ca.issue_agent_certificate(first, "a1")
    assert issued.public_key_fingerprint == fingerprint
