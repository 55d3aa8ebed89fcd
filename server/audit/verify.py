"""Checking the audit hash chains: every row's hash, every link, no gap in any chain.

Rows are streamed in (chain, seq) order, one page at a time, so a table of any size
is checked in constant memory, in one statement (one consistent snapshot even while
replicas keep appending). A chain is reported at its first broken row only: once a
link is broken, everything after it in that chain is unproven anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from muster.server.audit.chain import GENESIS, HASHED_FIELDS, row_hash
from muster.server.storage.database import Database
from muster.server.storage.models import AuditEvent

PAGE_ROWS = 1000


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first row of a chain that does not check out, and why."""

    chain: str
    seq: int
    id: int
    problem: str

    def __str__(self) -> str:
        return f"chain {self.chain}: row seq {self.seq} (id {self.id}): {self.problem}"


@dataclass(slots=True)
class ChainResult:
    """What was found in one chain."""

    chain: str
    rows: int = 0
    broken: ChainBreak | None = None


@dataclass(slots=True)
class VerifyReport:
    """The outcome of :func:`verify`: ``ok`` only if every chain checked out."""

    chains: list[ChainResult] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chains)

    @property
    def breaks(self) -> list[ChainBreak]:
        return [c.broken for c in self.chains if c.broken is not None]

    @property
    def ok(self) -> bool:
        return not self.breaks

    def summary(self) -> str:
        if self.ok:
            return f"OK: {self.rows} rows in {len(self.chains)} chains"
        return (
            f"FAILED: {len(self.breaks)} of {len(self.chains)} chains broken "
            f"({self.rows} rows read)"
        )


async def verify(db: Database, chain: str | None = None) -> VerifyReport:
    """Walk every chain (or just ``chain``) in seq order and recompute every hash."""
    columns = [getattr(AuditEvent, name) for name in ("id", "hash", *HASHED_FIELDS)]
    query = select(*columns).order_by(AuditEvent.chain, AuditEvent.seq)
    if chain is not None:
        query = query.where(AuditEvent.chain == chain)
    report = VerifyReport()
    current: ChainResult | None = None
    last_seq, last_hash = 0, GENESIS
    async with db.transaction() as session:
        result = await session.stream(query.execution_options(yield_per=PAGE_ROWS))
        async for page in result.partitions():
            for row in page:
                values = row._asdict()
                if current is None or values["chain"] != current.chain:
                    current = ChainResult(values["chain"])
                    report.chains.append(current)
                    last_seq, last_hash = 0, GENESIS
                current.rows += 1
                if current.broken is not None:
                    continue
                problem = _check(values, last_seq, last_hash)
                if problem is not None:
                    current.broken = ChainBreak(
                        values["chain"], values["seq"], values["id"], problem
                    )
                last_seq, last_hash = values["seq"], values["hash"]
    return report


def _check(values: Mapping[str, Any], last_seq: int, last_hash: str) -> str | None:
    """What is wrong with a row given the row before it in its chain, or None."""
    seq = values["seq"]
    if seq != last_seq + 1:
        return f"gap after seq {last_seq}"
    if row_hash(values) != values["hash"]:
        return "hash mismatch"
    if values["prev_hash"] != last_hash:
        if last_seq == 0:
            return "prev_hash is not the genesis hash"
        return f"prev_hash does not match seq {last_seq}"
    return None
