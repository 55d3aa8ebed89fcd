"""Migrations: an empty database upgraded to head has exactly the models' schema, on SQLite
and Postgres; the server migrates or refuses to start as configured; audit rows cannot be
changed on either backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from muster.errors import ConfigError
from muster.server.app import start_server
from muster.server.storage import migrate
from muster.server.storage.database import Database
from muster.server.storage.models import AuditEvent, Base
from tests.conftest import server_config
from tests.pg import fresh_database

pytestmark = pytest.mark.slow

APPEND_ONLY = "audit_events is append-only"


@pytest.fixture(params=["sqlite", "postgresql"])
async def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of each backend."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'muster.db'}"
    else:
        async with fresh_database(migrated=False) as url:
            yield url


@asynccontextmanager
async def database(url: str, **kwargs: Any) -> AsyncIterator[Database]:
    db = Database(url, audit_chain="test", **kwargs)
    try:
        yield db
    finally:
        await db.close()


def schema_diffs(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def audit_row(n: int = 1) -> dict[str, Any]:
    return {
        "event_id": f"e{n:031d}",
        "chain": "test",
        "seq": n,
        "prev_hash": "0" * 64,
        "hash": "1" * 64,
        "time": datetime.now(UTC),
        "actor": "spiffe://muster.local/agent/a1",
        "action": "task.claim",
        "target": "t1",
        "outcome": "ok",
        "peer": "127.0.0.1",
        "request_id": "r1",
        "details": {"k": "v"},
    }


async def test_upgrade_empty_database_matches_models(empty_url: str) -> None:
    async with database(empty_url) as db:
        with pytest.raises(ConfigError) as refused:
            await migrate.check_at_head(db)
        assert str(refused.value) == (
            "database schema is at revision none (empty database), "
            f"expected {migrate.head_revision()}: run 'muster db upgrade'"
        )

        await migrate.upgrade(empty_url)

        assert await migrate.current_revision(db) == migrate.head_revision()
        await migrate.check_at_head(db)
        async with db.engine.connect() as conn:
            assert await conn.run_sync(schema_diffs) == []
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert tables == set(Base.metadata.tables) | {"alembic_version"}


async def test_upgrade_twice_at_once_is_harmless(empty_url: str) -> None:
    # Replicas started together with migrate=yes: the advisory lock (Postgres) makes
    # the second wait and find nothing to do.
    if empty_url.startswith("sqlite"):
        await migrate.upgrade(empty_url)
        await migrate.upgrade(empty_url)
    else:
        await asyncio.gather(migrate.upgrade(empty_url), migrate.upgrade(empty_url))
    assert await migrate.current_revision(empty_url) == migrate.head_revision()


async def test_downgrade_to_empty_and_back(empty_url: str) -> None:
    def downgrade(connection: Connection) -> None:
        config = migrate.alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "base")

    await migrate.upgrade(empty_url)
    async with database(empty_url) as db:
        async with db.engine.begin() as conn:
            await conn.run_sync(downgrade)
        async with db.engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert tables <= {"alembic_version"}
        assert await migrate.current_revision(db) is None
        await migrate.upgrade(db)
        await migrate.check_at_head(db)


async def test_audit_rows_cannot_be_changed(empty_url: str) -> None:
    await migrate.upgrade(empty_url)
    async with database(empty_url) as db:
        async with db.transaction() as session:
            await session.execute(insert(AuditEvent), [audit_row(1), audit_row(2)])
        for statement in (
            update(AuditEvent).values(outcome="forged"),
            text("DELETE FROM audit_events WHERE seq = 2"),
        ):
            with pytest.raises(DBAPIError, match=APPEND_ONLY):
                async with db.transaction() as session:
                    await session.execute(statement)
        if db.dialect == "postgresql":
            with pytest.raises(DBAPIError, match=APPEND_ONLY):
                async with db.transaction() as session:
                    await session.execute(text("TRUNCATE audit_events"))
        async with db.transaction() as session:
            rows = (await session.execute(text("SELECT outcome FROM audit_events"))).all()
        assert [r.outcome for r in rows] == ["ok", "ok"]


def test_offline_sql_carries_the_guard() -> None:
    pg = migrate.upgrade_sql("postgresql+asyncpg://owner@db.example/muster")
    assert "CREATE TABLE audit_events" in pg
    assert "BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_events" in pg
    sqlite = migrate.upgrade_sql("sqlite+aiosqlite:///muster.db")
    assert "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events" in sqlite


async def test_server_on_postgres_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    async with fresh_database(migrated=False) as url:
        for mode in ("auto", "no"):
            config = server_config(tmp_path / "data", database_url=url, migrate=mode)
            with pytest.raises(ConfigError, match="run 'muster db upgrade'"):
                await start_server(config)
        assert await migrate.current_revision(url) is None


async def test_server_migrates_postgres_when_asked_and_uses_pool_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with fresh_database(migrated=False) as url:
        config = server_config(
            tmp_path / "data",
            database_url=url,
            migrate="yes",
            database_pool_size=1,
            database_pool_timeout=timedelta(seconds=0.2),
            database_echo=True,
        )
        handle = await start_server(config)
        try:
            assert await migrate.current_revision(url) == migrate.head_revision()
            engine = handle.db.engine
            assert engine.dialect.name == "postgresql" and engine.dialect.driver == "asyncpg"
            assert engine.echo is True
            caplog.set_level("INFO", logger="sqlalchemy.engine.Engine")
            # pool_size connections plus as many overflow ones, then a wait of pool_timeout.
            async with engine.connect() as c1, engine.connect() as c2:
                await c1.execute(text("SELECT 41"))
                await c2.execute(text("SELECT 42"))
                started = asyncio.get_running_loop().time()
                with pytest.raises(PoolTimeoutError):
                    async with engine.connect():
                        pass
                waited = asyncio.get_running_loop().time() - started
            assert 0.15 <= waited < 2.0
            assert "SELECT 42" in caplog.text
        finally:
            await handle.stop(grace=0.5)
