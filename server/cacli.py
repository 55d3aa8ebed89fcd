"""``muster ca rotate-intermediate``, ``muster ca rotate-root`` and ``muster ca status``.

Run where the server's settings are (``--data-dir``, ``--database-url``, ``MUSTER_*``,
``.env``): they change the database every replica shares and need the active root's key
(a file in the CA directory, or the token of ``MUSTER_CA_SIGNER``). Running servers
follow within a poll interval, without a restart. Exit status 0, or 2 with a message.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from dotenv import load_dotenv
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from muster.cli import Subparsers
from muster.errors import MusterError
from muster.server.audit.writer import describe_error
from muster.server.ca.keystore import key_store
from muster.server.ca.rotation import Done, Rotation, status
from muster.server.config import ServerConfig
from muster.server.storage.database import Database

FAILED = 2
KEY_TYPES = ("ec-p256", "ec-p384", "ed25519")


def register_ca_rotation(ca: Subparsers) -> None:
    """Add the rotation commands to the ``ca`` group."""
    intermediate = ca.add_parser(
        "rotate-intermediate",
        help="issue from a new intermediate CA under the current root",
        description="Create a new intermediate CA under the active root; it issues every "
        "new certificate (agents and servers) from now on. The old intermediate stays "
        "trusted until its last leaf expires. Agents notice nothing.",
    )
    _flags(intermediate)
    intermediate.set_defaults(func=_rotate_intermediate)

    root = ca.add_parser(
        "rotate-root",
        help="rotate the root CA in three steps: --prepare, --activate, --retire",
        description="--prepare: create a new root and intermediate and add the root to the "
        "trust bundle every replica and agent is given. --activate: issue from the new "
        "root's intermediate; servers and agents move to it. --retire: drop the old root "
        "from the bundle, refused while an agent still depends on it (unless --force). "
        "See docs/pki.md.",
    )
    step = root.add_mutually_exclusive_group(required=True)
    step.add_argument("--prepare", action="store_true", help="create and publish a new root")
    step.add_argument("--activate", action="store_true", help="issue from the prepared root")
    step.add_argument("--retire", action="store_true", help="drop the previous root")
    root.add_argument(
        "--force",
        action="store_true",
        help="with --retire: retire even though agents depend on the old root (cuts them off)",
    )
    _flags(root)
    root.set_defaults(func=_rotate_root)

    show = ca.add_parser(
        "status",
        help="show every CA certificate, its state and its live leaves",
        description="List every root, cross-signed root and intermediate the CA has had: "
        "its id, role, state (prepared, active, previous, retired), live leaves issued "
        "from it (intermediates), expiry and parent; and the trust bundle version.",
    )
    _database_flags(show)
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_status)


def _database_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, help="data directory (default $MUSTER_DATA_DIR or ./.muster)"
    )
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy async URL (default $MUSTER_DATABASE_URL, else SQLite in the data dir)",
    )


def _flags(parser: argparse.ArgumentParser) -> None:
    _database_flags(parser)
    parser.add_argument("--trust-domain", help="SPIFFE trust domain (default muster.local)")
    parser.add_argument(
        "--key-type", choices=KEY_TYPES, help="type of the new keys (default: as the ones replaced)"
    )


def _rotate_intermediate(args: argparse.Namespace) -> int:
    return _rotate(args, lambda rotation: rotation.rotate_intermediate())


def _rotate_root(args: argparse.Namespace) -> int:
    if args.force and not args.retire:
        return _failed("--force goes with --retire only")
    if args.prepare:
        return _rotate(args, lambda rotation: rotation.prepare_root())
    if args.activate:
        return _rotate(args, lambda rotation: rotation.activate_root())
    return _rotate(args, lambda rotation: rotation.retire_root(force=args.force))


def _status(args: argparse.Namespace) -> int:
    try:
        config = _config(args)

        async def run(db: Database) -> int:
            found = await status(db)
            if not found.entries:
                return _failed(
                    "the CA is not recorded in this database yet: start muster server once"
                )
            if args.json:
                print(json.dumps(found.as_json(), indent=2))
            else:
                print("\n".join(found.lines()))
            return 0

        return _with_database(config, run)
    except MusterError as err:
        return _failed(str(err))


def _rotate(args: argparse.Namespace, step: Callable[[Rotation], Awaitable[Done]]) -> int:
    try:
        config = _config(args)
        keys = key_store(config)

        async def run(db: Database) -> int:
            rotation = Rotation(
                db,
                keys,
                trust_domain=config.trust_domain,
                ca_dir=config.ca_dir,
                actor=f"cli:{_user()}",
                key_type=args.key_type,
            )
            done = await step(rotation)
            for line in done.lines:
                print(line)
            return 0

        return _with_database(config, run)
    except MusterError as err:
        return _failed(str(err))


def _config(args: argparse.Namespace) -> ServerConfig:
    load_dotenv(Path.cwd() / ".env", override=False)
    return ServerConfig.from_env(
        data_dir=args.data_dir,
        database_url=args.database_url,
        trust_domain=getattr(args, "trust_domain", None),
    )


def _with_database(config: ServerConfig, work: Callable[[Database], Awaitable[int]]) -> int:
    url = make_url(config.resolved_database_url)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        return _failed(f"no database at {url.database}")  # and do not create an empty one

    async def run() -> int:
        db = Database(
            url.render_as_string(hide_password=False),
            audit_chain=f"cli@{config.resolved_replica_id}",
            pool_size=1,
        )
        try:
            return await work(db)
        finally:
            await db.close()

    try:
        return asyncio.run(run())
    # The driver raises its own errors at connect, unwrapped.
    except (SQLAlchemyError, asyncpg.PostgresError, OSError) as err:
        return _failed(f"{shown}: {describe_error(err)}")


def _failed(message: str) -> int:
    print(f"muster: error: {' '.join(message.split())}", file=sys.stderr)
    return FAILED


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"uid {os.getuid()}"
