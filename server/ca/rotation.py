"""Rotating the CA: the intermediate, then the root in three steps (prepare, activate,
retire), and the status of every CA certificate Muster has had.

Each operation locks the CA's shared record (``ca_certificates``), makes any new key
first, then changes the rows and writes its audit row in one transaction; replicas
see the change at their next reload (every ``poll_interval``) or at their next issue,
whichever comes first. ``ca/bundle.pem`` is rewritten afterwards so the CLI and SDK
keep verifying the servers. See docs/pki.md for the runbook.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from sqlalchemy.ext.asyncio import AsyncSession

from muster.files import PUBLIC_FILE_MODE, ensure_private_dir, write_atomic
from muster.server.audit import AuditRecord, record_in
from muster.server.ca.authority import (
    BUNDLE,
    INTERMEDIATE_CERT,
    ROOT_CERT,
    CAError,
    cross_signed,
    key_ref,
    new_intermediate,
    new_root,
)
from muster.server.ca.crl import ca_id
from muster.server.ca.keystore import CertifiedKey, KeyStore
from muster.server.ca.signer import KeySigner
from muster.server.ca.state import (
    ACTIVE,
    CROSS,
    INTERMEDIATE,
    PREPARED,
    PREVIOUS,
    RETIRED,
    ROOT,
    CARecord,
    CAState,
    key_id,
)
from muster.server.storage import ca as ca_store
from muster.server.storage.database import Database

log = logging.getLogger(__name__)

SHOWN_DEPENDENTS = 20
"""How many agents a refused ``--retire`` names (it counts them all)."""


class RotationError(CAError):
    """A rotation that cannot be done as asked; nothing was changed."""


@dataclass(frozen=True, slots=True)
class Done:
    """What a rotation changed: lines to print, and the CA's record after it."""

    lines: list[str]
    state: CAState


async def import_directory(session: AsyncSession, ca_dir: Path, *, actor: str) -> CARecord | None:
    """First start with ``ca_certificates`` empty: record the CA directory's root and
    intermediate as active (bundle version 1) and as the issuer of every certificate
    issued before issuers were recorded. Returns the imported intermediate, or None when
    the record already had rows (another replica imported first: this is safe to race)."""
    await ca_store.lock(session)
    if await ca_store.generation(session):
        return None
    root_cert, intermediate_cert = _directory_ca(ca_dir)
    now = datetime.now(UTC)
    root = _record(root_cert, ROOT, ACTIVE, None, key_ref(ca_dir, ROOT), now, 1)
    intermediate = _record(
        intermediate_cert, INTERMEDIATE, ACTIVE, root.ca_id, key_ref(ca_dir, INTERMEDIATE), now, 1
    )
    ca_store.add(session, root)
    ca_store.add(session, intermediate)
    assigned = await ca_store.assign_unissued(session, intermediate.ca_id)
    await record_in(
        session,
        AuditRecord(
            actor=actor,
            action="ca.import",
            target=intermediate.ca_id,
            details={"root": root.ca_id, "intermediate": intermediate.ca_id, "leaves": assigned},
        ),
    )
    log.info(
        "recorded the CA of %s: root %s, intermediate %s (issuer of %d earlier certificates)",
        ca_dir,
        root.ca_id,
        intermediate.ca_id,
        assigned,
    )
    return intermediate


