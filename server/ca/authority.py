"""Muster's certificate authority: a root, an online intermediate, and the certificates it issues.

Policy lives here, not in requests: whatever an agent asks for, its certificate
carries one SPIFFE ID, cA=false, digitalSignature, clientAuth and a short life.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from muster.errors import MusterError
from muster.files import PUBLIC_FILE_MODE, ensure_private_dir, write_atomic
from muster.server.ca.crl import distribution_points
from muster.server.ca.csr import public_key_fingerprint
from muster.server.ca.signer import (
    KEY_TYPES,
    FileSigner,
    InMemorySigner,
    Signer,
    SigningKey,
    SoftwareKey,
    generate_key,
    private_key_pem,
    sign_certificate,
)
from muster.spiffe import SpiffeId

logger = logging.getLogger(__name__)

ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate.key"
BUNDLE = "bundle.pem"
CA_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY, BUNDLE)
"""Every file ``init`` writes into the CA directory (root.key may later move offline)."""

ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=365)
DEFAULT_AGENT_LIFETIME = timedelta(hours=24)
DEFAULT_BACKDATE = timedelta(minutes=5)
"""Agent certificates start a little in the past so a peer with a slow clock accepts them."""
DEFAULT_SERVER_LIFETIME = timedelta(days=90)

_ORG = "Muster"


class CAError(MusterError):
    """The CA cannot be created, loaded or asked to issue (the message says what to do)."""


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """An agent certificate as the enrollment and renewal paths need it."""

    certificate: x509.Certificate
    chain_pem: bytes
    """The leaf, then the intermediate that signed it (PEM)."""
    serial: str
    """Lower-case hex, as ``format(serial_number, 'x')``."""
    spiffe_id: str
    not_before: datetime
    not_after: datetime
    public_key_fingerprint: str
    """``sha256:<hex>`` of the certified key, to recognise a retried enrollment."""


class CertificateAuthority:
    """Issues agent and server certificates through an intermediate :class:`Signer`.

    ``roots`` is the trust bundle; the root's private key is not needed to
    issue, so it may stay offline. ``crl_url``: the CRL distribution point every
    certificate names (``{ca}``: the issuing intermediate's id); empty for none.
    """

    def __init__(
        self,
        trust_domain: str,
        *,
        signer: Signer,
        roots: Sequence[x509.Certificate],
        crl_url: str = "",
    ) -> None:
        try:
            self._server_id = SpiffeId.for_server(trust_domain)
        except ValueError as err:
            raise CAError(f"invalid trust domain: {err}") from None
        if not roots:
            raise CAError("the trust bundle holds no root certificate")
        intermediate = signer.certificate
        if not _is_ca(intermediate):
            raise CAError("the signing certificate is not a CA certificate (BasicConstraints)")
        issuer = next((r for r in roots if _directly_issued(intermediate, r)), None)
        if issuer is None:
            raise CAError("the intermediate certificate is not signed by any root in the bundle")
        for cert, what in ((issuer, "root"), (intermediate, "intermediate")):
            found = _trust_domain_of(cert)
            if found is not None and found != trust_domain:
                raise CAError(
                    f"the {what} certificate belongs to trust domain {found!r}, "
                    f"not {trust_domain!r}"
                )
        self._trust_domain = trust_domain
        self._signer = signer
        self._crl_url = crl_url
        self._root = issuer
        self._roots = tuple(roots)
        # Fixed for this CA's life, and read on every issue: encode them once.
        self._bundle_pem = b"".join(_pem(root) for root in self._roots)
        self._intermediate_pem = _pem(intermediate)
        self._issuer_aki = _aki(intermediate)

    # -- construction ------------------------------------------------------

    @classmethod
    def generate(
        cls,
        trust_domain: str,
        *,
        key_type: str = "ec-p256",
        name_constraints: bool = False,
        intermediate_lifetime: timedelta = INTERMEDIATE_LIFETIME,
    ) -> CertificateAuthority:
        """A fresh root and intermediate held in memory only (tests, or ephemeral setups)."""
        keys = _generate(trust_domain, key_type, name_constraints, intermediate_lifetime)
        return cls(
            trust_domain,
            signer=InMemorySigner(keys.intermediate, keys.intermediate_key),
            roots=[keys.root],
        )

    @classmethod
    def init(
        cls,
        ca_dir: Path,
        trust_domain: str,
        *,
        key_type: str = "ec-p256",
        force: bool = False,
        name_constraints: bool = False,
    ) -> CertificateAuthority:
        """Create a root (10 years) and an intermediate (1 year) and write them to ``ca_dir``.

        Refuses (CAError) when any CA file already exists, unless ``force``.
        """
        ca_dir = Path(ca_dir)
        existing = [name for name in CA_FILES if (ca_dir / name).exists()]
        if existing and not force:
            raise CAError(
                f"a CA already exists in {ca_dir} ({', '.join(existing)}); "
                "refusing to overwrite it (force replaces it and orphans every "
                "certificate it issued)"
            )
        keys = _generate(trust_domain, key_type, name_constraints, INTERMEDIATE_LIFETIME)
        ensure_private_dir(ca_dir)
        try:
            FileSigner.create(
                ca_dir / ROOT_CERT, ca_dir / ROOT_KEY, keys.root, keys.root_key, overwrite=force
            )
            FileSigner.create(
                ca_dir / INTERMEDIATE_CERT,
                ca_dir / INTERMEDIATE_KEY,
                keys.intermediate,
                keys.intermediate_key,
                overwrite=force,
            )
            write_atomic(ca_dir / BUNDLE, _pem(keys.root), mode=PUBLIC_FILE_MODE, overwrite=force)
        except FileExistsError as err:
            # Another process created a CA between our check and our write.
            raise CAError(f"a CA appeared in {ca_dir} while creating one: {err.filename}") from None
        logger.info(
            "created CA for trust domain %s in %s (root expires %s, intermediate %s)",
            trust_domain,
            ca_dir,
            keys.root.not_valid_after_utc.isoformat(),
            keys.intermediate.not_valid_after_utc.isoformat(),
        )
        return cls.load(ca_dir, trust_domain)

    @classmethod
    def load(cls, ca_dir: Path, trust_domain: str, *, crl_url: str = "") -> CertificateAuthority:
        """Load the bundle and the intermediate signer from ``ca_dir`` (root.key is not read)."""
        ca_dir = Path(ca_dir)
        missing = [
            n for n in (BUNDLE, INTERMEDIATE_CERT, INTERMEDIATE_KEY) if not (ca_dir / n).exists()
        ]
        if missing:
            raise CAError(f"no usable CA in {ca_dir}: missing {', '.join(missing)}")
        try:
            roots = x509.load_pem_x509_certificates((ca_dir / BUNDLE).read_bytes())
        except ValueError:
            raise CAError(f"{ca_dir / BUNDLE} is not a PEM certificate bundle") from None
        try:
            signer = FileSigner.load(ca_dir / INTERMEDIATE_CERT, ca_dir / INTERMEDIATE_KEY)
        except ValueError as err:
            raise CAError(f"cannot load the intermediate CA from {ca_dir}: {err}") from None
        return cls(trust_domain, signer=signer, roots=roots, crl_url=crl_url)

    @classmethod
    def load_or_create(
        cls, ca_dir: Path, trust_domain: str, *, key_type: str = "ec-p256", crl_url: str = ""
    ) -> CertificateAuthority:
        """Load the CA in ``ca_dir``, creating it first when the directory holds none."""
        ca_dir = Path(ca_dir)
        if not any((ca_dir / name).exists() for name in CA_FILES):
            cls.init(ca_dir, trust_domain, key_type=key_type)
        return cls.load(ca_dir, trust_domain, crl_url=crl_url)

    # -- what the rest of the server reads ---------------------------------

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def signer(self) -> Signer:
        """The intermediate's signer (tests use it to mint certificates outside policy)."""
        return self._signer

    @property
    def root_certificate(self) -> x509.Certificate:
        """The root that signed the current intermediate."""
        return self._root

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        """Every root in the trust bundle (more than one while rotating roots)."""
        return self._roots

    @property
    def intermediate_certificate(self) -> x509.Certificate:
        return self._signer.certificate

    @property
    def bundle_pem(self) -> bytes:
        """The trust bundle: the root certificates, PEM, as agents and the mTLS port use them."""
        return self._bundle_pem

    @property
    def intermediate_pem(self) -> bytes:
        return self._intermediate_pem

    @property
    def intermediate_not_after(self) -> datetime:
        """When issuing stops working (the ``muster_*`` expiry metric reads this)."""
        return self._signer.certificate.not_valid_after_utc

    @property
    def root_not_after(self) -> datetime:
        return self._root.not_valid_after_utc

    # -- issuing -----------------------------------------------------------

    def issue_agent_certificate(
        self,
        public_key: CertificatePublicKeyTypes,
        agent_id: str,
        *,
        lifetime: timedelta = DEFAULT_AGENT_LIFETIME,
        backdate: timedelta = DEFAULT_BACKDATE,
        now: datetime | None = None,
    ) -> IssuedCertificate:
        """Certify ``public_key`` as ``spiffe://<td>/agent/<agent_id>`` for client authentication.

        The caller has already vetted the key
        (see :func:`muster.server.ca.csr.public_key_from_csr`).
        """
        try:
            spiffe_id = SpiffeId.for_agent(self._trust_domain, agent_id)
        except ValueError as err:
            raise CAError(str(err)) from None
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, agent_id),
            ]
        )
        cert, not_before, not_after = self._issue_leaf(
            public_key,
            subject,
            sans=[x509.UniformResourceIdentifier(str(spiffe_id))],
            usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
            lifetime=lifetime,
            backdate=backdate,
            now=now,
        )
        return IssuedCertificate(
            certificate=cert,
            chain_pem=_pem(cert) + self.intermediate_pem,
            serial=format(cert.serial_number, "x"),
            spiffe_id=str(spiffe_id),
            not_before=not_before,
            not_after=not_after,
            public_key_fingerprint=public_key_fingerprint(public_key),
        )

    def issue_server_certificate(
        self,
        *,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str],
        lifetime: timedelta = DEFAULT_SERVER_LIFETIME,
        now: datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """A fresh P-256 key and a certificate for the server's listeners: (chain PEM, key PEM).

        It carries ``spiffe://<td>/server`` plus the DNS and IP SANs, and both
        serverAuth and clientAuth so replicas can later call each other.
        """
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(self._server_id))]
        for name in dns_names:
            if not name or not name.isascii() or any(c.isspace() for c in name) or "/" in name:
                raise CAError(f"invalid DNS name for a server certificate: {name[:80]!r}")
            sans.append(x509.DNSName(name.lower()))
        for ip in ip_addresses:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                raise CAError(
                    f"invalid IP address for the server certificate: {ip[:80]!r}"
                ) from None
        if len(sans) == 1:
            raise CAError("a server certificate needs at least one DNS name or IP address")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, "Muster server"),
            ]
        )
        cert, _, not_after = self._issue_leaf(
            key.public_key(),
            subject,
            sans=sans,
            usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            lifetime=lifetime,
            backdate=DEFAULT_BACKDATE,
            now=now,
        )
        logger.info(
            "issued server certificate serial %x for %s (expires %s)",
            cert.serial_number,
            ", ".join([*dns_names, *ip_addresses]),
            not_after.isoformat(),
        )
        return _pem(cert) + self.intermediate_pem, private_key_pem(key)

    def _issue_leaf(
        self,
        public_key: CertificatePublicKeyTypes,
        subject: x509.Name,
        *,
        sans: list[x509.GeneralName],
        usages: list[x509.ObjectIdentifier],
        lifetime: timedelta,
        backdate: timedelta,
        now: datetime | None,
    ) -> tuple[x509.Certificate, datetime, datetime]:
        if lifetime <= timedelta(0):
            raise CAError("certificate lifetime must be positive")
        if backdate < timedelta(0):
            raise CAError("backdate must not be negative")
        now = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
        issuer = self._signer.certificate
        if now >= issuer.not_valid_after_utc:
            raise CAError(
                f"the intermediate CA expired at {issuer.not_valid_after_utc.isoformat()}; "
                "rotate it before issuing"
            )
        # Never outlive the intermediate, never start before it.
        not_before = max(now - backdate, issuer.not_valid_before_utc)
        not_after = min(now + lifetime, issuer.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject)
            .public_key(public_key)
            .serial_number(random_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._issuer_aki, critical=False)
        )
        if self._crl_url:
            builder = builder.add_extension(
                distribution_points(self._crl_url, issuer), critical=False
            )
        cert = sign_certificate(self._signer, builder)
        return cert, not_before, not_after


