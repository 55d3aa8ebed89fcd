"""The async engine and session factory, configured per backend."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from muster.server.storage.batch import GroupCommit, Trail, Work
from muster.server.storage.taskstore import TaskStore, open_task_store

T = TypeVar("T")

CHAIN_KEY = "audit_chain"
"""``AsyncSession.info`` key naming the audit chain this process appends to."""

log = logging.getLogger(__name__)


class Database:
    """Owns the engine. Services touch the database through ``transaction()`` (an ORM
    session), ``batched()`` for small writes, and ``tasks``, the task store, whose hot
    path group-commits by itself."""

    def __init__(
        self,
        url: str,
        *,
        audit_chain: str,
        echo: bool = False,
        pool_size: int = 10,
        pool_timeout: float = 30.0,
    ) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo}
        if self.dialect == "sqlite":
            # SQLite allows one writer; a single pooled connection serialises our
            # transactions instead of failing them with "database is locked".
            kwargs.update(pool_size=1, max_overflow=0, connect_args={"timeout": 30})
        else:
            kwargs.update(
                pool_size=pool_size,
                max_overflow=pool_size,
                pool_timeout=pool_timeout,
                # No pre-ping (a round trip per transaction): a connection found dead
                # fails one transaction, its callers retry, and the pool replaces it.
                pool_recycle=3600,
            )
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.dialect == "sqlite":
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._sessions = async_sessionmaker(
            self.engine, expire_on_commit=False, info={CHAIN_KEY: audit_chain}
        )
        self._autocommit_reads = self.dialect != "sqlite"
        """Reads without BEGIN/COMMIT (see ``reading``); SQLite is in-process: no round trips."""
        self.audit_chain = audit_chain
        self.group = GroupCommit(self.engine, trail=_audit_trail(audit_chain))
        self.tasks: TaskStore = open_task_store(self.dialect, self.group)
        """The task store for this backend, picked here once (storage/taskstore)."""

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction that commits on success and rolls back on any error."""
        async with self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads that need no transaction of their own (one statement,
        or statements that need not see one snapshot); it must not write. On Postgres it
        runs in autocommit: no BEGIN and COMMIT, two of a lone read's three round trips
        (a Watch reads its task at every change)."""
        async with self.engine.connect() as conn:
            if self._autocommit_reads:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    async def batched(self, work: Work[T]) -> T:
        """Run ``work`` (Core statements on the connection it is given) in a transaction
        shared with whatever other small writes arrive meanwhile; see storage/batch.py."""
        return await self.group.run(work)

    async def close(self) -> None:
        await self.group.close()
        await self.engine.dispose()


def _audit_trail(chain: str) -> Trail:
    """Appends the group commit's audit records to ``chain`` in its transaction."""
    # Imported here: the audit package builds on this module.
    from muster.server.audit.record import append_in

    async def append(conn: AsyncConnection, records: list[Any]) -> None:
        await append_in(conn, chain, records)

    return append


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