class Rotation:
    """The ``muster ca`` operations against one database and key store."""

    def __init__(
        self,
        db: Database,
        keys: KeyStore,
        *,
        trust_domain: str,
        ca_dir: Path,
        actor: str,
        key_type: str | None = None,
    ) -> None:
        self._db = db
        self._keys = keys
        self._trust_domain = trust_domain
        self._ca_dir = Path(ca_dir)
        self._actor = actor
        self._key_type = key_type
        """New keys' type; None: the type of the key they replace."""

    async def rotate_intermediate(self) -> Done:
        """A new intermediate under the active root issues from now on; the old one stays
        trusted (``previous``) while its leaves live."""
        async with self._db.transaction() as session:
            state = await self._locked(session)
            root, old = _active(state)
            now = datetime.now(UTC)
            root_signer = self._open(root, "the active root")
            key, ref = self._create(old, INTERMEDIATE)
            certificate = new_intermediate(
                self._trust_domain,
                key,
                root_signer,
                now=now,
                name_constraints=_name_constraints(old.certificate),
            )
            new = _record(certificate, INTERMEDIATE, ACTIVE, root.ca_id, ref, now, state.version)
            ca_store.add(session, new)
            await ca_store.set_state(session, [old.ca_id], PREVIOUS, now=now, version=state.version)
            await self._audit(
                session,
                "ca.rotate_intermediate",
                new.ca_id,
                {"previous": old.ca_id, "root": root.ca_id, "not_after": _iso(new.not_after)},
            )
            after = await ca_store.load(session)
        return self._done(
            after,
            f"new intermediate {new.ca_id} ({new.common_name}) under root {root.ca_id} "
            f"issues from now on (expires {_iso(new.not_after)})",
            f"intermediate {old.ca_id} is previous: still trusted while its leaves live",
        )

    async def prepare_root(self) -> Done:
        """A new root and its intermediate, both prepared: the bundle gains the new root
        (its version goes up) and every replica and connected agent is given it."""
        async with self._db.transaction() as session:
            state = await self._locked(session)
            root, intermediate = _active(state)
            if prepared := state.having(ROOT, PREPARED):
                raise RotationError(
                    f"root {prepared[0].ca_id} is already prepared: activate it "
                    "(muster ca rotate-root --activate) before preparing another"
                )
            now = datetime.now(UTC)
            old_root = self._open(root, "the active root")
            root_key, root_ref = self._create(root, ROOT)
            new_root_cert = new_root(self._trust_domain, root_key, now=now)
            inter_key, inter_ref = self._create(intermediate, INTERMEDIATE)
            new_inter_cert = new_intermediate(
                self._trust_domain,
                inter_key,
                CertifiedKey(new_root_cert, root_key),
                now=now,
                name_constraints=_name_constraints(intermediate.certificate),
            )
            version = state.version + 1
            new_root_record = _record(new_root_cert, ROOT, PREPARED, None, root_ref, now, version)
            new_root_id = new_root_record.ca_id
            added = [
                new_root_record,
                _record(
                    new_inter_cert, INTERMEDIATE, PREPARED, new_root_id, inter_ref, now, version
                ),
                _record(
                    cross_signed(new_root_cert, old_root, now=now),
                    CROSS,
                    PREPARED,
                    root.ca_id,
                    root_ref,
                    now,
                    version,
                ),
            ]
            for record in added:
                ca_store.add(session, record)
            await self._audit(
                session,
                "ca.prepare_root",
                new_root_id,
                {
                    "intermediate": added[1].ca_id,
                    "cross_signed_by": root.ca_id,
                    "bundle_version": version,
                    "not_after": _iso(added[0].not_after),
                },
            )
            after = await ca_store.load(session)
        return self._done(
            after,
            f"prepared root {new_root_id} ({added[0].common_name}, expires "
            f"{_iso(added[0].not_after)}) and its intermediate {added[1].ca_id}",
            f"trust bundle version {version}: roots {', '.join(_ids(after.bundle_roots))}",
            "next: wait until every agent has the new bundle (muster ca status), then "
            "muster ca rotate-root --activate",
        )

    async def activate_root(self) -> Done:
        """The prepared root's intermediate issues from now on; the old root and its
        intermediate become previous (still trusted). Agents on the old root are asked
        to renew, and servers get certificates under the new root."""
        async with self._db.transaction() as session:
            state = await self._locked(session)
            old_root, old_intermediate = _active(state)
            prepared = state.having(ROOT, PREPARED)
            if not prepared:
                raise RotationError(
                    "no prepared root to activate: run muster ca rotate-root --prepare first"
                )
            new_root_record = prepared[-1]
            intermediates = state.children(new_root_record.ca_id)
            new_intermediate_record = next(
                (r for r in reversed(intermediates) if r.state == PREPARED), None
            )
            if new_intermediate_record is None:
                raise RotationError(
                    f"prepared root {new_root_record.ca_id} has no prepared intermediate"
                )
            now = datetime.now(UTC)
            self._open(new_intermediate_record, "the prepared intermediate")  # usable?
            cross = [
                r.ca_id
                for r in state.having(CROSS, PREPARED)
                if key_id(r.certificate) == new_root_record.key_id
            ]
            version = state.version
            await ca_store.set_state(
                session,
                [old_root.ca_id, old_intermediate.ca_id],
                PREVIOUS,
                now=now,
                version=version,
            )
            await ca_store.set_state(
                session,
                [new_root_record.ca_id, new_intermediate_record.ca_id, *cross],
                ACTIVE,
                now=now,
                version=version,
            )
            await self._audit(
                session,
                "ca.activate_root",
                new_root_record.ca_id,
                {
                    "intermediate": new_intermediate_record.ca_id,
                    "previous_root": old_root.ca_id,
                    "previous_intermediate": old_intermediate.ca_id,
                },
            )
            after = await ca_store.load(session)
        return self._done(
            after,
            f"root {new_root_record.ca_id} is active: intermediate "
            f"{new_intermediate_record.ca_id} issues from now on",
            f"root {old_root.ca_id} and intermediate {old_intermediate.ca_id} are previous "
            "(still trusted); agents on them are asked to renew",
            "next: when muster ca status shows no live leaf under the old root, "
            "muster ca rotate-root --retire",
        )

    async def retire_root(self, *, force: bool = False) -> Done:
        """Previous roots (and their intermediates) leave the trust bundle (its version
        goes up). Refused while an agent's newest live certificate depends on one, unless
        ``force``."""
        async with self._db.transaction() as session:
            state = await self._locked(session)
            _active(state)
            roots = state.having(ROOT, PREVIOUS)
            if not roots:
                raise RotationError(
                    "no previous root to retire (a root becomes previous at "
                    "muster ca rotate-root --activate)"
                )
            root_ids = {r.ca_id for r in roots}
            root_keys = {r.key_id for r in roots}
            intermediates = [
                r for r in state.records if r.role == INTERMEDIATE and r.parent_id in root_ids
            ]
            cross = [
                r
                for r in state.having(CROSS)
                if r.parent_id in root_ids or key_id(r.certificate) in root_keys
            ]
            now = datetime.now(UTC)
            dependents = await ca_store.dependents(session, [r.ca_id for r in intermediates], now)
            if dependents and not force:
                shown = ", ".join(
                    f"{d.agent_id} (serial {d.serial}, expires {_iso(d.not_after)})"
                    for d in dependents[:SHOWN_DEPENDENTS]
                )
                more = len(dependents) - SHOWN_DEPENDENTS
                raise RotationError(
                    f"{len(dependents)} agent(s) still depend on root(s) "
                    f"{', '.join(sorted(root_ids))}: {shown}"
                    + (f" and {more} more" if more > 0 else "")
                    + "; they renew under the new root when they next connect (or run "
                    "muster agents rotate); --force retires anyway and cuts them off"
                )
            version = state.version + 1
            retiring = [*root_ids, *(r.ca_id for r in intermediates), *(r.ca_id for r in cross)]
            await ca_store.set_state(session, retiring, RETIRED, now=now, version=version)
            await self._audit(
                session,
                "ca.retire_root",
                ",".join(sorted(root_ids)),
                {
                    "intermediates": sorted(r.ca_id for r in intermediates),
                    "bundle_version": version,
                    "forced": force,
                    "dependents": len(dependents),
                },
            )
            after = await ca_store.load(session)
        lines = [
            f"retired root(s) {', '.join(sorted(root_ids))} and their intermediates",
            f"trust bundle version {version}: roots {', '.join(_ids(after.bundle_roots))}",
        ]
        if dependents:
            lines.append(f"forced: {len(dependents)} agent(s) on the retired root are cut off")
        return self._done(after, *lines)

    async def _locked(self, session: AsyncSession) -> CAState:
        await ca_store.lock(session)
        state = await ca_store.load(session)
        if not state.records:
            raise RotationError(
                "the CA is not recorded in this database yet: start muster server once "
                "(it records the CA directory's root and intermediate)"
            )
        return state

    def _open(self, record: CARecord, what: str) -> CertifiedKey:
        try:
            return CertifiedKey(record.certificate, self._keys.open(record.key_ref))
        except (ValueError, OSError) as err:
            raise RotationError(
                f"cannot use the key of {what} {record.ca_id} ({record.key_ref}): {err}"
            ) from None

    def _create(self, replacing: CARecord, role: str) -> tuple[KeySigner, str]:
        key_type = self._key_type or _key_type(replacing.certificate)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        name = f"muster-{role}-{stamp}-{secrets.token_hex(3)}"
        try:
            return self._keys.create(key_type, name)
        except (ValueError, OSError) as err:
            raise RotationError(f"cannot make a new {role} key: {err}") from None

    async def _audit(
        self, session: AsyncSession, action: str, target: str, details: dict[str, Any]
    ) -> None:
        await record_in(
            session, AuditRecord(actor=self._actor, action=action, target=target, details=details)
        )

    def _done(self, state: CAState, *lines: str) -> Done:
        write_bundle(self._ca_dir, state)
        return Done(list(lines), state)


