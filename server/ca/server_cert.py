"""The server's own TLS certificate: reused across restarts, reissued when it no longer
fits, and renewed while the server runs (:class:`ServerCertificates`)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from muster.files import PRIVATE_FILE_MODE, PUBLIC_FILE_MODE, ensure_private_dir, write_atomic
from muster.server.ca.authority import DEFAULT_SERVER_LIFETIME, CAError, CertificateAuthority
from muster.server.ca.authority import _directly_issued as _signed_by
from muster.server.ca.signer import load_private_key
from muster.server.clock import Clock, sleep_unless

logger = logging.getLogger(__name__)

SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_RENEW_BEFORE = timedelta(days=30)
CHECK_AT_LEAST_EVERY = timedelta(hours=1)
"""The renewal loop reads the clock at least this often (a wall clock can jump)."""
RETRY_AT_MOST_EVERY = timedelta(minutes=1)
"""After a failed renewal, the longest wait before the next try."""


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

    @property
    def serial(self) -> int:
        """The leaf's serial number (logs and tests tell certificates apart by it)."""
        return x509.load_pem_x509_certificate(self.chain_pem).serial_number


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
    usable = None
    if cert_path.exists() and key_path.exists():
        chain_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
        problem = _unfit(ca, chain_pem, key_pem, dns_names, ip_addresses, now + renew_before)
        if problem is None or isinstance(problem, _Outdated):
            usable = ServerCertificate(
                chain_pem, key_pem, certificate_not_after(chain_pem), cert_path, key_path, False
            )
        if problem is None and usable is not None:
            return usable
        logger.info("reissuing the server certificate in %s: %s", directory, problem)
    try:
        chain_pem, key_pem = ca.issue_server_certificate(
            dns_names=dns_names, ip_addresses=ip_addresses, lifetime=lifetime, now=now
        )
    except CAError as err:
        if usable is None:
            raise
        # Still valid and trusted: better served than none (the CA says why it cannot issue).
        logger.error("keeping the server certificate in %s: cannot reissue it: %s", directory, err)
        return usable
    ensure_private_dir(directory)
    # Key first: a reader that sees the new certificate also finds its key.
    write_atomic(key_path, key_pem, mode=PRIVATE_FILE_MODE, overwrite=True)
    write_atomic(cert_path, chain_pem, mode=PUBLIC_FILE_MODE, overwrite=True)
    return ServerCertificate(
        chain_pem, key_pem, certificate_not_after(chain_pem), cert_path, key_path, True
    )


def renewal_margin(lifetime: timedelta) -> timedelta:
    """How long before its expiry a server certificate of ``lifetime`` is renewed: a third
    of its life, at most :data:`DEFAULT_RENEW_BEFORE` (the 90-day default: 30 days)."""
    return min(DEFAULT_RENEW_BEFORE, lifetime / 3)


class ServerCertificates:
    """The certificate both listeners serve, renewed before it expires.

    :attr:`current` is replaced when :meth:`run` renews it; the listeners' credential
    fetchers (server/app.py) serve the new one from the next TLS handshake on, while
    open connections keep the one they began with. Renewal goes through
    :func:`ensure_server_certificate`, so replicas sharing a data directory reuse each
    other's fresh certificate instead of each issuing one.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        directory: Path,
        *,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str],
        lifetime: timedelta,
        clock: Clock,
    ) -> None:
        self._ca = ca
        self._directory = Path(directory)
        self._dns_names = list(dns_names)
        self._ip_addresses = list(ip_addresses)
        self.lifetime = lifetime
        self._clock = clock
        self.current = self._ensure()

    @property
    def renew_at(self) -> datetime:
        """When :attr:`current` is due for renewal."""
        return self.current.not_after - renewal_margin(self.lifetime)

    def renew(self) -> ServerCertificate:
        """Replace :attr:`current` if it is due (or no longer fits); returns the new one."""
        self.current = self._ensure()
        if self.current.issued:
            logger.info(
                "renewed the server certificate: serial %x, expires %s",
                self.current.serial,
                self.current.not_after.isoformat(),
            )
        return self.current

    async def run(self, stopping: asyncio.Event) -> None:
        """Renew :attr:`current` whenever it is due, until ``stopping`` is set."""
        retry = min(RETRY_AT_MOST_EVERY, renewal_margin(self.lifetime) / 2).total_seconds()
        while not stopping.is_set():
            wait = (self.renew_at - self._clock.now()).total_seconds()
            if wait <= 0:
                try:
                    self.renew()
                except Exception:  # keep serving the current one; try again soon
                    logger.exception("renewing the server certificate failed")
                    wait = retry
                else:
                    wait = (self.renew_at - self._clock.now()).total_seconds()
                    if wait <= 0:
                        # Capped by the intermediate's expiry: no longer one can be had.
                        logger.warning(
                            "the server certificate expires at %s, within its renewal "
                            "margin: rotate the intermediate CA",
                            self.current.not_after.isoformat(),
                        )
                        wait = retry
            wait = min(wait, CHECK_AT_LEAST_EVERY.total_seconds())
            if await sleep_unless(self._clock, stopping, wait):
                return

    def _ensure(self) -> ServerCertificate:
        return ensure_server_certificate(
            self._ca,
            self._directory,
            dns_names=self._dns_names,
            ip_addresses=self._ip_addresses,
            lifetime=self.lifetime,
            renew_before=renewal_margin(self.lifetime),
            now=self._clock.now(),
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
    outdated = None
    if not _signed_by(leaf, ca.intermediate_certificate):
        outdated = _Outdated("it was not issued by the issuing intermediate CA")
    elif _tail(chain) != _tail(x509.load_pem_x509_certificates(ca.server_chain_tail), leaf=False):
        outdated = _Outdated("its chain is not the CA's current one")
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
    return outdated


class _Outdated(str):
    """Why a certificate that is still valid and trusted should be replaced (the CA
    rotated): kept if a new one cannot be issued."""

    __slots__ = ()


def _tail(chain: Sequence[x509.Certificate], *, leaf: bool = True) -> list[bytes]:
    """The DER of the certificates after the leaf (of all, when ``leaf`` is False)."""
    return [c.public_bytes(serialization.Encoding.DER) for c in chain[1 if leaf else 0 :]]


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
