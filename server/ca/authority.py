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
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from muster.errors import MusterError
from muster.files import PUBLIC_FILE_MODE, ensure_private_dir, write_atomic
from muster.server.ca.crl import authority_key_identifier, ca_id, distribution_points
from muster.server.ca.csr import public_key_fingerprint
from muster.server.ca.keystore import FILE_PREFIX, CertifiedKey, KeyStore
from muster.server.ca.signer import (
    KEY_TYPES,
    CAPublicKey,
    FileSigner,
    InMemorySigner,
    KeySigner,
    Signer,
    SoftwareKey,
    generate_key,
    private_key_pem,
    sign_certificate,
)
from muster.server.ca.state import CAState, key_id
from muster.spiffe import SpiffeId

logger = logging.getLogger(__name__)

ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate.key"
BUNDLE = "bundle.pem"
CA_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY, BUNDLE)
"""Every file ``init`` writes into the CA directory (root.key may later move offline)."""
ROOT_KEY_REF = "root.keyref"
INTERMEDIATE_KEY_REF = "intermediate.keyref"
KEY_REF_FILES = (ROOT_KEY_REF, INTERMEDIATE_KEY_REF)
"""With the keys in a key store (an HSM), ``init`` writes these instead of the ``.key``
files: each holds the key's reference (``pkcs11:<label>``), nothing secret."""

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
    issuer_id: str = ""
    """The id (``ca_certificates.ca_id``) of the intermediate that issued it."""


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
        self._trust_domain = trust_domain
        self._crl_url = crl_url
        self._use(signer, roots)

    def _use(
        self,
        signer: Signer,
        roots: Sequence[x509.Certificate],
        *,
        version: int = 0,
        cross: Sequence[x509.Certificate] = (),
        issuing_key_ids: frozenset[bytes] | None = None,
        cannot_issue: str | None = None,
    ) -> None:
        """Issue through ``signer`` and trust ``roots`` from now on (see :meth:`adopt`)."""
        trust_domain = self._trust_domain
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
        # Assigned together, with no await between: issuing runs on the event loop too,
        # so it never mixes one generation's signer with another's names.
        self._signer = signer
        self._root = issuer
        self._roots = tuple(roots)
        # Read on every issue: encode them once per generation.
        self._bundle_pem = b"".join(_pem(root) for root in self._roots)
        self._intermediate_pem = _pem(intermediate)
        self._server_chain_tail = self._intermediate_pem + b"".join(_pem(c) for c in cross)
        self._issuer_aki = authority_key_identifier(intermediate)
        self._issuer_id = ca_id(intermediate)
        self._bundle_version = version
        self._issuing_key_ids = (
            frozenset({key_id(intermediate)}) if issuing_key_ids is None else issuing_key_ids
        )
        self._cannot_issue = cannot_issue

    @classmethod
    def from_state(
        cls, trust_domain: str, state: CAState, keys: KeyStore, *, crl_url: str = ""
    ) -> CertificateAuthority:
        """The CA the shared record describes (see :meth:`adopt`)."""
        signer, _ = _issuing_signer(state, keys, None)
        ca = cls(
            trust_domain,
            signer=signer,
            roots=[r.certificate for r in state.bundle_roots],
            crl_url=crl_url,
        )
        ca.adopt(state, keys)
        return ca

    def adopt(self, state: CAState, keys: KeyStore) -> None:
        """Follow the CA's shared record: issue from its active intermediate (whose key
        ``keys`` opens), trust its bundle, send its cross-signed roots after the server's
        chain. A key that cannot be opened leaves this CA refusing to issue, with
        :attr:`cannot_issue` saying why: never issuing from another intermediate.

        Raises CAError when the record has no usable active root and intermediate.
        """
        reuse = self._signer if self._cannot_issue is None else None
        signer, cannot_issue = _issuing_signer(state, keys, reuse)
        self._use(
            signer,
            [r.certificate for r in state.bundle_roots],
            version=state.version,
            cross=[r.certificate for r in state.cross_certificates],
            issuing_key_ids=state.issuing_root_key_ids,
            cannot_issue=cannot_issue,
        )

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
        _check_new(trust_domain, key_type)
        root_key, inter_key = generate_key(key_type), generate_key(key_type)
        root, intermediate = _generate(
            trust_domain,
            SoftwareKey(root_key),
            SoftwareKey(inter_key),
            name_constraints,
            intermediate_lifetime,
        )
        return cls(trust_domain, signer=InMemorySigner(intermediate, inter_key), roots=[root])

    @classmethod
    def init(
        cls,
        ca_dir: Path,
        trust_domain: str,
        *,
        key_type: str = "ec-p256",
        force: bool = False,
        name_constraints: bool = False,
        keys: KeyStore | None = None,
    ) -> CertificateAuthority:
        """Create a root (10 years) and an intermediate (1 year) and write them to ``ca_dir``.

        The keys are files there too, or, given a key store (an HSM), are made in it and
        ``ca_dir`` holds only their references. Refuses (CAError) when any CA file already
        exists, unless ``force``.
        """
        ca_dir = Path(ca_dir)
        existing = [name for name in (*CA_FILES, *KEY_REF_FILES) if (ca_dir / name).exists()]
        if existing and not force:
            raise CAError(
                f"a CA already exists in {ca_dir} ({', '.join(existing)}); "
                "refusing to overwrite it (force replaces it and orphans every "
                "certificate it issued)"
            )
        _check_new(trust_domain, key_type)
        ensure_private_dir(ca_dir)
        try:
            if keys is None:
                root, intermediate = _init_files(
                    ca_dir, trust_domain, key_type, name_constraints, force
                )
            else:
                root, intermediate = _init_in_store(
                    ca_dir, keys, trust_domain, key_type, name_constraints, force
                )
            write_atomic(ca_dir / BUNDLE, _pem(root), mode=PUBLIC_FILE_MODE, overwrite=force)
        except FileExistsError as err:
            # Another process created a CA between our check and our write, or the key
            # store already holds a key of that name.
            raise CAError(
                f"a CA appeared in {ca_dir} while creating one: {err.filename or err}"
            ) from None
        logger.info(
            "created CA for trust domain %s in %s (root expires %s, intermediate %s)",
            trust_domain,
            ca_dir,
            root.not_valid_after_utc.isoformat(),
            intermediate.not_valid_after_utc.isoformat(),
        )
        return cls.load(ca_dir, trust_domain, keys=keys)

    @classmethod
    def load(
        cls,
        ca_dir: Path,
        trust_domain: str,
        *,
        crl_url: str = "",
        keys: KeyStore | None = None,
    ) -> CertificateAuthority:
        """Load the bundle and the intermediate signer from ``ca_dir`` (root.key is not read).

        An intermediate whose key is in a key store (``intermediate.keyref``) needs ``keys``.
        """
        ca_dir = Path(ca_dir)
        in_store = (ca_dir / INTERMEDIATE_KEY_REF).exists()
        key_file = INTERMEDIATE_KEY_REF if in_store else INTERMEDIATE_KEY
        missing = [n for n in (BUNDLE, INTERMEDIATE_CERT, key_file) if not (ca_dir / n).exists()]
        if missing:
            raise CAError(f"no usable CA in {ca_dir}: missing {', '.join(missing)}")
        try:
            roots = x509.load_pem_x509_certificates((ca_dir / BUNDLE).read_bytes())
        except ValueError:
            raise CAError(f"{ca_dir / BUNDLE} is not a PEM certificate bundle") from None
        try:
            signer: Signer
            if in_store:
                signer = _stored_signer(ca_dir, keys)
            else:
                signer = FileSigner.load(ca_dir / INTERMEDIATE_CERT, ca_dir / INTERMEDIATE_KEY)
        except ValueError as err:
            raise CAError(f"cannot load the intermediate CA from {ca_dir}: {err}") from None
        return cls(trust_domain, signer=signer, roots=roots, crl_url=crl_url)

    @classmethod
    def load_or_create(
        cls,
        ca_dir: Path,
        trust_domain: str,
        *,
        key_type: str = "ec-p256",
        crl_url: str = "",
        keys: KeyStore | None = None,
    ) -> CertificateAuthority:
        """Load the CA in ``ca_dir``, creating it first (keys in ``keys``, if given) when
        the directory holds none."""
        ca_dir = Path(ca_dir)
        if not any((ca_dir / name).exists() for name in (*CA_FILES, *KEY_REF_FILES)):
            cls.init(ca_dir, trust_domain, key_type=key_type, keys=keys)
        return cls.load(ca_dir, trust_domain, crl_url=crl_url, keys=keys)

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
    def bundle_version(self) -> int:
        """The trust bundle's version (0: not read from the CA's shared record)."""
        return self._bundle_version

    @property
    def issuer_id(self) -> str:
        """The issuing intermediate's id (``ca_certificates.ca_id``)."""
        return self._issuer_id

    @property
    def cannot_issue(self) -> str | None:
        """Why this CA refuses to issue (its intermediate's key cannot be used), or None."""
        return self._cannot_issue

    @property
    def server_chain_tail(self) -> bytes:
        """What follows the leaf in a server certificate's chain (PEM): the intermediate,
        then any cross-signed root that lets peers trusting only an older root verify it."""
        return self._server_chain_tail

    def chains_to_issuing_root(self, authority_key_id: bytes | None) -> bool:
        """Whether a leaf signed by the CA key ``authority_key_id`` (its Authority Key
        Identifier) chains to the root that issues now."""
        return authority_key_id in self._issuing_key_ids

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
            issuer_id=self._issuer_id,
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
        return _pem(cert) + self._server_chain_tail, private_key_pem(key)

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