def write_bundle(ca_dir: Path, state: CAState) -> bool:
    """Rewrite ``ca_dir/bundle.pem`` (atomically) when it is not ``state``'s bundle; True
    if written. The CLI and SDK verify the servers with it (``MUSTER_CA_FILE``)."""
    path = Path(ca_dir) / BUNDLE
    bundle = state.bundle_pem
    try:
        if path.read_bytes() == bundle:
            return False
    except FileNotFoundError:
        # A replica started on a database whose CA is recorded, with no CA directory of
        # its own yet: it still gets the bundle its CLI needs.
        ensure_private_dir(path.parent)
    write_atomic(path, bundle, mode=PUBLIC_FILE_MODE)
    return True


@dataclass(frozen=True, slots=True)
class Entry:
    """One CA certificate as ``muster ca status`` shows it."""

    ca_id: str
    role: str
    state: str
    subject: str
    not_after: datetime
    parent_id: str | None
    leaves: int | None
    """Intermediates: live leaves (unexpired, unrevoked) it issued; None for roots."""

    def as_json(self) -> dict[str, Any]:
        return {
            "ca_id": self.ca_id,
            "role": self.role,
            "state": self.state,
            "subject": self.subject,
            "not_after": _iso(self.not_after),
            "parent_id": self.parent_id,
            "leaves": self.leaves,
        }


