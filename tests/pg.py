"""Postgres for tests: a fresh database per test, cloned from a template migrated once per run.

``async with fresh_database() as url:`` yields the SQLAlchemy URL of a new database
already at the head revision, and drops it (even with connections still open) on exit.
The template is made on first use, named after this process and random bytes so no run
ever sees another's state, and dropped when the process exits. The administrative
connection comes from ``MUSTER_TEST_PG_ADMIN_URL`` (a superuser; default: local trust).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from muster.server.storage import migrate

DEFAULT_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"

_template: str | None = None


def admin_url() -> str:
    """A superuser URL on the maintenance database."""
    return os.environ.get("MUSTER_TEST_PG_ADMIN_URL") or DEFAULT_ADMIN_URL


def database_url(name: str, *, user: str | None = None) -> str:
    """The admin URL pointed at database ``name`` (as ``user``, if given)."""
    url = make_url(admin_url()).set(database=name)
    if user is not None:
        url = url.set(username=user, password=None)
    return url.render_as_string(hide_password=False)


def admin_engine(database: str | None = None) -> AsyncEngine:
    """An autocommit engine (CREATE/DROP DATABASE refuse to run in a transaction)."""
    url = database_url(database) if database else admin_url()
    return create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")


async def admin_execute(*statements: str, database: str | None = None) -> None:
    engine = admin_engine(database)
    try:
        async with engine.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


def unique_name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


async def create_database(name: str, *, template: str | None = None) -> None:
    clause = f' TEMPLATE "{template}"' if template else ""
    await admin_execute(f'CREATE DATABASE "{name}"{clause}')


async def drop_database(name: str) -> None:
    await admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def template_database() -> str:
    """The name of this process's migrated template database, made on first use."""
    global _template
    if _template is None:
        name = unique_name(f"muster_tpl_{os.getpid()}")
        await create_database(name)
        try:
            await migrate.upgrade(database_url(name))
        except BaseException:
            await drop_database(name)
            raise
        _template = name
        atexit.register(_drop_template, name)
    return _template


def _drop_template(name: str) -> None:
    # At exit no event loop runs; a private one keeps the global loop policy untouched.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(drop_database(name))
    finally:
        loop.close()


@asynccontextmanager
async def fresh_database(*, migrated: bool = True) -> AsyncIterator[str]:
    """A new database (at head, or empty if not ``migrated``), dropped afterwards."""
    template = await template_database() if migrated else None
    name = unique_name("muster_t")
    await create_database(name, template=template)
    try:
        yield database_url(name)
    finally:
        await drop_database(name)


def database_name(url: str) -> str:
    name = make_url(url).database
    assert name, url
    return name
