"""The server's own TLS certificate: reused across restarts, reissued when it no longer fits."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from muster.files import PRIVATE_FILE_MODE, PUBLIC_FILE_MODE, ensure_private_dir, write_atomic
from muster.server.ca.authority import DEFAULT_SERVER_LIFETIME, CertificateAuthority
from muster.server.ca.authority import _directly_issued as _signed_by
from muster.server.ca.signer import load_private_key

logger = logging.getLogger(__name__)

SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_RENEW_BEFORE = timedelta(days=30)


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    """What the listeners load: chain and key PEM, plus where they live and when they expire."""

    chain_pem: bytes
    private_key_pem: bytes
    not_after: datetime
    cert_path: Path
    key_path: Path
    issued: bool
    """True when this call issued a new certificate, False when the files were reused."""


def ensure_server_certificate(
    ca: CertificateAuthority,
    directory: Path,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    lifetime: timedelta = DEFAULT_SERVER_LIFETIME,
    renew_before: timedelta = DEFAULT_RENEW_BEFORE,
    now: datetime | None = None,
) -> ServerCertificate:
    """Reuse ``directory/server.pem`` and ``server.key`` if they still fit, else issue new ones.

    They fit when the key matches, the chain leads to one of ``ca``'s roots, the
    certificate names this trust domain's server and every requested DNS name
    and IP, and more than ``renew_before`` remains. A restart therefore keeps a
    good certificate and replaces one that is stale, foreign or too narrow.
    """
    directory = Path(directory)
    cert_path, key_path = directory / SERVER_CERT, directory / SERVER_KEY
    now = now or datetime.now(UTC)
    if cert_path.exists() and key_path.exists():
        chain_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        problem = _unfit(ca, chain_pem, key_pem, dns_names, ip_addresses, now + renew_before)
        if problem is None:
            return ServerCertificate(
                chain_pem, key_pem, certificate_not_after(chain_pem), cert_path, key_path, False
            )
        logger.info("reissuing the server certificate in %s: %s", directory, problem)
    chain_pem, key_pem = ca.issue_server_certificate(
        dns_names=dns_names, ip_addresses=ip_addresses, lifetime=lifetime, now=now
    )
    ensure_private_dir(directory)
    # Key first: a reader that sees the new certificate also finds its key.
    write_atomic(key_path, key_pem, mode=PRIVATE_FILE_MODE, overwrite=True)
    write_atomic(cert_path, chain_pem, mode=PUBLIC_FILE_MODE, overwrite=True)
    return ServerCertificate(
        chain_pem, key_pem, certificate_not_after(chain_pem), cert_path, key_path, True
    )


def certificate_not_after(chain_pem: bytes) -> datetime:
    """The expiry (UTC) of the first certificate in a PEM chain: the leaf's, for metrics."""
    return x509.load_pem_x509_certificate(chain_pem).not_valid_after_utc


def _unfit(
    ca: CertificateAuthority,
    chain_pem: bytes,
    key_pem: bytes,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    renew_at: datetime,
) -> str | None:
    """Why the stored certificate cannot be reused, or None when it can."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        key = load_private_key(key_pem, what="server key")
    except ValueError:
        return "the certificate or key file is unreadable"
    leaf = chain[0]
    if leaf.public_key() != key.public_key():
        return "the key does not match the certificate"
    if not _chains_to(leaf, chain[1:], ca.roots):
        return "it was not issued by this CA"
    if leaf.not_valid_after_utc <= renew_at:
        return f"it expires at {leaf.not_valid_after_utc.isoformat()}"
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "it has no SubjectAlternativeName"
    if f"spiffe://{ca.trust_domain}/server" not in san.get_values_for_type(
        x509.UniformResourceIdentifier
    ):
        return f"it does not name spiffe://{ca.trust_domain}/server"
    have_dns = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    missing = [n for n in dns_names if n.lower() not in have_dns]
    missing += [ip for ip in ip_addresses if _ip(ip) not in have_ips]
    if missing:
        return f"it does not cover {', '.join(missing)}"
    return None


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _chains_to(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> bool:
    """Signature walk leaf -> intermediates -> a root; enough for certificates we issued."""
    current = leaf
    for parent in [*intermediates, None]:
        for root in roots:
            if _signed_by(current, root):
                return True
        if parent is None or not _signed_by(current, parent):
            return False
        current = parent
    return False
