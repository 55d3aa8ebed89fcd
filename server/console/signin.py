"""Signing in and out, and the session check in front of every other page.

A person signs in by pasting an API token into the login form (a POST body: never a
URL). The token is checked exactly as the api listener checks it (``ApiTokenCheck``:
the lockout, the audit of failures), must have the ``admin`` or ``viewer`` role, and
is then forgotten: the browser gets only a random session id, in a cookie that is
HttpOnly (no script reads it), Secure (HTTPS only), SameSite=Strict (no other site's
page sends it) and ``__Host-`` prefixed (no Domain, Path=/, set only over HTTPS).
Every request after that re-checks the session and that its token still may be used.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from muster.server import tokens
from muster.server.audit import AuditRecord, AuditWriter
from muster.server.console.errors import ConsoleError
from muster.server.console.render import PRINCIPAL, Renderer
from muster.server.console.sessions import SessionStore
from muster.server.interceptors.auth import ApiTokenCheck, Refused

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

COOKIE = "__Host-muster-console"
CONSOLE_ROLES = frozenset({"admin", "viewer"})
"""The API token roles that may sign in."""
OPEN_PATHS = frozenset({"/login"})
"""Pages (besides /static/) served without a session."""
MAX_TOKEN_FIELD = 200


class SignIn:
    def __init__(
        self, check: ApiTokenCheck, sessions: SessionStore, audit: AuditWriter, renderer: Renderer
    ) -> None:
        self._check = check
        self._sessions = sessions
        self._audit = audit
        self._renderer = renderer

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/login", self.form),
            web.post("/login", self.login),
            web.post("/logout", self.logout),
        ]

    @web.middleware
    async def require_session(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or request.path.startswith("/static/"):
            return await handler(request)
        session_id = request.cookies.get(COOKIE, "")
        session = self._sessions.get(session_id)
        if session is not None and await self._check.still_valid(session.principal.token_id):
            request[PRINCIPAL] = session.principal
            return await handler(request)
        if session is not None:  # its token was deleted or expired
            self._sessions.end_token(session.principal.token_id)
        if request.method in ("GET", "HEAD"):
            return see_other("/login")
        raise ConsoleError(401, "Sign in first.")

    async def form(self, request: web.Request) -> web.StreamResponse:
        if self._sessions.get(request.cookies.get(COOKIE, "")) is not None:
            return see_other("/")
        return self._renderer.page(request, "login.html", title="Sign in", message="")

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        value = form.get("token")
        presented = value.strip() if isinstance(value, str) else ""
        if len(presented) > MAX_TOKEN_FIELD:
            presented = "x"  # malformed, whatever it was; never echoed
        peer = request.remote or ""
        rid = secrets.token_hex(8)
        outcome = await self._check.authenticate(
            presented or None, peer=peer, target="console:login", request_id=rid
        )
        if isinstance(outcome, Refused):
            if outcome.lockout is not None:
                retry = math.ceil(outcome.lockout.retry_after or 1)
                page = self._login_page(
                    request,
                    429,
                    f"Too many failed sign-ins from this address: try again in {retry} s.",
                )
                page.headers["Retry-After"] = str(retry)
                return page
            return self._login_page(request, 401, "That API token was not accepted.")
        if outcome.role not in CONSOLE_ROLES:
            await self._check.denied(
                outcome, needed="viewer", target="console:login", peer=peer, request_id=rid
            )
            return self._login_page(
                request,
                403,
                f"A {outcome.role!r} token cannot sign in to the console: use an admin or a "
                "viewer token (muster api-token create NAME --role viewer).",
            )
        session_id = self._sessions.create(outcome)
        await self._audit.submit(
            AuditRecord(
                actor=outcome.name,
                action="console.login",
                target="console",
                peer=peer,
                request_id=rid,
                details={"role": outcome.role, "token": f"{tokens.API}_{outcome.token_id}"},
            )
        )
        response = see_other("/")
        response.set_cookie(
            COOKIE, session_id, path="/", secure=True, httponly=True, samesite="Strict"
        )
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        principal = request[PRINCIPAL]
        self._sessions.end(request.cookies.get(COOKIE, ""))
        await self._audit.submit(
            AuditRecord(
                actor=principal.name,
                action="console.logout",
                target="console",
                peer=request.remote or "",
                request_id=secrets.token_hex(8),
                details={"token": f"{tokens.API}_{principal.token_id}"},
            )
        )
        response = see_other("/login")
        response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        return response

    def _login_page(self, request: web.Request, status: int, message: str) -> web.Response:
        # The form comes back empty: what was typed is never sent back.
        return self._renderer.page(
            request, "login.html", status=status, title="Sign in", message=message
        )


def see_other(location: str) -> web.Response:
    """A 303 to a path of the console (after a POST, the browser GETs it)."""
    return web.Response(status=303, headers={"Location": location})
