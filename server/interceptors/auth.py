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
PERMISSION_DENIED.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio

from muster.server import tokens
from muster.server.audit import AuditRecord, AuditWriter
from muster.server.interceptors._wrap import RpcInfo, guard_handler
from muster.server.lockout import count_auth_failure
from muster.server.metrics import MusterMetrics
from muster.server.principals import Principal, current_principal
from muster.server.quotas import Quotas
from muster.server.services.context import peer_address, request_id
from muster.server.storage import identities
from muster.server.storage.database import Database
from muster.server.storage.types import utcnow
from muster.server.token_cache import ApiTokenCache, CachedToken

log = logging.getLogger(__name__)

ROLE_FOR_SERVICE = {"muster.v1.TaskService": "submitter", "muster.v1.AdminService": "admin"}
"""The least role each protected service needs; admins may call everything."""
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
        self._db = db
        self._cache = cache
        self._quotas = quotas
        self._audit = audit
        self._metrics = metrics
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
        principal = await self._authenticate(info, context, peer)
        needed = ROLE_FOR_SERVICE[info.service]
        if needed == "admin" and not principal.is_admin:
            await self._audit.submit(
                AuditRecord(
                    actor=principal.name,
                    action="auth.denied",
                    target=info.method,
                    outcome="denied",
                    peer=peer,
                    request_id=request_id(context),
                    details={"role": principal.role, "needed": needed},
                )
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{info.name} needs the {needed!r} role; this token has {principal.role!r}",
            )
        current_principal.set(principal)

    async def _authenticate(
        self, info: RpcInfo, context: grpc.aio.ServicerContext[Any, Any], peer: str
    ) -> Principal:
        """The caller's principal, or the call is aborted.

        A failure is counted before it is answered, and a success is answered only while
        its token is not locked out at this address: however many guesses are in flight,
        at most the lockout's threshold of them get an answer other than RESOURCE_EXHAUSTED.
        """
        header = next(
            (v for k, v in context.invocation_metadata() or () if k == "authorization"), None
        )
        presented = None
        if isinstance(header, str) and header.lower().startswith("bearer "):
            presented = tokens.parse(header[7:].strip(), tokens.API)
        if presented is None:
            reason = "missing" if header is None else "malformed"
            await self._refuse(info, context, peer, None, reason)
        row = await self._cache.get(presented.token_id, self._load)
        if row is None:
            await self._refuse(info, context, peer, None, "unknown token")
        token = f"{tokens.API}_{presented.token_id}"
        if not presented.matches(row.secret_hash):
            await self._refuse(info, context, peer, token, "wrong secret")
        if row.deleted:
            await self._refuse(info, context, peer, token, "deleted")
        if row.expires_at is not None and row.expires_at <= utcnow():
            await self._refuse(info, context, peer, token, "expired")
        lockout = await self._quotas.check_lockout(peer, token)
        if not lockout.allowed:
            await context.abort_with_status(lockout.status())
        return Principal(name=row.name, role=row.role, token_id=row.token_id, tenant=row.tenant)

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
        self,
        info: RpcInfo,
        context: grpc.aio.ServicerContext[Any, Any],
        peer: str,
        token: str | None,
        reason: str,
    ) -> NoReturn:
        """Count the failure, then answer UNAUTHENTICATED, or RESOURCE_EXHAUSTED if its
        key is locked out."""
        rid = request_id(context)
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
            await context.abort_with_status(failure.decision.status())
        details = {"credential": "api_token", "reason": reason}
        if token is not None:
            details["token"] = token
        await self._audit.submit(
            AuditRecord(
                actor="anonymous",
                action="auth.failure",
                target=info.method,
                outcome="denied",
                peer=peer,
                request_id=rid,
                details=details,
            )
        )
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid API token (send 'authorization: Bearer <token>')",
        )


async def _not_served(info: RpcInfo, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, NOT_SERVED)
