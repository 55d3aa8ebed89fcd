"""The console's listener: an aiohttp application on the server's event loop, served
over HTTPS with the server's certificate on ``console_addr``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from muster.errors import ConfigError
from muster.server.audit import AuditWriter
from muster.server.ca import ServerCertificates
from muster.server.clock import Clock
from muster.server.config import ServerConfig, parse_address
from muster.server.console import security
from muster.server.console.chain import ChainVerifier
from muster.server.console.pages import Pages
from muster.server.console.reads import ConsoleReads
from muster.server.console.render import Renderer
from muster.server.console.sessions import SessionStore
from muster.server.console.signin import SignIn
from muster.server.console.tls import ConsoleTLS
from muster.server.dispatch.presence import Presence
from muster.server.interceptors.auth import ApiTokenCheck
from muster.server.services.admin import AdminService
from muster.server.storage.database import Database

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
TEMPLATES = Path(__file__).with_name("templates")
MAX_REQUEST_BYTES = 16 * 1024
"""The largest request body accepted (the login form is the only one)."""
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'
"""Address, request line (a path and filters: never a token), status, size, time."""


@dataclass(frozen=True, slots=True)
class ConsoleParts:
    """What the console reads with and signs in with, from ``start_server``."""

    db: Database
    admin: AdminService
    presence: Presence
    tokens: ApiTokenCheck
    audit: AuditWriter
    certificates: ServerCertificates
    clock: Clock


class ConsoleServer:
    def __init__(
        self, runner: web.AppRunner, port: int, sessions: SessionStore, chains: ChainVerifier
    ) -> None:
        self._runner = runner
        self.port = port
        self.sessions = sessions
        """The signed-in sessions (tests end or age them)."""
        self._chains = chains

    @property
    def app(self) -> web.Application:
        """The application served (its router lists every route)."""
        return self._runner.app

    async def close(self) -> None:
        await self._chains.close()
        await self._runner.cleanup()


def build_app(
    config: ServerConfig, parts: ConsoleParts
) -> tuple[web.Application, SessionStore, ChainVerifier]:
    renderer = Renderer()
    sessions = SessionStore(config.console_session_ttl, clock=parts.clock)
    chains = ChainVerifier(parts.db, parts.clock)
    reads = ConsoleReads(parts.db, parts.admin, parts.presence, config)
    signin = SignIn(parts.tokens, sessions, parts.audit, renderer)
    app = web.Application(
        middlewares=[
            security.headers,
            security.error_pages(renderer),
            security.same_origin,
            signin.require_session,
        ],
        client_max_size=MAX_REQUEST_BYTES,
    )
    app.add_routes(signin.routes())
    app.add_routes(Pages(reads, chains, renderer, parts.clock).routes())
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    return app, sessions, chains


async def start_console(config: ServerConfig, parts: ConsoleParts) -> ConsoleServer:
    """Serve the console on ``config.console_addr`` (port 0: any free port)."""
    host, port = parse_address(config.console_addr, name="console_addr")
    for folder in (STATIC, TEMPLATES):
        if not folder.is_dir():
            raise ConfigError(
                f"console_addr: the console's files are not installed ({folder} is missing): "
                "reinstall Muster, or leave MUSTER_CONSOLE_ADDR unset"
            )
    app, sessions, chains = build_app(config, parts)
    runner = web.AppRunner(app, access_log_format=ACCESS_LOG_FORMAT, handle_signals=False)
    await runner.setup()
    tls = ConsoleTLS(parts.certificates)
    # No SO_REUSEPORT, whatever reuse_port says: sessions live in one process, so one
    # process serves a console port (with --workers, worker 0; see app.py).
    site = web.TCPSite(runner, host, port, ssl_context=tls.context)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise ConfigError(
            f"console_addr: cannot listen on {config.console_addr}: {err.strerror}"
        ) from None
    bound = runner.addresses[0][1]
    return ConsoleServer(runner, bound, sessions, chains)
