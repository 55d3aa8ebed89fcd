"""Schema migrations: upgrade a database to the code's revision, or refuse to run on an old one.

Alembic is configured here rather than from an ``alembic.ini`` so that an installed
package migrates with ``muster db upgrade`` alone. Every migration runs on an async
engine's connection through ``run_sync``, in one transaction on Postgres (whose DDL is
transactional) under an advisory lock, so replicas started together migrate once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from muster.errors import ConfigError
from muster.server.storage.database import Database

log = logging.getLogger(__name__)

SCRIPT_LOCATION = "muster.server:migrations"
"""Package-resource form, so the scripts are found wherever ``server`` is installed."""
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"muster-migrate").digest()[:8], "big", signed=True)


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration for Muster's migrations (``url`` only for offline SQL)."""
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    # Module names must be identifiers (mypy checks the revisions too): v0002_add_x.py.
    config.set_main_option("file_template", "v%%(rev)s_%%(slug)s")
    if url is not None:
        # ConfigParser interpolates '%': a URL-encoded password must survive it.
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The revision this code expects the database to be at."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "server/migrations has no revisions"
    return head


async def upgrade(target: str | AsyncEngine | Database, revision: str = "head") -> None:
    """Bring the database up to ``revision``, creating the schema in an empty one.

    ``target`` is a URL, or an engine (or :class:`Database`) to migrate through, which is
    how an in-memory SQLite database gets migrated at all.
    """
    async with _engine(target) as engine, engine.begin() as conn:
        await conn.run_sync(_upgrade, revision)


async def ensure_schema(db: Database, migrate: str) -> None:
    """At server start: migrate if asked (``migrate``: yes, no, or auto = only SQLite),
    otherwise insist the schema is already at the code's revision.

    On failure ``db`` is closed before the error propagates: the server cannot start.
    """
    try:
        if migrate == "yes" or (migrate == "auto" and db.dialect == "sqlite"):
            await upgrade(db)
        else:
            await check_at_head(db)
    except BaseException:
        await db.close()
        raise


def _upgrade(connection: Connection, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        # Held until the transaction ends: a second replica waits, then finds nothing to do.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    before = MigrationContext.configure(connection).get_current_revision()
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)
    after = MigrationContext.configure(connection).get_current_revision()
    if before != after:
        log.info("database schema upgraded from %s to %s", before or "empty", after)


def upgrade_sql(url: str, revision: str = "head") -> str:
    """The SQL that upgrades an empty database of ``url``'s kind to ``revision``, for review."""
    buffer = io.StringIO()
    config = alembic_config(url)
    config.output_buffer = buffer
    command.upgrade(config, revision, sql=True)
    return buffer.getvalue()


async def current_revision(target: str | AsyncEngine | Database) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    async with _engine(target) as engine, engine.connect() as conn:
        return await conn.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )


@asynccontextmanager
async def _engine(target: str | AsyncEngine | Database) -> AsyncIterator[AsyncEngine]:
    """The engine to use: the one given, or a short-lived one for a URL."""
    if isinstance(target, Database):
        yield target.engine
    elif isinstance(target, AsyncEngine):
        yield target
    else:
        engine = create_async_engine(target, poolclass=NullPool)
        try:
            yield engine
        finally:
            await engine.dispose()


async def check_at_head(db: Database) -> None:
    """Refuse to serve on a schema other than the code's (the operator migrates explicitly)."""
    current = await current_revision(db)
    expected = head_revision()
    if current != expected:
        raise ConfigError(
            f"database schema is at revision {current or 'none (empty database)'}, "
            f"expected {expected}: run 'muster db upgrade'"
        )


async def new_revision(message: str, *, url: str | None = None) -> Path:
    """Write a revision autogenerated from the models' difference to ``url`` (default: a
    scratch SQLite database brought to head). A developer aid: review what it writes."""
    with tempfile.TemporaryDirectory() as scratch:
        target = url or f"sqlite+aiosqlite:///{Path(scratch) / 'scratch.db'}"
        if url is None:
            await upgrade(target)
        async with _engine(target) as engine, engine.connect() as conn:
            return await conn.run_sync(_autogenerate, message)


def _autogenerate(connection: Connection, message: str) -> Path:
    config = alembic_config()
    config.attributes["connection"] = connection
    scripts = ScriptDirectory.from_config(config)
    number = len(list(scripts.walk_revisions())) + 1
    script = command.revision(
        config, message=message, autogenerate=True, rev_id=f"{number:04d}", head="head"
    )
    assert script is not None and not isinstance(script, list)
    return Path(script.path)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for Postgres or in-memory SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)
