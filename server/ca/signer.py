"""The signing seam: the CA hands a signer the bytes to sign, so a key that never enters
this process (an HSM over PKCS#11, a KMS) can replace the key file."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from muster.files import PRIVATE_FILE_MODE, PUBLIC_FILE_MODE, write_atomic
from muster.server.ca.der import assemble_signed, signed_parts

DER = serialization.Encoding.DER

KEY_TYPES = ("ec-p256", "ec-p384", "ed25519")
"""Key types Muster generates for its own CA and server keys."""

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
"""Private keys a software signer can hold (RSA only when loaded from an operator's file)."""


CAPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
"""Public keys a CA key may have."""


@runtime_checkable
class KeySigner(Protocol):
    """A private key that signs bytes and never leaves where it lives (memory, file, HSM)."""

    def public_key(self) -> CAPublicKey:
        """The public half, which decides the signature algorithm."""
        ...

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` the way X.509 names the algorithm for this key: ECDSA with SHA-256
        (P-256) or SHA-384 (P-384) as a DER ``Ecdsa-Sig-Value``, Ed25519 (64 bytes), or
        RSA PKCS#1 v1.5 with SHA-256."""
        ...


@runtime_checkable
class Signer(KeySigner, Protocol):
    """A CA key together with its certificate: what issues certificates and CRLs."""

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate whose key signs: its subject becomes the issuer of what we sign."""
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


def signature_hash(key: SigningKey | CAPublicKey) -> hashes.SHA256 | hashes.SHA384 | None:
    """The digest that matches the key's strength (None for Ed25519, which hashes internally)."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return None
    if (
        isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey)
        and key.curve.key_size > 256
    ):
        return hashes.SHA384()
    return hashes.SHA256()


def sign_certificate(key: KeySigner, builder: x509.CertificateBuilder) -> x509.Certificate:
    """Sign a fully built certificate with ``key``, which only ever sees the TBS bytes.

    ``cryptography`` signs only with keys it holds, so the builder is signed once with
    a throwaway key of the same algorithm to get the exact TBS and algorithm
    identifier; ``key`` signs the TBS and the parts are spliced together. The result
    is checked against ``key``'s public key, so a misbehaving HSM cannot hand out a
    certificate that does not verify.
    """
    public = key.public_key()
    template = builder.sign(_stand_in(public), signature_hash(public))
    return x509.load_der_x509_certificate(_resign(key, template.public_bytes(DER)))


def sign_crl(
    key: KeySigner, builder: x509.CertificateRevocationListBuilder
) -> x509.CertificateRevocationList:
    """Sign a CRL with ``key`` the same way as :func:`sign_certificate`."""
    public = key.public_key()
    template = builder.sign(_stand_in(public), signature_hash(public))
    return x509.load_der_x509_crl(_resign(key, template.public_bytes(DER)))


def _resign(key: KeySigner, template: bytes) -> bytes:
    """``template`` (DER, signed by a stand-in) with ``key``'s signature over its TBS."""
    tbs, algorithm = signed_parts(template)
    signature = key.sign(tbs)
    _check_signature(key.public_key(), signature, tbs)
    return assemble_signed(tbs, algorithm, signature)


def sign_with(key: SigningKey, data: bytes) -> bytes:
    """Sign ``data`` with a key held in memory, as :meth:`KeySigner.sign` specifies."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        digest = signature_hash(key)
        assert digest is not None
        return key.sign(data, ec.ECDSA(digest))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _check_signature(public: CAPublicKey, signature: bytes, data: bytes) -> None:
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            digest = signature_hash(public)
            assert digest is not None
            public.verify(signature, data, ec.ECDSA(digest))
        else:
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise ValueError(
            "the CA signer returned a signature that does not verify under its public key"
        ) from None


@functools.cache
def _stand_in_for(kind: str) -> SigningKey:
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP384R1() if kind == "p384" else ec.SECP256R1())


def _stand_in(public: CAPublicKey) -> SigningKey:
    """A throwaway key whose signature algorithm identifier matches ``public``'s."""
    if isinstance(public, ed25519.Ed25519PublicKey):
        return _stand_in_for("ed25519")
    if isinstance(public, rsa.RSAPublicKey):
        return _stand_in_for("rsa")
    if public.curve.key_size > 256:
        return _stand_in_for("p384")
    return _stand_in_for("p256")


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


class SoftwareKey:
    """A :class:`KeySigner` over a private key held in process memory."""

    def __init__(self, private_key: SigningKey) -> None:
        self._key = private_key

    def public_key(self) -> CAPublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        return sign_with(self._key, data)


class InMemorySigner(SoftwareKey):
    """A software CA key and its certificate: the base of FileSigner, and enough for tests."""

    def __init__(self, certificate: x509.Certificate, private_key: SigningKey) -> None:
        if certificate.public_key() != private_key.public_key():
            raise ValueError("the private key does not belong to the signing certificate")
        super().__init__(private_key)
        self._certificate = certificate

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate


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
