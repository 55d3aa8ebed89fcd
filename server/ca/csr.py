"""Reading an agent's CSR: Muster takes only the public key and decides everything else itself."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

MAX_CSR_BYTES = 16 * 1024
"""A CSR for any accepted key is well under 4 KiB; more is a mistake or an attack."""

MIN_RSA_BITS = 3072
MAX_RSA_BITS = 8192
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)

AgentPublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
"""The public key types an agent certificate may carry."""

_ALLOWED = "ECDSA P-256/P-384, Ed25519 or RSA of 3072-8192 bits"


class CsrError(ValueError):
    """The CSR cannot be used; the message says why and is safe to return to the caller."""


def public_key_from_csr(csr_pem: bytes) -> AgentPublicKey:
    """Parse a PKCS#10 request (PEM, or DER), check its self-signature and return its key.

    Subject, SANs and extensions in the request are deliberately ignored: the
    CA builds every agent certificate from its own policy.
    """
    if not isinstance(csr_pem, bytes | bytearray | memoryview):
        raise CsrError(f"CSR must be bytes, not {type(csr_pem).__name__}")
    data = bytes(csr_pem)
    if not data.strip():
        raise CsrError("CSR is empty")
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"CSR is {len(data)} bytes; the limit is {MAX_CSR_BYTES}")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError:
        raise CsrError("CSR is not a valid PEM or DER PKCS#10 certificate request") from None

    try:
        key = csr.public_key()
    except (ValueError, x509.UnsupportedGeneralNameType, NotImplementedError, UnsupportedAlgorithm):
        raise CsrError(f"CSR public key is of an unsupported type; use {_ALLOWED}") from None
    checked = _check_key(key)

    try:
        valid = csr.is_signature_valid
    except (ValueError, x509.UnsupportedGeneralNameType, NotImplementedError, UnsupportedAlgorithm):
        raise CsrError("CSR signature uses an unsupported algorithm") from None
    if not valid:
        raise CsrError("CSR signature does not verify with its own public key")
    return checked


def _check_key(key: CertificatePublicKeyTypes) -> AgentPublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise CsrError(f"CSR uses elliptic curve {key.curve.name}; use {_ALLOWED}")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise CsrError(f"CSR has a {bits}-bit RSA key; use {_ALLOWED}")
        exponent = key.public_numbers().e
        if exponent < 65537 or exponent % 2 == 0:
            raise CsrError("CSR has an RSA key with a weak public exponent; use 65537")
        return key
    raise CsrError(f"CSR has an unsupported {_key_name(key)} key; use {_ALLOWED}")


def _key_name(key: CertificatePublicKeyTypes) -> str:
    return type(key).__name__.removesuffix("PublicKey") or "unknown"


def public_key_fingerprint(public_key: CertificatePublicKeyTypes) -> str:
    """``sha256:<hex>`` of the SubjectPublicKeyInfo DER: a retry with the same key matches."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()
