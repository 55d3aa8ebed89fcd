"""The agent's key material: a P-256 key made here, a CSR that proves we hold it, cert facts.

The private key never leaves the machine; the server only ever sees the CSR,
whose subject and extensions it ignores, so the CSR carries nothing but the key.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from muster.errors import ConfigError


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key: small, fast, and accepted by every TLS stack."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: protected by file mode 0600 in a 0700 directory."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse our stored key; the message never includes the key bytes."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError("the agent's private key file is not a readable PEM key") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the agent's private key is not an ECDSA key")
    return key


def build_csr(key: ec.EllipticCurvePrivateKey, common_name: str = "muster-agent") -> bytes:
    """A PEM PKCS#10 request signed by ``key``; the server keeps only its public key."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class LeafInfo:
    """What the agent needs to know about its own certificate."""

    not_before: dt.datetime
    not_after: dt.datetime
    serial: int
    uri_sans: tuple[str, ...]
    public_key_der: bytes

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before

    def expired(self, now: dt.datetime | None = None) -> bool:
        return (now or dt.datetime.now(dt.UTC)) >= self.not_after


def leaf_info(chain_pem: bytes) -> LeafInfo:
    """Read the first certificate of a PEM chain (the leaf)."""
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as err:
        raise ConfigError("the agent certificate chain is not valid PEM") from err
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    return LeafInfo(
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
        uri_sans=uris,
        public_key_der=public_key_der(leaf.public_key()),
    )


def public_key_der(key: object) -> bytes:
    """SubjectPublicKeyInfo DER of a public key, to compare a cert with our key."""
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def cert_matches_key(chain_pem: bytes, key: ec.EllipticCurvePrivateKey) -> bool:
    """True when the leaf certificate was issued for ``key``."""
    return leaf_info(chain_pem).public_key_der == public_key_der(key.public_key())
