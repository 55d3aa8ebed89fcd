"""Certificate revocation lists: what Muster's revocations look like to other verifiers.

A CRL is built from plain values (the signer, the revoked entries, the time, its
lifetime, its number) so any signer works, an HSM key included: it only ever sees the
TBS bytes (:func:`muster.server.ca.signer.sign_crl`). Where the entries come from and
when a CRL is rebuilt is :mod:`muster.server.ca.publish`'s business.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from muster.server.ca.signer import Signer, sign_crl

CA_PLACEHOLDER = "{ca}"
"""In a CRL URL, replaced by the issuing intermediate's :func:`ca_id`."""

_CA_ID = re.compile(r"^[0-9a-f]{16}$")

# Revocation reasons are free text; those that start with an RFC 5280 reason name
# (any case, spaces, dashes or underscores: "key compromise: laptop stolen") carry
# that CRLReason, and so do the reasons Muster writes itself. Others carry none
# (RFC 5280 5.3.1: omit the extension rather than say "unspecified").
_NAMED_REASONS = {
    flag.value.lower(): flag
    for flag in x509.ReasonFlags
    if flag
    not in (
        x509.ReasonFlags.unspecified,
        x509.ReasonFlags.certificate_hold,
        x509.ReasonFlags.remove_from_crl,
    )
}
_MUSTER_REASONS = {
    "reenrolled": x509.ReasonFlags.superseded,
    "agentremoved": x509.ReasonFlags.cessation_of_operation,
}


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    """One revoked certificate as a CRL lists it."""

    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags | None = None


def ca_id(certificate: x509.Certificate) -> str:
    """A CA certificate's id (``ca_certificates.ca_id``): the first 16 hex digits of the
    SHA-256 of its DER."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()[:16]


def is_ca_id(text: str) -> bool:
    """Whether ``text`` has the shape of a :func:`ca_id`."""
    return bool(_CA_ID.match(text))


def crl_reason(text: str | None) -> x509.ReasonFlags | None:
    """The CRLReason a free-text revocation reason maps to, if any."""
    letters = "".join(c for c in (text or "").lower() if c.isalpha())
    for prefix, flag in _MUSTER_REASONS.items():
        if letters.startswith(prefix):
            return flag
    for name, flag in _NAMED_REASONS.items():
        if letters.startswith(name):  # no name is a prefix of another
            return flag
    return None


def crl_url_for(template: str, issuer: x509.Certificate) -> str:
    """``template`` with ``{ca}`` replaced by the issuer's :func:`ca_id`."""
    if CA_PLACEHOLDER not in template:
        return template
    return template.replace(CA_PLACEHOLDER, ca_id(issuer))


def distribution_points(template: str, issuer: x509.Certificate) -> x509.CRLDistributionPoints:
    """The CRL Distribution Points extension of a leaf issued by ``issuer``."""
    url = crl_url_for(template, issuer)
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


def build_crl(
    signer: Signer,
    revoked: Iterable[RevokedEntry],
    *,
    now: datetime,
    lifetime: timedelta,
    number: int,
) -> x509.CertificateRevocationList:
    """A CRL of ``signer``'s certificate listing ``revoked``, valid from ``now`` for
    ``lifetime`` (``nextUpdate``), with CRL number ``number``.

    Blocking when the signer is (an HSM): call it off the event loop.
    """
    if lifetime <= timedelta(0):
        raise ValueError("a CRL's lifetime must be positive")
    if number < 0:
        raise ValueError("a CRL number must not be negative")
    issuer = signer.certificate
    this_update = now.astimezone(UTC).replace(microsecond=0)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(this_update)
        .next_update(this_update + lifetime)
        .add_extension(authority_key_identifier(issuer), critical=False)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in revoked:
        revoked_builder = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at.astimezone(UTC).replace(microsecond=0))
        )
        if entry.reason is not None:
            revoked_builder = revoked_builder.add_extension(
                x509.CRLReason(entry.reason), critical=False
            )
        builder = builder.add_revoked_certificate(revoked_builder.build())
    return sign_crl(signer, builder)


def authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI that matches the issuer's SKI (derived as RFC 5280 method 1 when it has none)."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(issuer.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
