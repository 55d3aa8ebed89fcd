"""``muster audit verify``: check the audit hash chains straight from the database.

It joins the ``audit`` group the SDK's ``muster audit query`` lives in (which goes
through the API). Verification reads the database directly, like ``muster db upgrade``,
so it works with the server down and trusts nothing the server says.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from dotenv import load_dotenv
from sqlalchemy.engine import make_url

from muster.cli import Subparsers, command_group
from muster.errors import ConfigError
from muster.server.audit.verify import VerifyReport, verify
from muster.server.audit.writer import describe_error
from muster.server.config import ServerConfig
from muster.server.storage.database import Database


def register_audit(subparsers: Subparsers) -> None:
    group = command_group(subparsers, "audit", help="The audit trail")
    p = group.add_parser(
        "verify",
        help="check the audit hash chains in the database",
        description="Walk every audit chain (one per server replica) in order, recompute "
        "each row's hash and check each link. Prints 'OK: N rows in K chains' and exits 0, "
        "or prints the first broken row of each broken chain and exits 1.",
    )
    p.add_argument(
        "--database-url",
        help="SQLAlchemy async URL (default $MUSTER_DATABASE_URL, else SQLite in the data dir)",
    )
    p.add_argument(
        "--data-dir", type=Path, help="data directory (default $MUSTER_DATA_DIR or ./.muster)"
    )
    p.add_argument("--chain", help="check only this chain (a replica id)")
    p.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    load_dotenv(Path.cwd() / ".env", override=False)
    config = ServerConfig.from_env(data_dir=args.data_dir, database_url=args.database_url)
    url = make_url(config.resolved_database_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise ConfigError(f"no database at {url.database}")  # and do not create an empty one
    report = asyncio.run(_read(url.render_as_string(hide_password=False), args.chain))
    if args.chain is not None and not report.chains:
        print(f"chain {args.chain}: no rows")
        return 1
    for broken in report.breaks:
        print(broken)
    print(report.summary())
    return 0 if report.ok else 1


async def _read(url: str, chain: str | None) -> VerifyReport:
    shown = make_url(url).render_as_string(hide_password=True)
    db = Database(url, audit_chain="", pool_size=1)
    try:
        return await verify(db, chain)
    except Exception as err:  # the driver raises its own errors at connect, unwrapped
        reason = describe_error(err)
        raise ConfigError(f"cannot read the audit trail at {shown}: {reason}") from None
    finally:
        await db.close()
