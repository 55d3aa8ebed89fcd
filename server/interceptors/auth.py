"""Bearer API tokens on the api listener, failing closed.

Every method served on the api listener is in exactly one of three places:
``PUBLIC_METHODS``/``PUBLIC_SERVICES`` (no API token: enrollment, which brings its own
bootstrap token, and health), ``REFLECTION_SERVICES`` (no API token, and only while the
``reflection`` setting is on), or ``ROLE_FOR_SERVICE`` (a token with that role). A
method in none of them is a server bug (a service added without an access rule): it is
answered UNIMPLEMENTED, exactly like a method that does not exist, so a prober learns
nothing, and logged as an error once per method. No token is read for it.

Missing or wrong token: UNAUTHENTICATED (audited, counted against its lockout key, see
:mod:`muster.server.lockout`). A valid token without the role a method needs:
PERMISSION_DENIED; a ``viewer`` token (the web console's read-only role) has none.

:class:`ApiTokenCheck` is the check itself, apart from grpc, so the web console's login
(server/console/) accepts a token exactly when a call would: same cache, lockout and audit.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from muster.server import tokens
from muster.server.audit import AuditRecord, AuditWriter
from muster.server.interceptors._wrap import RpcInfo, guard_handler
from muster.server.lockout import count_auth_failure
from muster.server.metrics import MusterMetrics
from muster.server.principals import Principal, current_principal
from muster.server.quotas import Quotas
from muster.server.quotas.policy import QuotaDecision
from muster.server.services.context import peer_address, request_id
from muster.server.storage import identities
from muster.server.storage.database import Database
from muster.server.storage.types import utcnow
from muster.server.token_cache import ApiTokenCache, CachedToken

log = logging.getLogger(__name__)

ROLE_FOR_SERVICE = {"muster.v1.TaskService": "submitter", "muster.v1.AdminService": "admin"}
"""The least role each protected service needs; admins may call everything."""
ROLES_ALLOWED = {"submitter": frozenset({"submitter", "admin"}), "admin": frozenset({"admin"})}
"""The token roles that have each needed role. ``viewer`` has neither: it may only read
the web console."""
PUBLIC_METHODS = frozenset({"/muster.v1.EnrollmentService/Enroll"})
"""Methods that need no API token (Enroll checks its own bootstrap token)."""
PUBLIC_SERVICES = frozenset({"grpc.health.v1.Health"})
"""Services every method of which needs no API token."""
REFLECTION_SERVICES = frozenset(
    {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
"""Server reflection: no API token, served only while the ``reflection`` setting is on."""
NOT_SERVED = "Method not found!"
"""grpc's own details for a method that does not exist: the two answers are the same."""


@dataclass(frozen=True, slots=True)
class Refused:
    """A presented API token that does not authenticate. The failure is already counted
    and audited; answer UNAUTHENTICATED, or, when ``lockout`` is set, the lockout's
    RESOURCE_EXHAUSTED (``lockout.status()``, ``lockout.retry_after``)."""

    lockout: QuotaDecision | None = None


