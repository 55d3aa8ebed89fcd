"""The task store: every read and transition of tasks, behind one contract (base.py)
with one implementation per backend, picked once when the database is opened."""

from __future__ import annotations

from muster.server.storage.batch import GroupCommit
from muster.server.storage.taskstore.base import (
    CLAIM_SCAN,
    MAX_RATE_LIMITED,
    OVERDUE_BATCH,
    Acceptance,
    Claimed,
    ClaimRequest,
    Current,
    Ended,
    Ending,
    Finished,
    Held,
    HoldBack,
    Retry,
    TaskStore,
    TimedOut,
    attempt_key,
)

__all__ = [
    "CLAIM_SCAN",
    "MAX_RATE_LIMITED",
    "OVERDUE_BATCH",
    "Acceptance",
    "ClaimRequest",
    "Claimed",
    "Current",
    "Ended",
    "Ending",
    "Finished",
    "Held",
    "HoldBack",
    "Retry",
    "TaskStore",
    "TimedOut",
    "attempt_key",
    "open_task_store",
]


def open_task_store(dialect: str, group: GroupCommit) -> TaskStore:
    """The store for a database of this dialect (``sqlite`` or ``postgresql``), writing
    its hot path through ``group``."""
    if dialect == "postgresql":
        from muster.server.storage.taskstore.postgres import PostgresTaskStore

        return PostgresTaskStore(group)
    if dialect == "sqlite":
        from muster.server.storage.taskstore.sqlite import SqliteTaskStore

        return SqliteTaskStore(group)
    raise ValueError(f"no task store for the {dialect!r} database dialect")
