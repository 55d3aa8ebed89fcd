"""One audit row, and writing it inside the caller's transaction (no audit, no change)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from muster.server.audit.chain import (
    COLUMNS,
    GENESIS,
    Content,
    chain_tip,
    link,
    lock_chain,
    lock_key,
)
from muster.server.storage.database import CHAIN_KEY
from muster.server.storage.models import AuditEvent
from muster.server.storage.types import utcnow

_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False)
_CANONICAL_JSON = json.JSONEncoder(  # only ever given acyclic values: no need to check
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":"), check_circular=False
)
_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


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
    _content: Content | None = field(default=None, init=False, repr=False, compare=False)

    def content(self) -> Content:
        """This record's row content, cut to the column sizes and encoded (once, then kept).

        Raises ValueError or TypeError if the record could never be stored. ``details``
        is stored as canonical JSON of what JSON hands back (integer keys become strings,
        tuples lists), so its hash is computed over what the database will return.
        """
        if self._content is not None:
            return self._content
        if self.time.tzinfo is None:
            raise ValueError("audit record time must be timezone-aware")
        if not 1 <= len(self.event_id) <= 32:
            raise ValueError("audit record event_id must be 1 to 32 characters")
        details: Any = self.details
        if not _plain_json(details):
            details = json.loads(_JSON.encode(details))
        content = Content.of(
            self.event_id,
            self.time,
            (
                _text(self.actor, 200),
                _text(self.action, 64),
                _text(self.target, 200),
                _text(self.outcome, 16),
                _text(self.peer, 100),
                _text(self.request_id, 64),
            ),
            _CANONICAL_JSON.encode(details),
        )  # encodes to UTF-8: lone surrogates cannot be stored (nor hashed)
        object.__setattr__(self, "_content", content)
        return content

    def check(self) -> None:
        """Raise ValueError or TypeError now if this record could never be stored.

        The batch writer calls it on submit, so a bad record fails at its source instead
        of blocking every later event behind it.
        """
        self.content()


def _text(value: str, size: int) -> str:
    """``value`` cut to its column; NUL, which Postgres text refuses, shown as U+FFFD."""
    if not isinstance(value, str):
        raise TypeError(f"audit record text fields must be str, not {type(value).__name__}")
    return value.replace("\x00", "\ufffd")[:size]


def _plain_json(value: Any, depth: int = 0) -> bool:
    """Whether JSON hands ``value`` back as it is (str keys, lists, scalars): no round trip."""
    if depth > 20:  # deep, or circular: let the encoder judge
        return False
    if type(value) is dict:
        if any(type(key) is not str for key in value):
            return False
        children: Any = value.values()
    elif type(value) is list:
        children = value
    else:
        return type(value) in _JSON_SCALARS
    for child in children:
        if type(child) not in _JSON_SCALARS and not _plain_json(child, depth + 1):
            return False
    return True


async def record_in(session: AsyncSession, *records: AuditRecord) -> None:
    """Append audit rows in the caller's transaction, so they commit or roll back with it.

    The chain stays locked until that transaction ends: make this its last statement, so
    a transaction holding the lock never waits for a row lock another one holds."""
    if not records:
        return
    chain = session.info[CHAIN_KEY]
    contents = [r.content() for r in records]
    if session.new or session.dirty or session.deleted:
        # Changed ORM objects are written now, not at the commit: nothing but the audit
        # rows is written under the chain's lock (the group commit waits for it while
        # holding row locks of its own).
        await session.flush()
    if session.bind.dialect.name != "postgresql":
        await _insert(session, link(contents, chain, await chain_tip(session, chain)))
        return
    driver = await _asyncpg(session)
    await _append_pg(driver, chain, contents, locked=await _begin_locked(session, driver, chain))


async def append_in(conn: AsyncConnection, chain: str, records: Sequence[AuditRecord]) -> None:
    """:func:`record_in` on a Core connection inside a transaction (the group commit's)."""
    if not records:
        return
    contents = [r.content() for r in records]
    if conn.dialect.name != "postgresql":
        await _insert(conn, link(contents, chain, await chain_tip(conn, chain)))
        return
    driver = (await conn.get_raw_connection()).driver_connection
    assert isinstance(driver, asyncpg.Connection)
    await _append_pg(driver, chain, contents, locked=await _begin_locked(conn, driver, chain))


async def _begin_locked(
    session: AsyncSession | AsyncConnection, driver: asyncpg.Connection, chain: str
) -> bool:
    """When nothing ran in this transaction yet, SQLAlchemy has not begun it: begin it with
    the chain's lock (its first statement) and say so; else leave the locking to the caller."""
    if driver.is_in_transaction():
        return False
    await lock_chain(session, chain)
    return True


async def _append_pg(
    driver: asyncpg.Connection, chain: str, contents: list[Content], *, locked: bool
) -> None:
    """Lock ``chain`` (unless ``locked``) until the transaction ends and insert ``contents``
    after its tip: two round trips, the lock and an insert after the tip this process last
    wrote, which inserts nothing unless that is still the tip (then the tip is read)."""
    if not locked:
        await driver.execute(_LOCK, lock_key(chain))
    tip = _tips.get(chain, (0, GENESIS))
    rows = link(contents, chain, tip)
    if not await _insert_after(driver, rows, chain, tip):
        # Another transaction or process moved the tip since this one saw it: read it.
        tip = await _read_tip(driver, chain)
        rows = link(contents, chain, tip)
        if not await _insert_after(driver, rows, chain, tip):
            raise RuntimeError(f"audit chain {chain!r} moved while locked")
    _remember(chain, rows)


async def append_new(
    session: AsyncSession, records: Sequence[AuditRecord], *, unseen: bool = False
) -> int:
    """Append the records whose ``event_id`` is not stored yet, in order; returns how many.

    Makes retries exactly-once: a batch whose commit went through but whose
    acknowledgement was lost is found here and not inserted again. The chain is locked
    before looking, so an earlier attempt still committing finishes first. ``unseen``
    (the first attempt at records never sent before) skips looking in the table; an
    event id stored already then fails the append (a unique violation). On Postgres the
    rows go in with COPY, in the same transaction (and under the same lock).
    """
    if not records:
        return 0
    chain = session.info[CHAIN_KEY]
    contents = [r.content() for r in records]  # before the lock: nothing to encode under it
    tip = await chain_tip(session, chain)
    present = set() if unseen else await _stored_event_ids(session, [r.event_id for r in records])
    fresh = []
    for record, content in zip(records, contents, strict=True):
        if record.event_id not in present:
            present.add(record.event_id)
            fresh.append(content)
    if not fresh:
        return 0
    rows = link(fresh, chain, tip)
    if session.bind.dialect.name == "postgresql":
        driver = await _asyncpg(session)
        await driver.copy_records_to_table("audit_events", records=rows, columns=COLUMNS)
        _remember(chain, rows)
    else:
        await _insert(session, rows)
    return len(fresh)


async def _stored_event_ids(session: AsyncSession, ids: list[str]) -> set[str]:
    if session.bind.dialect.name == "postgresql":  # one parameter, not one per id
        driver = await _asyncpg(session)
        sql = "SELECT event_id FROM audit_events WHERE event_id = ANY($1::text[])"
        return {row[0] for row in await driver.fetch(sql, ids)}
    query = select(AuditEvent.event_id).where(AuditEvent.event_id.in_(ids))
    return set((await session.execute(query)).scalars())


async def _asyncpg(session: AsyncSession) -> asyncpg.Connection:
    """The asyncpg connection under ``session``. SQLAlchemy begins the transaction on it with
    its first statement: until then, what runs here runs outside of it."""
    connection = await session.connection()
    driver = (await connection.get_raw_connection()).driver_connection
    assert isinstance(driver, asyncpg.Connection)
    return driver


# Postgres: record_in appends with asyncpg directly (no ORM, prepared statements), in two
# round trips: the chain's lock, then an insert after the tip this process last wrote,
# which inserts nothing unless that is still the tip.
_tips: dict[str, tuple[int, str]] = {}
"""The (seq, hash) this process last appended to each chain: a guess that saves reading
the tip. A transaction that rolled back, or another process on the same chain, makes it
stale; the insert then finds a different tip and inserts nothing, and the tip is read."""
_SEQ, _HASH = COLUMNS.index("seq"), COLUMNS.index("hash")
_LOCK = "SELECT pg_advisory_xact_lock($1)"
_TIP = "SELECT seq, hash FROM audit_events WHERE chain = $1 ORDER BY seq DESC LIMIT 1"
_INSERT_AFTER = """
INSERT INTO audit_events (event_id, time, actor, action, target, outcome, peer, request_id,
                          details, chain, seq, prev_hash, hash)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::text[], $9::json[], $10::text[],
                     $11::bigint[], $12::text[], $13::text[])
WHERE NOT EXISTS (SELECT FROM audit_events WHERE chain = $14 AND seq > $15)
  AND ($15 = 0 OR EXISTS (SELECT FROM audit_events WHERE chain = $14 AND seq = $15
                                                        AND hash = $16))
"""


async def _insert_after(
    driver: asyncpg.Connection, rows: list[tuple[Any, ...]], chain: str, tip: tuple[int, str]
) -> bool:
    """Insert ``rows`` if ``tip`` is the chain's last row (the lock is held); else nothing."""
    status = await driver.execute(_INSERT_AFTER, *zip(*rows, strict=True), chain, *tip)
    return bool(status != "INSERT 0 0")


async def _read_tip(driver: asyncpg.Connection, chain: str) -> tuple[int, str]:
    row = await driver.fetchrow(_TIP, chain)
    return (row[0], row[1]) if row is not None else (0, GENESIS)


def _remember(chain: str, rows: list[tuple[Any, ...]]) -> None:
    _tips[chain] = (rows[-1][_SEQ], rows[-1][_HASH])


async def _insert(session: AsyncSession | AsyncConnection, rows: list[tuple[Any, ...]]) -> None:
    """Insert linked rows through SQLAlchemy (any backend)."""
    details = COLUMNS.index("details")
    await session.execute(
        insert(AuditEvent),
        [
            {**dict(zip(COLUMNS, row, strict=True)), "details": json.loads(row[details])}
            for row in rows
        ],
    )