class ApiTokenCheck:
    """Who an API token belongs to, checked as every api-listener call checks it."""

    def __init__(
        self,
        db: Database,
        quotas: Quotas,
        audit: AuditWriter,
        metrics: MusterMetrics,
        cache: ApiTokenCache,
    ) -> None:
        self._db = db
        self._cache = cache
        self._quotas = quotas
        self._audit = audit
        self._metrics = metrics

    async def authenticate(
        self, presented: str | None, *, peer: str, target: str, request_id: str
    ) -> Principal | Refused:
        """The principal of the token string ``presented`` (None: none was presented),
        or why not. ``target`` names what was asked for in the audit row of a failure.

        A failure is counted before it is answered, and a success is answered only while
        its token is not locked out at this address: however many guesses are in flight,
        at most the lockout's threshold of them get an answer other than RESOURCE_EXHAUSTED.
        """
        token = tokens.parse(presented, tokens.API) if presented is not None else None
        if token is None:
            reason = "missing" if presented is None else "malformed"
            return await self._refuse(peer, target, request_id, None, reason)
        row = await self._cache.get(token.token_id, self._load)
        if row is None:
            return await self._refuse(peer, target, request_id, None, "unknown token")
        public = f"{tokens.API}_{token.token_id}"
        if not token.matches(row.secret_hash):
            return await self._refuse(peer, target, request_id, public, "wrong secret")
        if row.deleted:
            return await self._refuse(peer, target, request_id, public, "deleted")
        if row.expires_at is not None and row.expires_at <= utcnow():
            return await self._refuse(peer, target, request_id, public, "expired")
        lockout = await self._quotas.check_lockout(peer, public, verified=True)
        if not lockout.allowed:
            return Refused(lockout)
        return Principal(name=row.name, role=row.role, token_id=row.token_id, tenant=row.tenant)

    async def still_valid(self, token_id: str) -> CachedToken | None:
        """The token's row while it may still be used (not deleted, not expired), else
        None: what was signed in with a token ends with it (within the cache's 5 s)."""
        row = await self._cache.get(token_id, self._load)
        if row is None or row.deleted:
            return None
        if row.expires_at is not None and row.expires_at <= utcnow():
            return None
        return row

    async def denied(
        self, principal: Principal, *, needed: str, target: str, peer: str, request_id: str
    ) -> None:
        """Audit a valid token refused for its role (the caller answers PERMISSION_DENIED)."""
        await self._audit.submit(
            AuditRecord(
                actor=principal.name,
                action="auth.denied",
                target=target,
                outcome="denied",
                peer=peer,
                request_id=request_id,
                details={"role": principal.role, "needed": needed},
            )
        )

    async def _load(self, token_id: str) -> CachedToken | None:
        async with self._db.transaction() as session:
            row = await identities.api_token(session, token_id)
        if row is None:
            return None
        return CachedToken(
            token_id=row.token_id,
            name=row.name,
            tenant=row.tenant,
            role=row.role,
            secret_hash=row.secret_hash,
            expires_at=row.expires_at,
            deleted=row.deleted_at is not None,
        )

    async def _refuse(
        self, peer: str, target: str, rid: str, token: str | None, reason: str
    ) -> Refused:
        """Count the failure; audit it unless its key was already locked out."""
        failure = await count_auth_failure(
            self._quotas,
            self._audit,
            self._metrics,
            peer=peer,
            credential="api_token",
            token=token,
            request_id=rid,
        )
        if not failure.decision.allowed:
            return Refused(failure.decision)
        details = {"credential": "api_token", "reason": reason}
        if token is not None:
            details["token"] = token
        await self._audit.submit(
            AuditRecord(
                actor="anonymous",
                action="auth.failure",
                target=target,
                outcome="denied",
                peer=peer,
                request_id=rid,
                details=details,
            )
        )
        return Refused()


class ApiTokenAuth(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        db: Database,
        quotas: Quotas,
        audit: AuditWriter,
        metrics: MusterMetrics,
        cache: ApiTokenCache,
        *,
        reflection: bool = False,
    ) -> None:
        self.check = ApiTokenCheck(db, quotas, audit, metrics, cache)
        """The token check itself, shared with the web console's login."""
        self._reflection = reflection
        self._unmapped_logged: set[str] = set()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # grpc answers UNIMPLEMENTED; nothing is served
        service = method.lstrip("/").rpartition("/")[0]
        if method in PUBLIC_METHODS or service in PUBLIC_SERVICES:
            return handler
        if service in REFLECTION_SERVICES and self._reflection:
            return handler
        if service in ROLE_FOR_SERVICE:
            return guard_handler(handler, method, self._check)
        if method not in self._unmapped_logged:
            self._unmapped_logged.add(method)
            log.error(
                "misconfigured: %s is registered on the api listener but has no access rule "
                "in server/interceptors/auth.py; refusing every call (this is a bug)",
                method,
            )
        return guard_handler(handler, method, _not_served)

    async def _check(self, info: RpcInfo, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        peer = peer_address(context)
        rid = request_id(context)
        header = next(
            (v for k, v in context.invocation_metadata() or () if k == "authorization"), None
        )
        presented: str | None = None
        if header is not None:
            # Anything but "Bearer <token>" is presented as malformed ("").
            text = header if isinstance(header, str) else ""
            presented = text[7:].strip() if text.lower().startswith("bearer ") else ""
        outcome = await self.check.authenticate(
            presented, peer=peer, target=info.method, request_id=rid
        )
        if isinstance(outcome, Refused):
            if outcome.lockout is not None:
                await context.abort_with_status(outcome.lockout.status())
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid API token (send 'authorization: Bearer <token>')",
            )
            raise AssertionError("abort raises")  # for the type checker
        needed = ROLE_FOR_SERVICE[info.service]
        if outcome.role not in ROLES_ALLOWED[needed]:
            await self.check.denied(
                outcome, needed=needed, target=info.method, peer=peer, request_id=rid
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{info.name} needs the {needed!r} role; this token has {outcome.role!r}",
            )
        current_principal.set(outcome)


async def _not_served(info: RpcInfo, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, NOT_SERVED)
