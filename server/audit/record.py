"""One audit row, and writing it inside the caller's transaction (no audit, no change)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

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

    def row(self) -> dict[str, Any]:
        return {
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
    """Insert audit rows in the caller's transaction, so they commit or roll back with it."""
    if records:
        await session.execute(insert(AuditEvent), [r.row() for r in records])
