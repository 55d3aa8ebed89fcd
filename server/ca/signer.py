"""The signing seam: the CA asks a Signer to sign, so an HSM or KMS can replace the key file."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from muster.files import PRIVATE_FILE_MODE, PUBLIC_FILE_MODE, write_atomic

KEY_TYPES = ("ec-p256", "ec-p384", "ed25519")
"""Key types Muster generates for its own CA and server keys."""

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
"""Private keys a software signer can hold (RSA only when loaded from an operator's file)."""


@runtime_checkable
class Signer(Protocol):
    """Something that signs certificates as one CA certificate; the key never leaves it."""

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate whose key signs: its subject becomes the issuer of what we sign."""
        ...

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a fully built certificate (issuer name and AKI already set by the caller)."""
        ...


def generate_key(key_type: str) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    """A fresh private key of one of :data:`KEY_TYPES`."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type[:40]!r}; choose one of {', '.join(KEY_TYPES)}")


def signature_hash(key: SigningKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The digest that matches the key's strength (None for Ed25519, which hashes internally)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def private_key_pem(key: SigningKey) -> bytes:
    """Unencrypted PKCS#8 PEM: protected by file mode 0600, not by a passphrase."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes, *, what: str) -> SigningKey:
    """Parse a PEM private key; errors name ``what`` and never include the key bytes."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        # Drop the parser's own error: nothing about the key's bytes should travel further.
        raise ValueError(f"{what} is not an unencrypted PEM private key") from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        raise ValueError(f"{what} holds an unsupported key type {type(key).__name__}")
    return key


class InMemorySigner:
    """A software key held in process memory: the base of FileSigner, and enough for tests."""

    def __init__(self, certificate: x509.Certificate, private_key: SigningKey) -> None:
        if certificate.public_key() != private_key.public_key():
            raise ValueError("the private key does not belong to the signing certificate")
        self._certificate = certificate
        self._key = private_key

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self._key, signature_hash(self._key))


class FileSigner(InMemorySigner):
    """A signer whose key lives in a PEM file (mode 0600) next to its certificate."""

    def __init__(
        self, certificate: x509.Certificate, private_key: SigningKey, *, key_path: Path
    ) -> None:
        super().__init__(certificate, private_key)
        self.key_path = key_path

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> FileSigner:
        """Read the certificate and key; raise ValueError when they are unreadable or mismatched."""
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = load_private_key(key_path.read_bytes(), what=str(key_path))
        return cls(certificate, key, key_path=key_path)

    @classmethod
    def create(
        cls,
        cert_path: Path,
        key_path: Path,
        certificate: x509.Certificate,
        private_key: SigningKey,
        *,
        overwrite: bool = False,
    ) -> FileSigner:
        """Write a new key (0600) and certificate; FileExistsError unless ``overwrite``."""
        signer = cls(certificate, private_key, key_path=key_path)
        write_atomic(
            key_path, private_key_pem(private_key), mode=PRIVATE_FILE_MODE, overwrite=overwrite
        )
        write_atomic(
            cert_path,
            certificate.public_bytes(serialization.Encoding.PEM),
            mode=PUBLIC_FILE_MODE,
            overwrite=overwrite,
        )
        return signer
