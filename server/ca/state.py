"""The CA as the database records it: every root, intermediate and cross-signed root, past
and present, and what follows from them (the trust bundle, who issues, who is retired).

Pure data, read from ``ca_certificates`` rows: replicas build their issuing CA from it
(:meth:`muster.server.ca.authority.CertificateAuthority.adopt`) and the rotation
commands (:mod:`muster.server.ca.rotation`) decide from it what they may change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

ROOT = "root"
INTERMEDIATE = "intermediate"
CROSS = "cross"
"""A prepared root's certificate signed by the active root's key (same subject and key as
the new root): servers send it after their chain from ``--activate`` to ``--retire``, so
a peer that trusts only the old root (an agent offline during ``--prepare``) still
verifies them."""

PREPARED = "prepared"
ACTIVE = "active"
PREVIOUS = "previous"
RETIRED = "retired"
TRUSTED = (PREPARED, ACTIVE, PREVIOUS)
"""States whose roots are in the trust bundle."""
_BUNDLE_ORDER = {ACTIVE: 0, PREPARED: 1, PREVIOUS: 2}


@dataclass(frozen=True, slots=True)
class CARecord:
    """One row of ``ca_certificates``, its certificate parsed."""

    ca_id: str
    role: str
    state: str
    parent_id: str | None
    certificate: x509.Certificate
    key_ref: str
    created_at: datetime
    updated_at: datetime
    bundle_version: int

    @property
    def common_name(self) -> str:
        names = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def key_id(self) -> bytes:
        """The Subject Key Identifier: what the Authority Key Identifier of whatever this
        CA certificate signed names."""
        return key_id(self.certificate)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class CAState:
    """Every CA certificate Muster has had. Usable as it is read, even half set up: the
    questions that need an active root or intermediate answer None without one."""

    records: tuple[CARecord, ...]

    @classmethod
    def of(cls, records: Iterable[CARecord]) -> CAState:
        return cls(tuple(sorted(records, key=lambda r: (r.created_at, r.ca_id))))

    @property
    def generation(self) -> tuple[tuple[str, str, int], ...]:
        """What changes whenever anything a replica acts on changes (a row added, a state
        moved, the bundle version bumped), whatever the clocks of those who wrote it."""
        return tuple(sorted((r.ca_id, r.state, r.bundle_version) for r in self.records))

    @property
    def version(self) -> int:
        """The trust bundle's version: the highest of any row (0: nothing imported yet)."""
        return max((r.bundle_version for r in self.records), default=0)

    def get(self, ca_id: str | None) -> CARecord | None:
        return next((r for r in self.records if r.ca_id == ca_id), None)

    def having(self, role: str, *states: str) -> list[CARecord]:
        return [r for r in self.records if r.role == role and (not states or r.state in states)]

    def one(self, role: str, state: str) -> CARecord | None:
        """The newest ``role`` in ``state`` (there is one active root and intermediate)."""
        found = self.having(role, state)
        return found[-1] if found else None

    @property
    def active_root(self) -> CARecord | None:
        return self.one(ROOT, ACTIVE)

    @property
    def active_intermediate(self) -> CARecord | None:
        return self.one(INTERMEDIATE, ACTIVE)

    @property
    def bundle_roots(self) -> list[CARecord]:
        """The roots every peer must trust now: active first, then prepared, then previous."""
        roots = self.having(ROOT, *TRUSTED)
        return sorted(roots, key=lambda r: _BUNDLE_ORDER[r.state])

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(r.pem for r in self.bundle_roots)

    @property
    def cross_certificates(self) -> list[CARecord]:
        """Cross-signed roots a server sends after its chain (active ones)."""
        return self.having(CROSS, ACTIVE)

    def children(self, parent_id: str, role: str = INTERMEDIATE) -> list[CARecord]:
        return [r for r in self.records if r.parent_id == parent_id and r.role == role]

    @property
    def issuing_root_key_ids(self) -> frozenset[bytes]:
        """Key ids of the intermediates under the active root: a leaf whose Authority Key
        Identifier is not one of them chains to a root that no longer issues."""
        root = self.active_root
        if root is None:
            return frozenset()
        return frozenset(r.key_id for r in self.children(root.ca_id))


def key_id(certificate: x509.Certificate) -> bytes:
    """A CA certificate's Subject Key Identifier (RFC 5280 method 1 when it has none)."""
    try:
        return certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def authority_key_id(certificate: x509.Certificate) -> bytes | None:
    """The Authority Key Identifier of a certificate (which CA key signed it), if it says."""
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier
