"""Keeping a replica's CA in step with the shared record, without a restart.

Every replica reads ``ca_certificates`` at start (recording the CA directory there the
first time), then, on each reaper pass, checks whether it changed (one small query) and
if so reloads: the issuing intermediate, the trust bundle (which the mTLS listener's
credential fetcher serves from the next handshake on) and ``ca/bundle.pem``, then tells
the rest of the server (``on_change``: the server certificate, the agents' streams).
Issuing checks too, in its own transaction, so a rotation is followed at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from sqlalchemy.ext.asyncio import AsyncSession

from muster.server.ca.authority import (
    CA_FILES,
    INTERMEDIATE_CERT,
    KEY_REF_FILES,
    CertificateAuthority,
)
from muster.server.ca.crl import ca_id
from muster.server.ca.keystore import KeyStore
from muster.server.ca.rotation import import_directory, write_bundle
from muster.server.ca.state import CAState
from muster.server.storage import ca as ca_store
from muster.server.storage.database import Database

log = logging.getLogger(__name__)


class CAReloader:
    """Owns this replica's :class:`CertificateAuthority` and keeps it current."""

    def __init__(
        self,
        ca: CertificateAuthority,
        db: Database,
        keys: KeyStore,
        ca_dir: Path,
        state: CAState,
    ) -> None:
        self.ca = ca
        self._db = db
        self._keys = keys
        self._ca_dir = Path(ca_dir)
        self._state = state
        self._applied = self._applying()
        """What the effects (bundle file, ``on_change``) were last applied for."""
        self._lock = asyncio.Lock()
        self.on_change: Callable[[], None] = lambda: None
        """Called after a reload on the event loop: push the bundle, reissue what must be."""

    @classmethod
    async def open(
        cls,
        db: Database,
        keys: KeyStore,
        ca_dir: Path,
        trust_domain: str,
        *,
        crl_url: str = "",
        init_keys: KeyStore | None = None,
    ) -> CAReloader:
        """This replica's CA from the shared record. At the very first start (no CA files,
        nothing recorded) a CA is created in ``ca_dir`` (keys in ``init_keys`` if given,
        else files); while nothing is recorded, the directory's CA is recorded."""
        async with db.transaction() as session:
            recorded = bool(await ca_store.generation(session))
        if not recorded and not any(
            (ca_dir / name).exists() for name in (*CA_FILES, *KEY_REF_FILES)
        ):
            CertificateAuthority.init(ca_dir, trust_domain, keys=init_keys)
        async with db.transaction() as session:
            if not recorded:
                await import_directory(session, ca_dir, actor="server")
            state = await ca_store.load(session)
        ca = CertificateAuthority.from_state(trust_domain, state, keys, crl_url=crl_url)
        _check_directory(ca_dir, state)
        if ca.cannot_issue is not None:
            log.error("the CA cannot issue: %s", ca.cannot_issue)
        write_bundle(ca_dir, state)
        return cls(ca, db, keys, ca_dir, state)

    @property
    def state(self) -> CAState:
        return self._state

    def _applying(self) -> tuple[object, bool]:
        """A new generation, or the issuing key usable again (its file was copied in):
        either calls for the effects (a server certificate from the issuing intermediate)."""
        return self._state.generation, self.ca.cannot_issue is None

    async def sync(self, session: AsyncSession) -> bool:
        """Reload from the shared record in ``session`` if it changed (or the issuing key
        could not be used last time); True if reloaded. Issuing calls this first, so a
        certificate comes from the intermediate active at that moment."""
        # Outside the lock: this first query may wait for a pooled connection, and one
        # held by another caller waiting for the lock would never come back (SQLite has one).
        generation = await ca_store.generation(session)
        if generation == self._state.generation and self.ca.cannot_issue is None:
            return False
        async with self._lock:  # one reload at a time; each statement sees what is committed
            state = await ca_store.load(session)
            if state.generation == self._state.generation and self.ca.cannot_issue is None:
                return False  # another caller reloaded it meanwhile
            problem = self.ca.cannot_issue
            self.ca.adopt(state, self._keys)
            self._state = state
        if self.ca.cannot_issue is not None and self.ca.cannot_issue != problem:
            log.error("the CA cannot issue: %s", self.ca.cannot_issue)
        return True

    async def refresh(self) -> None:
        """One reload pass: sync, then apply what a new generation changes here."""
        async with self._db.transaction() as session:
            await self.sync(session)
        if self._applying() == self._applied:
            return
        self._applied = self._applying()
        state = self._state
        write_bundle(self._ca_dir, state)
        log.info(
            "reloaded the CA: trust bundle version %d (%d roots), issuing from intermediate %s",
            state.version,
            len(state.bundle_roots),
            self.ca.issuer_id,
        )
        self.on_change()


def _check_directory(ca_dir: Path, state: CAState) -> None:
    """Warn when the CA directory holds a CA the record does not know (``muster ca init
    --force`` after the first start): the record wins, and that CA is not used."""
    try:
        found = x509.load_pem_x509_certificate((ca_dir / INTERMEDIATE_CERT).read_bytes())
    except (OSError, ValueError):
        return
    if state.get(ca_id(found)) is None:
        log.warning(
            "%s is not a CA certificate the database records: the database's CA is used "
            "(see muster ca status); a CA made later with 'muster ca init --force' is not",
            ca_dir / INTERMEDIATE_CERT,
        )
