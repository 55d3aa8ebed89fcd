"""What the CA publishes over HTTP: a CRL per intermediate, always fresh, and the trust bundle.

The metrics listener serves them (``GET /ca/crl``, ``/ca/crl/<ca_id>``, ``/ca/bundle.pem``).
A CRL is rebuilt by the request that finds the cached one out of date: when the revoked
certificates of its intermediate changed, on any replica (one small query per request
reads the database every replica shares), or when half its lifetime has passed. So the
next fetch after a revocation lists it, and no fetch gets a CRL near its ``nextUpdate``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from muster.server.ca.crl import RevokedEntry, build_crl, ca_id, crl_reason, is_ca_id
from muster.server.ca.keystore import CertifiedKey, KeyStore
from muster.server.ca.signer import Signer
from muster.server.clock import Clock
from muster.server.metrics.http import Handler, Reply
from muster.server.storage.database import Database
from muster.server.storage.models import CACertificate, Certificate

log = logging.getLogger(__name__)

CRL_CONTENT_TYPE = "application/pkix-crl"
"""RFC 2585's media type of a DER CRL."""
PEM_CONTENT_TYPE = "application/x-pem-file"

_PUBLISHED_STATES = ("prepared", "active", "previous")
"""Intermediates whose CRL is served: every one that is not retired."""


@dataclass(frozen=True, slots=True)
class _Issuer:
    ca_id: str
    signer: Signer
    active: bool
    """The issuing intermediate: certificates with no issuer_id (issued before
    ca_certificates existed) are counted as its."""


@dataclass(slots=True)
class _Published:
    der: bytes
    revoked: tuple[int, datetime | None]
    """What the CRL was built from: (count, latest revoked_at) of the issuer's revoked
    certificates. Revocations only add rows, so any revocation changes it."""
    refresh_at: datetime
    checked: int
    """The number of the latest check that found the CRL current."""


class CrlPublisher:
    """Builds, caches and refreshes the CRL of each intermediate.

    ``issuing`` gives the intermediate that issues now (its CRL is ``/ca/crl``); the
    others are found in ``ca_certificates`` and their keys opened from ``keys``.
    Signing runs in a thread: an HSM signer blocks.
    """

    def __init__(
        self,
        db: Database,
        issuing: Callable[[], Signer],
        keys: KeyStore,
        *,
        lifetime: timedelta,
        clock: Clock,
    ) -> None:
        self._db = db
        self._issuing = issuing
        self._keys = keys
        self._lifetime = lifetime
        self._clock = clock
        self._published: dict[str, _Published] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._checks: dict[str, int] = {}
        self._signers: dict[str, Signer] = {}
        self._last_number = 0

    async def active_crl(self) -> bytes:
        """The DER CRL of the issuing intermediate."""
        signer = self._issuing()
        return await self._current(_Issuer(ca_id(signer.certificate), signer, active=True))

    async def crl(self, wanted: str) -> bytes | None:
        """The DER CRL of intermediate ``wanted`` (a ca_id); None unless it is one that
        is not retired."""
        if not is_ca_id(wanted):
            return None
        signer = self._issuing()
        if ca_id(signer.certificate) == wanted:
            return await self._current(_Issuer(wanted, signer, active=True))
        issuer = await self._other(wanted)
        return None if issuer is None else await self._current(issuer)

    async def _other(self, wanted: str) -> _Issuer | None:
        async with self._db.transaction() as session:
            row = (
                await session.execute(
                    select(CACertificate.certificate_pem, CACertificate.key_ref).where(
                        CACertificate.ca_id == wanted,
                        CACertificate.role == "intermediate",
                        CACertificate.state.in_(_PUBLISHED_STATES),
                    )
                )
            ).first()
        if row is None:
            return None
        signer = self._signers.get(wanted)
        if signer is None:
            certificate = x509.load_pem_x509_certificate(row.certificate_pem)
            key = await asyncio.to_thread(self._keys.open, row.key_ref)
            signer = self._signers[wanted] = CertifiedKey(certificate, key)
        return _Issuer(wanted, signer, active=False)

    async def _current(self, issuer: _Issuer) -> bytes:
        # A request served by a check that began after it arrived sees every revocation
        # committed before it arrived: a burst of requests costs one query, not one each.
        arrived_after = self._checks.get(issuer.ca_id, 0)
        lock = self._locks.setdefault(issuer.ca_id, asyncio.Lock())
        async with lock:
            published = self._published.get(issuer.ca_id)
            now = self._clock.now()
            fresh = published is not None and now < published.refresh_at
            if fresh and published is not None and published.checked > arrived_after:
                return published.der
            check = self._checks[issuer.ca_id] = self._checks.get(issuer.ca_id, 0) + 1
            async with self._db.transaction() as session:
                revoked = await _revoked_state(session, issuer)
                if fresh and published is not None and published.revoked == revoked:
                    published.checked = check
                    return published.der
                entries = await _revoked_entries(session, issuer, now)
            number = self._next_number(now)
            crl = await asyncio.to_thread(
                build_crl, issuer.signer, entries, now=now, lifetime=self._lifetime, number=number
            )
            der = crl.public_bytes(serialization.Encoding.DER)
            self._published[issuer.ca_id] = _Published(
                der, revoked, refresh_at=now + self._lifetime / 2, checked=check
            )
        log.info(
            "published CRL number %d of intermediate %s: %d revoked certificate(s)",
            number,
            issuer.ca_id,
            len(entries),
        )
        return der

    def _next_number(self, now: datetime) -> int:
        """Milliseconds since the epoch: increasing across rebuilds and across replicas
        (as far as their clocks agree), and never repeated here."""
        self._last_number = max(int(now.timestamp() * 1000), self._last_number + 1)
        return self._last_number


def ca_routes(crls: CrlPublisher, bundle: Callable[[], bytes]) -> dict[str, Handler]:
    """The metrics listener's CA routes; ``bundle`` gives the current trust bundle PEM."""

    async def active_crl(_: str) -> Reply:
        return Reply(CRL_CONTENT_TYPE, await crls.active_crl())

    async def crl_by_id(wanted: str) -> Reply | None:
        der = await crls.crl(wanted)
        return None if der is None else Reply(CRL_CONTENT_TYPE, der)

    async def trust_bundle(_: str) -> Reply:
        return Reply(PEM_CONTENT_TYPE, bundle())

    return {"/ca/crl": active_crl, "/ca/crl/": crl_by_id, "/ca/bundle.pem": trust_bundle}


def _issued_by(issuer: _Issuer) -> ColumnElement[bool]:
    """Revoked certificates of ``issuer``."""
    issued = Certificate.issuer_id == issuer.ca_id
    if issuer.active:
        issued = or_(issued, Certificate.issuer_id.is_(None))
    return and_(Certificate.revoked_at.is_not(None), issued)


async def _revoked_state(session: AsyncSession, issuer: _Issuer) -> tuple[int, datetime | None]:
    row = (
        await session.execute(
            select(func.count(), func.max(Certificate.revoked_at)).where(_issued_by(issuer))
        )
    ).one()
    return int(row[0]), row[1]


async def _revoked_entries(
    session: AsyncSession, issuer: _Issuer, now: datetime
) -> list[RevokedEntry]:
    """The issuer's revoked certificates that have not expired (expired ones need no CRL)."""
    rows = await session.execute(
        select(Certificate.serial, Certificate.revoked_at, Certificate.revocation_reason)
        .where(_issued_by(issuer), Certificate.not_after > now)
        .order_by(Certificate.serial)
    )
    return [
        RevokedEntry(int(serial, 16), revoked_at, crl_reason(reason))
        for serial, revoked_at, reason in rows
    ]
