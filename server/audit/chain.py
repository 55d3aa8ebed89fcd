"""Hash chains over the audit trail, so a changed, removed or reordered row is detectable.

Each replica appends to its own chain. A row's ``hash`` is the SHA-256 of its content
and of ``prev_hash``, the previous row's hash in the same chain (``seq`` - 1); the first
row's ``prev_hash`` is :data:`GENESIS`. Appends to one chain are serialised: on Postgres
by a transaction-scoped advisory lock (released at commit or rollback, so a rolled-back
append never leaves a gap), on SQLite by its single writer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from server.storage.models import AuditEvent

GENESIS = "0" * 64
HASHED_FIELDS = (
    "event_id",
    "chain",
    "seq",
    "prev_hash",
    "time",
    "actor",
    "action",
    "target",
    "outcome",
    "peer",
    "request_id",
    "details",
)


def row_hash(row: Mapping[str, Any]) -> str:
    """The hash of one row: every field but ``id`` and ``hash``, canonically encoded."""
    canonical = {name: row[name] for name in HASHED_FIELDS}
    time = canonical["time"]
    if isinstance(time, datetime):  # the database hands times back in UTC: hash them so
        canonical["time"] = time.astimezone(UTC).isoformat(timespec="microseconds")
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


def _lock_key(chain: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``chain``."""
    return int.from_bytes(
        hashlib.sha256(b"muster-audit:" + chain.encode()).digest()[:8], "big", signed=True
    )


async def chain_tip(session: AsyncSession, chain: str) -> tuple[int, str]:
    """Lock ``chain`` for this transaction and return its last (seq, hash)."""
    if session.bind.dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(chain)})
    last = await session.execute(
        select(AuditEvent.seq, AuditEvent.hash).where(
            AuditEvent.chain == chain,
            AuditEvent.seq
            == select(func.max(AuditEvent.seq)).where(AuditEvent.chain == chain).scalar_subquery(),
        )
    )
    row = last.first()
    return (row[0], row[1]) if row is not None else (0, GENESIS)


def link(rows: list[dict[str, Any]], chain: str, tip: tuple[int, str]) -> list[dict[str, Any]]:
    """Give each row its place in ``chain`` after ``tip``, and its hash."""
    seq, prev = tip
    for row in rows:
        seq += 1
        row.update(chain=chain, seq=seq, prev_hash=prev)
        row["hash"] = prev = row_hash(row)
    return rows
