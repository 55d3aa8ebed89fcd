"""The CA's shared record (``ca_certificates``) and what it needs of ``certificates``:
which intermediate issued each leaf, and which leaves are still alive."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from sqlalchemy import Select, bindparam, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from muster.server.ca.state import CARecord, CAState
from muster.server.storage.models import CACertificate, Certificate

_GENERATION = select(
    CACertificate.ca_id, CACertificate.state, CACertificate.bundle_version
)  # built once: its cache key is kept
_PG_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_SQLITE_LOCK = (
    update(CACertificate).where(CACertificate.ca_id.is_(None)).values(state=CACertificate.state)
)
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"muster-ca").digest()[:8], "big", signed=True)
"""The advisory-lock key of changes to the CA (a signed 64-bit integer, as the audit
chains' keys are made)."""


async def generation(session: AsyncSession) -> tuple[tuple[str, str, int], ...]:
    """:attr:`CAState.generation` without reading the certificates: what a replica polls."""
    rows = await session.execute(_GENERATION)
    return tuple(sorted((ca_id, state, version) for ca_id, state, version in rows))


async def load(session: AsyncSession) -> CAState:
    rows = (await session.execute(select(CACertificate))).scalars()
    return CAState.of(_record(row) for row in rows)


async def lock(session: AsyncSession) -> None:
    """Serialise changes to the CA until this transaction ends: two rotations (or two
    replicas importing at first start) never both act on the same state."""
    if session.bind.dialect.name == "postgresql":
        await session.execute(_PG_LOCK, {"key": _LOCK_KEY})
    else:
        # SQLite has one writer: a write (here one that matches nothing) takes the lock.
        await session.execute(_SQLITE_LOCK)


def add(session: AsyncSession, record: CARecord) -> None:
    session.add(
        CACertificate(
            ca_id=record.ca_id,
            role=record.role,
            state=record.state,
            parent_id=record.parent_id,
            certificate_pem=record.pem,
            key_ref=record.key_ref,
            not_before=record.certificate.not_valid_before_utc,
            not_after=record.certificate.not_valid_after_utc,
            created_at=record.created_at,
            updated_at=record.updated_at,
            bundle_version=record.bundle_version,
        )
    )


async def set_state(
    session: AsyncSession, ca_ids: Collection[str], state: str, *, now: datetime, version: int
) -> None:
    if ca_ids:
        await session.execute(
            update(CACertificate)
            .where(CACertificate.ca_id.in_(list(ca_ids)))
            .values(state=state, updated_at=now, bundle_version=version)
        )


async def assign_unissued(session: AsyncSession, issuer_id: str) -> int:
    """Record ``issuer_id`` as the issuer of every certificate issued before issuers were
    recorded (migration 0005); returns how many."""
    result = await session.execute(
        update(Certificate).where(Certificate.issuer_id.is_(None)).values(issuer_id=issuer_id)
    )
    return int(getattr(result, "rowcount", 0) or 0)


@dataclass(frozen=True, slots=True)
class Leaves:
    """An intermediate's leaves that have not expired."""

    live: int = 0
    """Neither expired nor revoked."""
    unexpired: int = 0
    """Not expired (revoked or not): while any remain, its CRL is still needed."""


async def leaves_by_issuer(session: AsyncSession, now: datetime) -> dict[str, Leaves]:
    live = func.count().filter(Certificate.revoked_at.is_(None))
    rows = await session.execute(
        select(Certificate.issuer_id, live, func.count())
        .where(Certificate.not_after > now, Certificate.issuer_id.is_not(None))
        .group_by(Certificate.issuer_id)
    )
    return {issuer: Leaves(int(n_live), int(n)) for issuer, n_live, n in rows}


@dataclass(frozen=True, slots=True)
class Dependent:
    """An agent whose newest live certificate was issued by one of the intermediates asked
    about: retiring their root would cut it off."""

    agent_id: str
    serial: str
    issuer_id: str
    not_after: datetime


def _newest_live(now: datetime) -> Select[tuple[str, str, str | None, datetime]]:
    newest = (
        select(
            Certificate.agent_id,
            Certificate.serial,
            Certificate.issuer_id,
            Certificate.not_after,
            func.row_number()
            .over(
                partition_by=Certificate.agent_id,
                # issued_at: notBefore is backdated in whole seconds, so two certificates
                # issued within a second tie on it (NULL: issued before migration 0004).
                order_by=(
                    Certificate.issued_at.desc().nulls_last(),
                    Certificate.not_before.desc(),
                    Certificate.serial.desc(),
                ),
            )
            .label("rank"),
        )
        .where(Certificate.revoked_at.is_(None), Certificate.not_after > bindparam("now", now))
        .subquery()
    )
    return select(newest.c.agent_id, newest.c.serial, newest.c.issuer_id, newest.c.not_after).where(
        newest.c.rank == 1
    )


async def dependents(
    session: AsyncSession, issuer_ids: Collection[str], now: datetime
) -> list[Dependent]:
    """Agents whose newest live (unexpired, unrevoked) certificate was issued by one of
    ``issuer_ids``, by agent id."""
    if not issuer_ids:
        return []
    newest = _newest_live(now).subquery()
    rows = await session.execute(
        select(newest).where(newest.c.issuer_id.in_(list(issuer_ids))).order_by(newest.c.agent_id)
    )
    return [
        Dependent(agent_id, serial, issuer, not_after)
        for agent_id, serial, issuer, not_after in rows
    ]


def _record(row: CACertificate) -> CARecord:
    return CARecord(
        ca_id=row.ca_id,
        role=row.role,
        state=row.state,
        parent_id=row.parent_id,
        certificate=x509.load_pem_x509_certificate(row.certificate_pem),
        key_ref=row.key_ref,
        created_at=row.created_at,
        updated_at=row.updated_at,
        bundle_version=row.bundle_version,
    )