@dataclass(frozen=True, slots=True)
class _NewCA:
    root: x509.Certificate
    root_key: SigningKey
    intermediate: x509.Certificate
    intermediate_key: SigningKey


def _generate(
    trust_domain: str, key_type: str, name_constraints: bool, intermediate_lifetime: timedelta
) -> _NewCA:
    """Make a self-signed root (pathlen 1) and an intermediate (pathlen 0) signed by it."""
    if key_type not in KEY_TYPES:
        raise CAError(f"unknown key type {key_type[:40]!r}; choose one of {', '.join(KEY_TYPES)}")
    try:
        td_uri = f"spiffe://{SpiffeId.for_server(trust_domain).trust_domain}"
    except ValueError as err:
        raise CAError(f"invalid trust domain: {err}") from None
    now = datetime.now(UTC).replace(microsecond=0)
    root_key = generate_key(key_type)
    root_name = _ca_name("Muster Root CA", trust_domain, root_key)
    root_builder = (
        _ca_builder(root_name, root_name, root_key, td_uri, path_length=1)
        .not_valid_before(now - DEFAULT_BACKDATE)
        .not_valid_after(now + ROOT_LIFETIME)
    )
    root = sign_certificate(SoftwareKey(root_key), root_builder)

    inter_key = generate_key(key_type)
    builder = (
        _ca_builder(
            _ca_name("Muster Intermediate CA", trust_domain, inter_key),
            root_name,
            inter_key,
            td_uri,
            path_length=0,
        )
        .not_valid_before(now - DEFAULT_BACKDATE)
        .not_valid_after(min(now + intermediate_lifetime, root.not_valid_after_utc))
        .add_extension(_aki(root), critical=False)
    )
    if name_constraints:
        # Everything below may only name this trust domain in URI SANs; DNS and IP
        # SANs are other name forms and stay unconstrained.
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    intermediate = sign_certificate(SoftwareKey(root_key), builder)
    return _NewCA(root, root_key, intermediate, inter_key)


def random_serial() -> int:
    """A random positive 128-bit serial (RFC 5280 allows up to 20 octets)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def _ca_name(label: str, trust_domain: str, key: SigningKey) -> x509.Name:
    # A short key id keeps names unique across CAs and rotations, which helps
    # chain building when several roots share a bundle.
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()[:8]
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{label} {key_id}"),
        ]
    )


def _ca_builder(
    subject: x509.Name, issuer: x509.Name, key: SigningKey, td_uri: str, *, path_length: int
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        # SPIFFE: a signing certificate may name its trust domain; load() checks it.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(td_uri)]), critical=False
        )
    )


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        # An operator-supplied CA without SKI: derive the id the same way (RFC 5280 method 1).
        ski = x509.SubjectKeyIdentifier.from_public_key(issuer.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _directly_issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _trust_domain_of(cert: x509.Certificate) -> str | None:
    """The trust domain a CA certificate names in a ``spiffe://td`` URI SAN, if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri.removeprefix("spiffe://").rstrip("/")
    return None
