"""Least privilege on real Postgres: the application role may only append to the audit trail,
and the trigger refuses UPDATE, DELETE and TRUNCATE of it to the owner and superusers too.

Each test gets a fresh database and uniquely named roles, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from muster.cli import main
from muster.errors import ConfigError
from muster.server.storage import migrate
from muster.server.storage.database import Database
from muster.server.storage.roles import apply_roles, scram_sha256_verifier
from tests.pg import admin_execute, admin_url, database_name, database_url, fresh_database
from tests.pg import unique_name as unique

pytestmark = pytest.mark.slow

PERMISSION_DENIED = "42501"
RAISED = "P0001"

INSERT_AUDIT = text(
    "INSERT INTO audit_events (event_id, chain, seq, prev_hash, hash, time, actor, action,"
    " target, outcome, peer, request_id, details) VALUES (:event_id, 'c', :seq, :h, :h,"
    " :time, 'admin', 'token.create', 't', 'ok', '127.0.0.1', 'r', '{}') RETURNING id"
)
INSERT_TASK = text(
    "INSERT INTO tasks (task_id, kind, payload, pool, selector, priority, state, attempt,"
    " max_attempts, owner, error, cancel_requested, created_at, updated_at, queued_at,"
    " input_tokens, output_tokens, cost_micros) VALUES ('t1', 'echo', '\\x00', 'default',"
    " '{}', 0, 'QUEUED', 1, 3, 'alice', '', false, now(), now(), now(), 0, 0, 0)"
)
TAMPERING = (
    "UPDATE audit_events SET outcome = 'forged'",
    "DELETE FROM audit_events",
    "TRUNCATE audit_events",
)


@dataclass
class Setup:
    database: str
    owner: str
    app: str

    def url(self, role: str | None = None) -> str:
        return database_url(self.database, user=role)


@pytest.fixture
async def roles() -> AsyncIterator[tuple[str, str]]:
    owner, app = unique("muster_o"), unique("muster_a")
    try:
        yield owner, app
    finally:
        # The databases they had objects and grants in are gone by now.
        await admin_execute(f'DROP ROLE IF EXISTS "{app}"', f'DROP ROLE IF EXISTS "{owner}"')


@pytest.fixture
async def setup(roles: tuple[str, str]) -> AsyncIterator[Setup]:
    """The documented order: roles as a superuser, then ``upgrade`` as the owner."""
    owner, app = roles
    async with fresh_database(migrated=False) as url:
        await apply_roles(url, owner=owner, app=app)
        s = Setup(database_name(url), owner, app)
        await migrate.upgrade(s.url(owner))
        yield s


async def execute(url: str, statement: str, **params: object) -> list[tuple[object, ...]]:
    """Run one statement in its own transaction as the URL's role."""
    engine: AsyncEngine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(statement), params)
            return [tuple(row) for row in result.all()] if result.returns_rows else []
    finally:
        await engine.dispose()


async def append_audit(url: str, seq: int) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                INSERT_AUDIT,
                {"event_id": f"e{seq}", "seq": seq, "h": f"{seq:064d}", "time": datetime.now(UTC)},
            )
    finally:
        await engine.dispose()


async def refused(url: str, statement: str) -> DBAPIError:
    with pytest.raises(DBAPIError) as caught:
        await execute(url, statement)
    return caught.value


def sqlstate(err: DBAPIError) -> str | None:
    return getattr(err.orig, "sqlstate", None)


async def test_app_role_may_insert_and_select_audit_rows_but_not_change_them(
    setup: Setup,
) -> None:
    app = setup.url(setup.app)
    await append_audit(app, 1)
    await append_audit(app, 2)
    assert await execute(app, "SELECT seq FROM audit_events ORDER BY seq") == [(1,), (2,)]
    for statement in TAMPERING:
        err = await refused(app, statement)
        assert sqlstate(err) == PERMISSION_DENIED, statement
        assert "permission denied for table audit_events" in str(err.orig)
    assert await execute(app, "SELECT outcome FROM audit_events") == [("ok",), ("ok",)]


async def test_owner_and_superuser_are_refused_by_the_trigger(setup: Setup) -> None:
    await append_audit(setup.url(setup.app), 1)
    for role in (setup.owner, None):  # None: the superuser of MUSTER_TEST_PG_ADMIN_URL
        for statement in TAMPERING:
            err = await refused(setup.url(role), statement)
            assert sqlstate(err) == RAISED, (role, statement)
            assert "audit_events is append-only" in str(err.orig)
    # Even a statement that matches no row: the trigger is per statement.
    err = await refused(setup.url(setup.owner), "DELETE FROM audit_events WHERE false")
    assert "audit_events is append-only" in str(err.orig)
    assert await execute(setup.url(), "SELECT count(*) FROM audit_events") == [(1,)]


async def test_app_role_does_its_normal_work_and_nothing_more(setup: Setup) -> None:
    app = setup.url(setup.app)
    await execute(app, str(INSERT_TASK))
    await execute(app, "UPDATE tasks SET state = 'ASSIGNED' WHERE task_id = 't1'")
    assert await execute(app, "SELECT state FROM tasks FOR UPDATE SKIP LOCKED") == [("ASSIGNED",)]
    await execute(app, "DELETE FROM tasks WHERE task_id = 't1'")
    db = Database(app, audit_chain="test")
    try:
        await migrate.check_at_head(db)
    finally:
        await db.close()

    for statement in (
        "CREATE TABLE scratch (x int)",
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
        "UPDATE alembic_version SET version_num = 'forged'",
        "TRUNCATE tasks",
    ):
        err = await refused(app, statement)
        assert sqlstate(err) == PERMISSION_DENIED, statement
    owned = await execute(
        setup.url(), "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
    )
    assert owned == [(setup.owner,)]