def key_ref(ca_dir: Path, role: str) -> str:
    """The reference of the ``root`` or ``intermediate`` key ``init`` made in ``ca_dir``:
    what ``<role>.keyref`` records, else ``file:<role>.key``."""
    path = Path(ca_dir) / f"{role}.keyref"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return f"{FILE_PREFIX}{role}.key"
    except (OSError, UnicodeDecodeError) as err:
        raise CAError(f"cannot read {path}: {type(err).__name__}") from None


def _stored_signer(ca_dir: Path, keys: KeyStore | None) -> Signer:
    ref = key_ref(ca_dir, "intermediate")
    if keys is None:
        raise CAError(
            f"the intermediate's key is {ref[:80]!r} ({ca_dir / INTERMEDIATE_KEY_REF}): "
            "configure the key store that holds it (MUSTER_CA_SIGNER)"
        )
    certificate = x509.load_pem_x509_certificate((ca_dir / INTERMEDIATE_CERT).read_bytes())
    return CertifiedKey(certificate, keys.open(ref))


def _init_files(
    ca_dir: Path, trust_domain: str, key_type: str, name_constraints: bool, force: bool
) -> tuple[x509.Certificate, x509.Certificate]:
    """``init`` with the keys as files in ``ca_dir`` (a forced init drops key references)."""
    root_key, inter_key = generate_key(key_type), generate_key(key_type)
    root, intermediate = _generate(
        trust_domain,
        SoftwareKey(root_key),
        SoftwareKey(inter_key),
        name_constraints,
        INTERMEDIATE_LIFETIME,
    )
    FileSigner.create(ca_dir / ROOT_CERT, ca_dir / ROOT_KEY, root, root_key, overwrite=force)
    FileSigner.create(
        ca_dir / INTERMEDIATE_CERT,
        ca_dir / INTERMEDIATE_KEY,
        intermediate,
        inter_key,
        overwrite=force,
    )
    for name in KEY_REF_FILES:
        (ca_dir / name).unlink(missing_ok=True)
    return root, intermediate


