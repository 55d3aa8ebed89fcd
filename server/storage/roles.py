"""Least-privilege Postgres roles: an owner that migrates, an application role that may
only append to the audit trail. The SQL lives in ``sql/roles.sql`` for operators to read.

Passwords are sent as SCRAM-SHA-256 verifiers computed here, as psql's ``\\password``
does, so the plaintext never reaches the server or its statement log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from importlib import resources

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from muster.errors import ConfigError

log = logging.getLogger(__name__)

ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
"""Lower case so the name means the same quoted or not; safe inside literals too."""
SCRAM_ITERATIONS = 4096
"""Postgres's own default (``scram_iterations``)."""


def roles_sql(owner: str, app: str) -> str:
    """``roles.sql`` with the two role names filled in."""
    for what, name in (("owner role", owner), ("app role", app)):
        if not ROLE_NAME.match(name):
            raise ConfigError(
                f"{what} {name!r}: use lower-case letters, digits and '_' (at most 63)"
            )
    if owner == app:
        raise ConfigError("the owner and app roles must be different roles")
    template = resources.files("muster.server.storage").joinpath("sql/roles.sql").read_text()
    return template.replace("{owner}", owner).replace("{app}", app)


def scram_sha256_verifier(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> str:
    """What Postgres stores for ``password`` (RFC 5802/7677), in its ``rolpassword`` format."""
    if not password or not password.isascii() or not password.isprintable():
        # Postgres would SASLprep anything else first; refusing beats a verifier that
        # silently never matches.
        raise ConfigError("database passwords must be non-empty printable ASCII")
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


async def apply_roles(
    url: str,
    *,
    owner: str,
    app: str,
    owner_password: str | None = None,
    app_password: str | None = None,
) -> None:
    """Create or update the roles and grants in the database at ``url`` (as a superuser),
    in one transaction. Applying it again changes nothing."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError("database roles apply to Postgres only (SQLite has no roles)")
    if parsed.get_driver_name() != "asyncpg":
        raise ConfigError("database roles: use a postgresql+asyncpg:// URL")
    script = roles_sql(owner, app)
    passwords = [
        (name, scram_sha256_verifier(password))
        for name, password in ((owner, owner_password), (app, app_password))
        if password is not None
    ]
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            # asyncpg's simple-query execute runs a whole script, DO blocks included.
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            try:
                async with driver.transaction():
                    await driver.execute(script)
                    for name, verifier in passwords:
                        await driver.execute(f"ALTER ROLE \"{name}\" PASSWORD '{verifier}'")
            except asyncpg.PostgresError as err:
                raise ConfigError(f"applying database roles failed: {err}") from None
    finally:
        await engine.dispose()
    log.info("database roles applied: owner %s, app %s", owner, app)
