"""One audit row, and writing it inside the caller's transaction (no audit, no change)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from server.audit.chain import chain_tip, link
from server.storage.database import CHAIN_KEY
from server.storage.models import AuditEvent
from server.storage.types import utcnow


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What happened, who did it, to what, and how it ended. ``details`` never holds secrets."""

    actor: str
    action: str
    target: str = ""
    outcome: str = "ok"
    peer: str = ""
    request_id: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    time: datetime = field(default_factory=utcnow)
    event_id: str = field(default_factory=lambda: secrets.token_hex(16))

    def row(self) -> dict[str, Any]:
        """The columns of this record's row, cut to the column sizes.

        ``details`` goes through JSON here so its hash is computed over what the database
        will hand back (integer keys become strings, tuples lists).
        """
        return {
            "event_id": self.event_id,
            "time": self.time,
            "actor": _text(self.actor, 200),
            "action": _text(self.action, 64),
            "target": _text(self.target, 200),
            "outcome": _text(self.outcome, 16),
            "peer": _text(self.peer, 100),
            "request_id": _text(self.request_id, 64),
            "details": json.loads(json.dumps(self.details)),
        }

    def check(self) -> None:
        """Raise ValueError or TypeError now if this record could never be stored.

        The batch writer calls it on submit, so a bad record fails at its source instead
        of blocking every later event behind it.
        """
        if self.time.tzinfo is None:
            raise ValueError("audit record time must be timezone-aware")
        if not 1 <= len(self.event_id) <= 32:
            raise ValueError("audit record event_id must be 1 to 32 characters")
        texts = (self.actor, self.action, self.target, self.outcome, self.peer, self.request_id)
        encoded = json.dumps([*texts, self.details], allow_nan=False, ensure_ascii=False)
        encoded.encode()  # lone surrogates cannot be stored (nor hashed)


def _text(value: str, size: int) -> str:
    """``value`` cut to its column; NUL, which Postgres text refuses, shown as U+FFFD."""
    return value.replace("\x00", "\ufffd")[:size]


async def record_in(session: AsyncSession, *records: AuditRecord) -> None:
    """Append audit rows in the caller's transaction, so they commit or roll back with it."""
    if not records:
        return
    chain = session.info[CHAIN_KEY]
    rows = link([r.row() for r in records], chain, await chain_tip(session, chain))
    await session.execute(insert(AuditEvent), rows)


async def append_new(session: AsyncSession, records: Sequence[AuditRecord]) -> int:
    """Append the records whose ``event_id`` is not stored yet, in order; returns how many.

    Makes retries exactly-once: a batch whose commit went through but whose
    acknowledgement was lost is found here and not inserted again. The chain is locked
    before looking, so an earlier attempt still committing finishes first.
    """
    if not records:
        return 0
    chain = session.info[CHAIN_KEY]
    tip = await chain_tip(session, chain)
    ids = list({r.event_id for r in records})
    present = set(
        (await session.execute(select(AuditEvent.event_id).where(AuditEvent.event_id.in_(ids))))
        .scalars()
        .all()
    )
    fresh = []
    for record in records:
        if record.event_id not in present:
            present.add(record.event_id)
            fresh.append(record.row())
    if fresh:
        await session.execute(insert(AuditEvent), link(fresh, chain, tip))
    return len(fresh)