async def test_roles_after_migrating_as_superuser(roles: tuple[str, str]) -> None:
    # A database first migrated by a superuser (migrate=yes) is hardened afterwards.
    owner, app = roles
    async with fresh_database() as url:
        await apply_roles(url, owner=owner, app=app)
        await apply_roles(url, owner=owner, app=app)  # idempotent
        s = Setup(database_name(url), owner, app)
        owned = await execute(
            url, "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
        )
        assert owned == [(owner,)]
        await append_audit(s.url(app), 1)
        await execute(s.url(app), str(INSERT_TASK))
        err = await refused(s.url(app), "DELETE FROM audit_events")
        assert sqlstate(err) == PERMISSION_DENIED
        err = await refused(s.url(owner), "DELETE FROM audit_events")
        assert sqlstate(err) == RAISED
        assert await migrate.current_revision(s.url(app)) == migrate.head_revision()


async def test_roles_refuse_roles_that_defeat_them(roles: tuple[str, str]) -> None:
    owner, app = roles
    superuser = make_url(admin_url()).username
    assert superuser
    async with fresh_database(migrated=False) as url:
        with pytest.raises(ConfigError, match="is a superuser"):
            await apply_roles(url, owner=owner, app=superuser)
        await admin_execute(f'CREATE ROLE "{owner}"', f'CREATE ROLE "{app}" IN ROLE "{owner}"')
        with pytest.raises(ConfigError, match=f"{app} is a member of {owner}"):
            await apply_roles(url, owner=owner, app=app)
    for bad in ("Muster", "a-b", "x" * 64, 'a"; DROP TABLE tasks; --'):
        with pytest.raises(ConfigError, match="lower-case letters"):
            await apply_roles(admin_url(), owner=bad, app=app)
    with pytest.raises(ConfigError, match="must be different"):
        await apply_roles(admin_url(), owner=app, app=app)


def test_roles_need_postgres() -> None:
    with pytest.raises(ConfigError, match="Postgres only"):
        asyncio.run(apply_roles("sqlite+aiosqlite:///x.db", owner="o", app="a"))


def _parse(verifier: str) -> tuple[int, bytes]:
    scheme, rest = verifier.split("$", 1)
    assert scheme == "SCRAM-SHA-256"
    iterations, salt = rest.split("$")[0].split(":")
    return int(iterations), base64.b64decode(salt)


async def test_password_verifiers_are_what_postgres_computes(roles: tuple[str, str]) -> None:
    owner, app = roles
    # Postgres hashes a plaintext password itself; ours must agree given its salt.
    await admin_execute(
        "SET password_encryption = 'scram-sha-256'",
        f"CREATE ROLE \"{owner}\" PASSWORD 'correct horse battery staple'",
    )
    [(stored,)] = await execute(
        admin_url(), "SELECT rolpassword FROM pg_authid WHERE rolname = :r", r=owner
    )
    assert isinstance(stored, str)
    iterations, salt = _parse(stored)
    ours = scram_sha256_verifier("correct horse battery staple", salt=salt, iterations=iterations)
    assert ours == stored

    async with fresh_database(migrated=False) as url:
        await apply_roles(url, owner=owner, app=app, app_password="s3cret-pw")
    [(stored,)] = await execute(
        admin_url(), "SELECT rolpassword FROM pg_authid WHERE rolname = :r", r=app
    )
    assert isinstance(stored, str) and "s3cret" not in stored
    iterations, salt = _parse(stored)
    assert scram_sha256_verifier("s3cret-pw", salt=salt, iterations=iterations) == stored
    assert scram_sha256_verifier("other", salt=salt, iterations=iterations) != stored
    with pytest.raises(ConfigError, match="printable ASCII"):
        scram_sha256_verifier("pässword")


async def test_the_documented_commands(
    roles: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner, app = roles
    password_file = tmp_path / "app.password"
    password_file.write_text("app-secret-1\n")
    async with fresh_database(migrated=False) as url:
        s = Setup(database_name(url), owner, app)

        def run(*argv: str) -> int:
            # ``muster`` runs its own event loop: give it a thread.
            return main([*argv, "--data-dir", str(tmp_path / "data")])

        assert await asyncio.to_thread(run, "db", "current", "--database-url", s.url(owner)) == 1
        assert await asyncio.to_thread(run, "db", "current", "--database-url", url) == 1
        assert (
            await asyncio.to_thread(
                run,
                "db",
                "roles",
                "--owner-role",
                owner,
                "--app-role",
                app,
                "--app-password-file",
                str(password_file),
                "--database-url",
                url,
            )
            == 0
        )
        assert await asyncio.to_thread(run, "db", "upgrade", "--database-url", s.url(owner)) == 0
        assert await asyncio.to_thread(run, "db", "upgrade", "--database-url", s.url(owner)) == 0
        assert await asyncio.to_thread(run, "db", "current", "--database-url", s.url(app)) == 0
    out, err = capsys.readouterr()
    head = migrate.head_revision()
    assert f'role "{owner}" does not exist' in err
    assert "at revision none (empty); this Muster expects" in out
    assert f"upgraded from revision none (empty) to {head}" in out
    assert f"already at revision {head}" in out
    assert "app-secret" not in out + err
