"""The agent's key material: a P-256 key made here, a CSR that proves we hold it, cert facts.

The private key never leaves the machine; the server only ever sees the CSR,
whose subject and extensions it ignores, so the CSR carries nothing but the key.
With a key passphrase (``--key-passphrase-file``) the key files are encrypted PKCS#8;
the plain PEM exists only in memory, for gRPC's channel credentials.
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


ENCRYPTED_PEM_BEGIN = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


def key_to_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with ``passphrase`` when given; without one the file is
    protected by mode 0600 in a 0700 directory."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if passphrase is None
        else serialization.BestAvailableEncryption(passphrase)
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def is_encrypted_pkcs8(pem: bytes) -> bool:
    """True for the form :func:`key_to_pem` writes with a passphrase."""
    return pem.lstrip().startswith(ENCRYPTED_PEM_BEGIN)


def load_key(
    pem: bytes, passphrase: bytes | None = None, *, name: str = "the agent's private key"
) -> ec.EllipticCurvePrivateKey:
    """Parse a stored key (``name`` is its file, for messages), decrypting it with
    ``passphrase`` if it is encrypted; a plain key loads whether or not one is given.
    No message carries key or passphrase bytes."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as err:  # cryptography's signal for an encrypted key without password
        if passphrase is None:
            raise ConfigError(f"{name} is encrypted: pass --key-passphrase-file") from err
        try:
            key = serialization.load_pem_private_key(pem, password=passphrase)
        except (ValueError, TypeError) as bad:
            raise ConfigError(
                f"{name} does not decrypt with the passphrase from --key-passphrase-file "
                "(wrong passphrase, or a damaged file)"
            ) from bad
    except ValueError as err:
        raise ConfigError(f"{name} is not a readable PEM private key") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{name} is not an ECDSA key")
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