@dataclass(frozen=True, slots=True)
class Status:
    bundle_version: int
    entries: list[Entry] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "bundle_version": self.bundle_version,
            "certificates": [e.as_json() for e in self.entries],
        }

    def lines(self) -> list[str]:
        header = ("CA ID", "ROLE", "STATE", "LEAVES", "NOT AFTER", "PARENT", "SUBJECT")
        rows = [
            (
                e.ca_id,
                e.role,
                e.state,
                "-" if e.leaves is None else str(e.leaves),
                _iso(e.not_after),
                e.parent_id or "-",
                e.subject,
            )
            for e in self.entries
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]

        def line(row: tuple[str, ...]) -> str:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            return "  ".join([*cells, row[-1]])

        return [f"trust bundle version {self.bundle_version}", line(header), *map(line, rows)]


async def status(db: Database) -> Status:
    """Every CA certificate, newest first within each role; a previous intermediate none of
    whose leaves is unexpired shows as retired (nothing can depend on it any more)."""
    now = datetime.now(UTC)
    async with db.transaction() as session:
        state = await ca_store.load(session)
        leaves = await ca_store.leaves_by_issuer(session, now)
    entries = []
    order = {ROOT: 0, CROSS: 1, INTERMEDIATE: 2}
    for record in sorted(state.records, key=lambda r: (order.get(r.role, 3), r.created_at)):
        counted = leaves.get(record.ca_id, ca_store.Leaves())
        shown = record.state
        if record.role == INTERMEDIATE and shown == PREVIOUS and counted.unexpired == 0:
            shown = RETIRED
        entries.append(
            Entry(
                ca_id=record.ca_id,
                role=record.role,
                state=shown,
                subject=record.common_name,
                not_after=record.not_after,
                parent_id=record.parent_id,
                leaves=counted.live if record.role == INTERMEDIATE else None,
            )
        )
    return Status(state.version, entries)


def _active(state: CAState) -> tuple[CARecord, CARecord]:
    root, intermediate = state.active_root, state.active_intermediate
    if root is None or intermediate is None or intermediate.parent_id != root.ca_id:
        raise RotationError(
            "the CA's record has no active intermediate under an active root (see muster ca status)"
        )
    return root, intermediate


def _directory_ca(ca_dir: Path) -> tuple[x509.Certificate, x509.Certificate]:
    """The root and intermediate certificates of a CA directory (``init``'s layout; an
    operator's directory may hold the root in bundle.pem only)."""
    try:
        intermediate = x509.load_pem_x509_certificate((ca_dir / INTERMEDIATE_CERT).read_bytes())
        source = ca_dir / ROOT_CERT if (ca_dir / ROOT_CERT).exists() else ca_dir / BUNDLE
        roots = x509.load_pem_x509_certificates(source.read_bytes())
    except (OSError, ValueError) as err:
        raise CAError(f"cannot read the CA in {ca_dir}: {err}") from None
    for root in roots:
        try:
            intermediate.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return root, intermediate
    raise CAError(f"{ca_dir / INTERMEDIATE_CERT} is not signed by a root in {source}")


def _record(
    certificate: x509.Certificate,
    role: str,
    state: str,
    parent_id: str | None,
    ref: str,
    now: datetime,
    version: int,
) -> CARecord:
    return CARecord(
        ca_id=ca_id(certificate),
        role=role,
        state=state,
        parent_id=parent_id,
        certificate=certificate,
        key_ref=ref,
        created_at=now,
        updated_at=now,
        bundle_version=version,
    )


def _name_constraints(certificate: x509.Certificate) -> x509.NameConstraints | None:
    try:
        return certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None


def _key_type(certificate: x509.Certificate) -> str:
    """The key type a replacement key gets: the replaced one's (RSA, never generated by
    Muster, becomes P-256)."""
    key = certificate.public_key()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size > 256:
        return "ec-p384"
    return "ec-p256"


def _ids(records: Iterable[CARecord]) -> list[str]:
    return [f"{r.ca_id} ({r.state})" for r in records]


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds")
