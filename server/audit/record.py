"""One audit row, and writing it inside the caller's transaction (no audit, no change)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert
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
        return {
            "event_id": self.event_id,
            "time": self.time,
            "actor": self.actor[:200],
            "action": self.action,
            "target": self.target[:200],
            "outcome": self.outcome,
            "peer": self.peer[:100],
            "request_id": self.request_id[:64],
            "details": self.details,
        }


async def record_in(session: AsyncSession, *records: AuditRecord) -> None:
    """Append audit rows in the caller's transaction, so they commit or roll back with it."""
    if not records:
        return
    chain = session.info[CHAIN_KEY]
    rows = link([r.row() for r in records], chain, await chain_tip(session, chain))
    await session.execute(insert(AuditEvent), rows)
