"""``muster db``: migrate the schema, show its revision, set up least-privilege roles.

The database is the server's (``--database-url``, else ``MUSTER_DATABASE_URL`` or the
SQLite file in the data directory), so ``muster db upgrade`` before ``muster server``
needs no extra settings. Run ``upgrade`` as the owner role and ``roles`` as a superuser.
Alembic is imported only when a ``db`` command runs, so ``muster`` itself starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from dotenv import load_dotenv
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from muster.cli import Subparsers, command_group
from muster.errors import ConfigError
from muster.server.config import ServerConfig

T = TypeVar("T")


def register_db(subparsers: Subparsers) -> None:
    db = command_group(subparsers, "db", help="manage the database schema and roles")

    upgrade = db.add_parser(
        "upgrade",
        help="migrate the database schema to this version of Muster",
        description="Apply the schema migrations the database lacks (an empty database gets "
        "the whole schema). On Postgres run it as the owner role; replicas started at "
        "once are safe, one migrates and the others wait.",
    )
    _database_flags(upgrade)
    upgrade.add_argument("--revision", default="head", help="target revision (default head)")
    upgrade.add_argument(
        "--sql",
        action="store_true",
        help="print the SQL that would build the schema from empty, for review; change nothing",
    )
    upgrade.set_defaults(func=_upgrade)

    current = db.add_parser(
        "current",
        help="show the schema revision (exit 1 unless it is this version's)",
        description="Print the database's schema revision and the one this Muster expects; "
        "exit status 1 if they differ.",
    )
    _database_flags(current)
    current.set_defaults(func=_current)

    roles_ = db.add_parser(
        "roles",
        help="create the Postgres owner and application roles and their grants",
        description="Create (if missing) an owner role, which owns the schema and runs "
        "'muster db upgrade', and an application role for 'muster server', which may only "
        "INSERT and SELECT the audit trail; grant each what it needs. Run as a superuser "
        "connected to Muster's database. Safe to run again. See docs/postgres.md.",
    )
    _database_flags(roles_)
    roles_.add_argument("--owner-role", required=True, help="role that owns the schema")
    roles_.add_argument("--app-role", required=True, help="role the server connects as")
    roles_.add_argument("--owner-password-file", type=Path, help="set the owner's password")
    roles_.add_argument("--app-password-file", type=Path, help="set the app role's password")
    roles_.add_argument("--print", action="store_true", help="print the SQL instead of applying it")
    roles_.set_defaults(func=_roles)

    revision = db.add_parser(
        "revision",
        help="(developers) write a migration for the models' changes",
        description="Autogenerate a new revision in server/migrations/versions from the "
        "difference between the models and a scratch SQLite database at head. Review and "
        "edit what it writes: it knows nothing of triggers or grants.",
    )
    revision.add_argument("-m", "--message", required=True, help="what the revision changes")
    revision.set_defaults(func=_revision)


def _database_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy async URL (default $MUSTER_DATABASE_URL, else SQLite in the data dir)",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="data directory (default $MUSTER_DATA_DIR or ./.muster)"
    )


def _database_url(args: argparse.Namespace) -> str:
    load_dotenv(Path.cwd() / ".env", override=False)
    config = ServerConfig.from_env(data_dir=args.data_dir, database_url=args.database_url)
    url = config.resolved_database_url
    if not config.database_url:
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return url


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _run(url: str, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; a database that cannot be reached or refuses is a clear one-line error."""
    try:
        return asyncio.run(work)
    except DBAPIError as err:
        raise ConfigError(f"{_shown(url)}: {type(err.orig).__name__}: {err.orig}") from None
    except asyncpg.PostgresError as err:  # refused while connecting (unknown role, database)
        raise ConfigError(f"{_shown(url)}: {err}") from None
    except OSError as err:
        raise ConfigError(f"cannot reach {_shown(url)}: {err}") from None


def _upgrade(args: argparse.Namespace) -> int:
    from muster.server.storage import migrate

    url = _database_url(args)
    if args.sql:
        sys.stdout.write(migrate.upgrade_sql(url, args.revision))
        return 0

    async def run() -> tuple[str | None, str | None]:
        before = await migrate.current_revision(url)
        await migrate.upgrade(url, args.revision)
        return before, await migrate.current_revision(url)

    before, after = _run(url, run())
    if before == after:
        print(f"{_shown(url)}: already at revision {after}")
    else:
        print(f"{_shown(url)}: upgraded from revision {before or 'none (empty)'} to {after}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from muster.server.storage import migrate

    url = _database_url(args)
    current = _run(url, migrate.current_revision(url))
    head = migrate.head_revision()
    print(f"{_shown(url)}: at revision {current or 'none (empty)'}; this Muster expects {head}")
    return 0 if current == head else 1


def _roles(args: argparse.Namespace) -> int:
    from muster.server.storage import roles

    if args.print:
        sys.stdout.write(roles.roles_sql(args.owner_role, args.app_role))
        return 0
    url = _database_url(args)
    _run(
        url,
        roles.apply_roles(
            url,
            owner=args.owner_role,
            app=args.app_role,
            owner_password=_read_password(args.owner_password_file),
            app_password=_read_password(args.app_password_file),
        ),
    )
    print(f"{_shown(url)}: roles {args.owner_role} (owner) and {args.app_role} (app) set up")
    return 0


def _read_password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        password = path.read_text().rstrip("\r\n")
    except OSError as err:
        raise ConfigError(f"cannot read password file {path}: {err.strerror}") from None
    if not password:
        raise ConfigError(f"password file {path} is empty")
    return password


def _revision(args: argparse.Namespace) -> int:
    from muster.server.storage import migrate

    path = asyncio.run(migrate.new_revision(args.message))
    print(f"wrote {path}: review it before committing")
    return 0
