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
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any, NamedTuple

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from muster.server.storage.models import AuditEvent

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
COLUMNS = (
    "event_id",
    "time",
    "actor",
    "action",
    "target",
    "outcome",
    "peer",
    "request_id",
    "details",
    "chain",
    "seq",
    "prev_hash",
    "hash",
)
"""The order of the values in a linked row (:func:`link`); ``details`` is JSON text."""


def row_hash(row: Mapping[str, Any]) -> str:
    """The hash of one row: every field but ``id`` and ``hash``, canonically encoded.

    This is the definition :mod:`muster.server.audit.verify` checks against; :class:`Content`
    computes the same bytes piecewise, so appending does not encode a row twice.
    """
    canonical = {name: row[name] for name in HASHED_FIELDS}
    time = canonical["time"]
    if isinstance(time, datetime):  # the database hands times back in UTC: hash them so
        canonical["time"] = time.astimezone(UTC).isoformat(timespec="microseconds")
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


class Content(NamedTuple):
    """A row's content, encoded once, waiting for its place in a chain.

    ``values`` are the first nine :data:`COLUMNS`. The canonical JSON that
    :func:`row_hash` hashes is ``before_chain + chain + before_prev + prev_hash +
    before_seq + seq + rest`` (its keys sorted: action, actor, chain, details, event_id,
    outcome, peer, prev_hash, request_id, seq, target, time).
    """

    values: tuple[Any, ...]
    before_chain: bytes
    before_prev: bytes
    before_seq: bytes
    rest: bytes

    @classmethod
    def of(
        cls,
        event_id: str,
        time: datetime,
        texts: tuple[str, str, str, str, str, str],
        details_json: str,
    ) -> Content:
        """``texts`` are actor, action, target, outcome, peer, request_id; ``details_json``
        is canonical JSON (sorted keys, no spaces, not ASCII-escaped)."""
        actor, action, target, outcome, peer, request_id = texts
        utc = time if time.tzinfo is UTC else time.astimezone(UTC)
        stamp = utc.isoformat(timespec="microseconds")
        j = encode_basestring  # the JSON string encoder json.dumps(ensure_ascii=False) uses
        return cls(
            (event_id, time, *texts, details_json),
            f'{{"action":{j(action)},"actor":{j(actor)},"chain":'.encode(),
            (
                f',"details":{details_json},"event_id":{j(event_id)},"outcome":{j(outcome)},'
                f'"peer":{j(peer)},"prev_hash":"'
            ).encode(),
            f'","request_id":{j(request_id)},"seq":'.encode(),
            f',"target":{j(target)},"time":"{stamp}"}}'.encode(),
        )


def link(contents: Sequence[Content], chain: str, tip: tuple[int, str]) -> list[tuple[Any, ...]]:
    """Rows (values in :data:`COLUMNS` order) placing ``contents`` in ``chain`` after ``tip``."""
    seq, prev = tip
    chain_json = encode_basestring(chain).encode()
    sha256 = hashlib.sha256
    rows = []
    for c in contents:
        seq += 1
        digest = sha256(
            b"".join(
                (
                    c.before_chain,
                    chain_json,
                    c.before_prev,
                    prev.encode(),
                    c.before_seq,
                    str(seq).encode(),
                    c.rest,
                )
            )
        ).hexdigest()
        rows.append((*c.values, chain, seq, prev, digest))
        prev = digest
    return rows


def lock_key(chain: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``chain``."""
    return int.from_bytes(
        hashlib.sha256(b"muster-audit:" + chain.encode()).digest()[:8], "big", signed=True
    )


_LOCK = text("SELECT pg_advisory_xact_lock(:key)")  # built once: its cache key is kept


async def lock_chain(session: AsyncSession | AsyncConnection, chain: str) -> None:
    """Lock ``chain`` until this transaction ends (Postgres; SQLite has one writer)."""
    dialect = session.dialect if isinstance(session, AsyncConnection) else session.bind.dialect
    if dialect.name == "postgresql":
        await session.execute(_LOCK, {"key": lock_key(chain)})


_TIP = select(AuditEvent.seq, AuditEvent.hash).where(
    AuditEvent.chain == bindparam("chain"),
    AuditEvent.seq
    == select(func.max(AuditEvent.seq))
    .where(AuditEvent.chain == bindparam("chain"))
    .scalar_subquery(),
)


async def chain_tip(session: AsyncSession | AsyncConnection, chain: str) -> tuple[int, str]:
    """Lock ``chain`` for this transaction and return its last (seq, hash)."""
    await lock_chain(session, chain)
    row = (await session.execute(_TIP, {"chain": chain})).first()
    return (row[0], row[1]) if row is not None else (0, GENESIS)