def _init_in_store(
    ca_dir: Path,
    keys: KeyStore,
    trust_domain: str,
    key_type: str,
    name_constraints: bool,
    force: bool,
) -> tuple[x509.Certificate, x509.Certificate]:
    """``init`` with the keys made in ``keys``; ``ca_dir`` gets their references (and a
    forced init removes key files an earlier CA left there)."""
    # When, and a random tail, so that no two inits share a label (a token keeps old keys).
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    root_key, root_ref = keys.create(key_type, f"muster-root-{stamp}")
    inter_key, inter_ref = keys.create(key_type, f"muster-intermediate-{stamp}")
    root, intermediate = _generate(
        trust_domain, root_key, inter_key, name_constraints, INTERMEDIATE_LIFETIME
    )
    for name, data in (
        (ROOT_CERT, _pem(root)),
        (INTERMEDIATE_CERT, _pem(intermediate)),
        (ROOT_KEY_REF, f"{root_ref}\n".encode()),
        (INTERMEDIATE_KEY_REF, f"{inter_ref}\n".encode()),
    ):
        write_atomic(ca_dir / name, data, mode=PUBLIC_FILE_MODE, overwrite=force)
    for name in (ROOT_KEY, INTERMEDIATE_KEY):
        (ca_dir / name).unlink(missing_ok=True)
    return root, intermediate


def _check_new(trust_domain: str, key_type: str) -> None:
    """Refuse a new CA's settings before any key is made for it."""
    if key_type not in KEY_TYPES:
        raise CAError(f"unknown key type {key_type[:40]!r}; choose one of {', '.join(KEY_TYPES)}")
    try:
        SpiffeId.for_server(trust_domain)
    except ValueError as err:
        raise CAError(f"invalid trust domain: {err}") from None


def _generate(
    trust_domain: str,
    root_key: KeySigner,
    inter_key: KeySigner,
    name_constraints: bool,
    intermediate_lifetime: timedelta,
) -> tuple[x509.Certificate, x509.Certificate]:
    """Certify a self-signed root (pathlen 1) and an intermediate (pathlen 0) signed by it."""
    td_uri = f"spiffe://{SpiffeId.for_server(trust_domain).trust_domain}"
    now = datetime.now(UTC).replace(microsecond=0)
    root_name = _ca_name("Muster Root CA", trust_domain, root_key)
    root_builder = (
        _ca_builder(root_name, root_name, root_key, td_uri, path_length=1)
        .not_valid_before(now - DEFAULT_BACKDATE)
        .not_valid_after(now + ROOT_LIFETIME)
    )
    root = sign_certificate(root_key, root_builder)

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
        .add_extension(authority_key_identifier(root), critical=False)
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
    intermediate = sign_certificate(root_key, builder)
    return root, intermediate


def new_root(trust_domain: str, key: KeySigner, *, now: datetime) -> x509.Certificate:
    """A self-signed root (pathlen 1, 10 years) for ``key`` (a root rotation's new root)."""
    td_uri = f"spiffe://{SpiffeId.for_server(trust_domain).trust_domain}"
    name = _ca_name("Muster Root CA", trust_domain, key)
    builder = (
        _ca_builder(name, name, key, td_uri, path_length=1)
        .not_valid_before(now - DEFAULT_BACKDATE)
        .not_valid_after(now + ROOT_LIFETIME)
    )
    return sign_certificate(key, builder)


def new_intermediate(
    trust_domain: str,
    key: KeySigner,
    root: Signer,
    *,
    now: datetime,
    lifetime: timedelta = INTERMEDIATE_LIFETIME,
    name_constraints: x509.NameConstraints | None = None,
) -> x509.Certificate:
    """An intermediate (pathlen 0) for ``key`` signed by ``root``, within the root's life,
    carrying ``name_constraints`` if given (a rotation keeps the old intermediate's)."""
    td_uri = f"spiffe://{SpiffeId.for_server(trust_domain).trust_domain}"
    parent = root.certificate
    builder = (
        _ca_builder(
            _ca_name("Muster Intermediate CA", trust_domain, key),
            parent.subject,
            key,
            td_uri,
            path_length=0,
        )
        .not_valid_before(max(now - DEFAULT_BACKDATE, parent.not_valid_before_utc))
        .not_valid_after(min(now + lifetime, parent.not_valid_after_utc))
        .add_extension(authority_key_identifier(parent), critical=False)
    )
    if name_constraints is not None:
        builder = builder.add_extension(name_constraints, critical=True)
    return sign_certificate(root, builder)


def cross_signed(root: x509.Certificate, by: Signer, *, now: datetime) -> x509.Certificate:
    """``root``'s subject and key certified by ``by`` (the root it replaces): a peer that
    trusts only ``by`` follows a chain through it to the new root's certificates."""
    issuer = by.certificate
    builder = (
        x509.CertificateBuilder()
        .subject_name(root.subject)
        .issuer_name(issuer.subject)
        .public_key(root.public_key())
        .serial_number(random_serial())
        .not_valid_before(max(now - DEFAULT_BACKDATE, issuer.not_valid_before_utc))
        .not_valid_after(min(root.not_valid_after_utc, issuer.not_valid_after_utc))
        .add_extension(authority_key_identifier(issuer), critical=False)
    )
    for extension in root.extensions:
        if not isinstance(extension.value, x509.AuthorityKeyIdentifier):
            builder = builder.add_extension(extension.value, extension.critical)
    return sign_certificate(by, builder)


def _issuing_signer(
    state: CAState, keys: KeyStore, current: Signer | None
) -> tuple[Signer, str | None]:
    """The signer of ``state``'s active intermediate (``current`` if it is that one
    already), and why it cannot sign (None: it can)."""
    intermediate, root = state.active_intermediate, state.active_root
    if intermediate is None or root is None or intermediate.parent_id != root.ca_id:
        raise CAError(
            "the CA's record (ca_certificates) has no active intermediate under an "
            "active root; see 'muster ca status'"
        )
    if current is not None and current.certificate == intermediate.certificate:
        return current, None  # the same key: no need to open it again
    try:
        return CertifiedKey(intermediate.certificate, keys.open(intermediate.key_ref)), None
    except (ValueError, OSError) as err:
        reason = (
            f"this server cannot use the key of the issuing intermediate CA "
            f"{intermediate.ca_id} ({err}); every replica needs the CA's keys (with "
            "key files: the same CA directory, e.g. a shared volume)"
        )
        return _Unusable(intermediate.certificate, reason), reason


class _Unusable:
    """The issuing intermediate when its key cannot be used here: signing raises CAError
    saying why, so nothing is ever issued from another intermediate instead."""

    def __init__(self, certificate: x509.Certificate, reason: str) -> None:
        self._certificate = certificate
        self._reason = reason

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    def public_key(self) -> CAPublicKey:
        return _ca_public_key(self._certificate)

    def sign(self, data: bytes) -> bytes:
        raise CAError(self._reason)


def _ca_public_key(certificate: x509.Certificate) -> CAPublicKey:
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise CAError(f"a CA certificate with an unsupported key type {type(key).__name__}")
    return key


def random_serial() -> int:
    """A random positive 128-bit serial (RFC 5280 allows up to 20 octets)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def _ca_name(label: str, trust_domain: str, key: KeySigner) -> x509.Name:
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
    subject: x509.Name, issuer: x509.Name, key: KeySigner, td_uri: str, *, path_length: int
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
