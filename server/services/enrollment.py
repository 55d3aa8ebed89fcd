"""EnrollmentService: a bootstrap token and a CSR become an agent identity.

Order matters: the token is checked (not spent) first, then the CSR, then everything is
written in one transaction with its audit rows. Any refusal changes nothing, and every
token problem looks the same to the caller.
"""

from __future__ import annotations

import fnmatch
import logging
import secrets
from datetime import datetime

import grpc
from sqlalchemy.ext.asyncio import AsyncSession

from muster.server import tokens
from muster.server.audit import AuditRecord, AuditWriter, record_in
from muster.server.ca import (
    AgentPublicKey,
    CsrError,
    public_key_fingerprint,
    public_key_from_csr,
)
from muster.server.ca.reload import CAReloader
from muster.server.config import ServerConfig
from muster.server.lockout import count_auth_failure
from muster.server.metrics import MusterMetrics
from muster.server.quotas import QuotaDecision, Quotas
from muster.server.services import convert
from muster.server.services.context import peer_address, request_id
from muster.server.services.errors import ServiceError
from muster.server.services.issuing import issue_agent_certificate, issue_record
from muster.server.services.validation import check_labels, check_name
from muster.server.storage import identities
from muster.server.storage.database import Database
from muster.server.storage.types import utcnow
from muster.spiffe import AGENT_ID
from muster.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger(__name__)

BAD_TOKEN = "bootstrap token is invalid, expired or used up"  # noqa: S105 (a message)


class _Refusal(ServiceError):
    """A refused enrollment; ``audit_reason`` is the precise cause, which the caller never
    sees. ``known_token``: the token's id names a row, so a failed authentication counts
    against that token's lockout at the caller's address, not the address's own."""

    def __init__(
        self, code: grpc.StatusCode, message: str, audit_reason: str, *, known_token: bool = False
    ) -> None:
        super().__init__(code, message)
        self.audit_reason = audit_reason
        self.known_token = known_token


class _Throttled(Exception):
    """The attempt is refused by a limit (a lockout, the enrollment rate): answered with
    the decision's RESOURCE_EXHAUSTED, not audited one by one (the decision is counted)."""

    def __init__(self, decision: QuotaDecision) -> None:
        super().__init__(decision.limit)
        self.decision = decision


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServiceServicer):
    def __init__(
        self,
        db: Database,
        reloader: CAReloader,
        quotas: Quotas,
        audit: AuditWriter,
        metrics: MusterMetrics,
        config: ServerConfig,
        agent_endpoint: str,
    ) -> None:
        self._db = db
        self._reloader = reloader
        self._quotas = quotas
        self._audit = audit
        self._metrics = metrics
        self._config = config
        self._agent_endpoint = agent_endpoint

    async def Enroll(
        self,
        request: enrollment_pb2.EnrollRequest,
        context: grpc.aio.ServicerContext[
            enrollment_pb2.EnrollRequest, enrollment_pb2.EnrollResponse
        ],
    ) -> enrollment_pb2.EnrollResponse:
        peer, rid = peer_address(context), request_id(context)
        presented = tokens.parse(request.token, tokens.BOOTSTRAP)
        try:
            try:
                return await self._enroll(request, presented, peer, rid)
            except ServiceError as refusal:
                await self._record_refusal(presented, refusal, peer, rid)
                raise
        except _Throttled as throttled:
            await context.abort_with_status(throttled.decision.status())

    async def _enroll(
        self,
        request: enrollment_pb2.EnrollRequest,
        presented: tokens.PresentedToken | None,
        peer: str,
        rid: str,
    ) -> enrollment_pb2.EnrollResponse:
        if presented is None:
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, BAD_TOKEN, "malformed token")
        # The CSR is read before the transaction (pure CPU), but a bad one is refused only
        # after the token checks out, so a bad token always looks the same.
        public_key: AgentPublicKey | None = None
        csr_problem = ""
        try:
            public_key = public_key_from_csr(request.csr_pem)
        except CsrError as err:
            csr_problem = str(err)
        fingerprint = public_key_fingerprint(public_key) if public_key else ""
        now = utcnow()
        actor = f"bootstrap:{presented.token_id}"

        # One transaction: read, redeem, insert and audit, so nothing is half done.
        async with self._db.transaction() as session:
            conn = await session.connection()
            row = await identities.enrollment_token(conn, presented.token_id, fingerprint, now)
            if row is None:
                raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, BAD_TOKEN, "unknown token")
            if not presented.matches(row.secret_hash):
                raise _Refusal(
                    grpc.StatusCode.UNAUTHENTICATED, BAD_TOKEN, "wrong secret", known_token=True
                )
            # The secret checked out: answered only while this token is not locked out
            # at this address (a right guess among many in flight counts only within the
            # allowance), and only then is one of the address's enrollments spent, so a
            # failing script cannot use them up for the others behind its address.
            decision = await self._quotas.check_enrollment_attempt(
                peer, f"{tokens.BOOTSTRAP}_{presented.token_id}"
            )
            if not decision.allowed:
                raise _Throttled(decision)
            if public_key is None:
                raise _Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT, f"csr_pem: {csr_problem}", "bad csr"
                )
            if row.earlier is not None:
                earlier = row.earlier
                await self._reloader.sync(session)  # the response carries the bundle of now
                await record_in(
                    session,
                    AuditRecord(
                        actor=actor,
                        action="agent.enroll",
                        target=earlier.agent_id,
                        peer=peer,
                        request_id=rid,
                        details={"serial": earlier.serial, "retry": True},
                    ),
                )
                return self._response(
                    earlier.agent_id,
                    earlier.pool,
                    earlier.labels,
                    earlier.chain_pem,
                    earlier.not_after,
                )

            if row.deleted_at is not None or row.expires_at <= now or row.uses >= row.max_uses:
                raise _Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    BAD_TOKEN,
                    _token_problem(row),
                    known_token=True,
                )
            if row.bound_agent is not None:
                return await self._reenroll(
                    session, row, request, public_key, fingerprint, now, peer, rid
                )
            pool, labels = _scope(row, request)
            agent_id = self._agent_id(row, request.name)
            issued = await issue_agent_certificate(
                self._reloader, session, public_key, agent_id, self._config.cert_lifetime
            )
            outcome = await identities.enroll_agent(
                conn,
                token_id=row.token_id,
                now=now,
                agent_id=agent_id,
                pool=pool,
                labels=labels,
                serial=issued.serial,
                fingerprint=fingerprint,
                chain_pem=issued.chain_pem,
                not_before=issued.not_before,
                not_after=issued.not_after,
                issuer_id=issued.issuer_id,
            )
            # Any refusal here rolls the transaction back, redemption included.
            if outcome == "used up":
                raise _Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    BAD_TOKEN,
                    "used up concurrently",
                    known_token=True,
                )
            if outcome == "name taken":
                raise _Refusal(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"agent {agent_id!r} is already enrolled; choose another name (an "
                    "operator re-enrolls an existing agent with a token from "
                    f"'muster token create --reenroll {agent_id}')",
                    "name taken",
                )
            await record_in(
                session,
                AuditRecord(
                    actor=actor,
                    action="token.redeem",
                    target=row.token_id,
                    peer=peer,
                    request_id=rid,
                ),
                AuditRecord(
                    actor=actor,
                    action="agent.enroll",
                    target=agent_id,
                    peer=peer,
                    request_id=rid,
                    details={"pool": pool, "labels": labels},
                ),
                issue_record(
                    issued,
                    agent_id,
                    actor=actor,
                    key=fingerprint,
                    reason="enroll",
                    peer=peer,
                    request_id=rid,
                ),
            )
        self._metrics.certificates_issued.labels(reason="enroll").inc()
        log.info(
            "enrolled agent %s (serial %s) from token %s", agent_id, issued.serial, row.token_id
        )
        return self._response(agent_id, pool, labels, issued.chain_pem, issued.not_after)

    async def _reenroll(
        self,
        session: AsyncSession,
        row: identities.EnrollmentToken,
        request: enrollment_pb2.EnrollRequest,
        public_key: AgentPublicKey,
        fingerprint: str,
        now: datetime,
        peer: str,
        rid: str,
    ) -> enrollment_pb2.EnrollResponse:
        """Redeem a re-enrollment token: a fresh certificate for the same agent id, in the
        caller's transaction (with its audit rows), its older certificates revoked."""
        agent_id = row.bound_agent
        assert agent_id is not None
        if request.name and request.name != agent_id:
            raise _Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this token re-enrolls agent {agent_id!r} only, not {request.name[:63]!r}",
                "name not allowed",
            )
        pool, labels = _scope(row, request)
        if labels != row.labels:
            raise _Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"a re-enrollment keeps agent {agent_id!r}'s labels; ask for no others",
                "label not allowed",
            )
        issued = await issue_agent_certificate(
            self._reloader, session, public_key, agent_id, self._config.cert_lifetime
        )
        done = await identities.reenroll_agent(
            session,
            token_id=row.token_id,
            now=now,
            agent_id=agent_id,
            serial=issued.serial,
            fingerprint=fingerprint,
            chain_pem=issued.chain_pem,
            not_before=issued.not_before,
            not_after=issued.not_after,
            issuer_id=issued.issuer_id,
        )
        if done.outcome == "used up":
            raise _Refusal(
                grpc.StatusCode.UNAUTHENTICATED, BAD_TOKEN, "used up concurrently", known_token=True
            )
        if done.outcome == "no agent":
            raise _Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"agent {agent_id!r} no longer exists; ask an operator for a new token",
                "no agent",
            )
        actor = f"bootstrap:{row.token_id}"
        await record_in(
            session,
            AuditRecord(
                actor=actor, action="token.redeem", target=row.token_id, peer=peer, request_id=rid
            ),
            AuditRecord(
                actor=actor,
                action="agent.reenroll",
                target=agent_id,
                peer=peer,
                request_id=rid,
                details={
                    "pool": pool,
                    "labels": labels,
                    "revoked": done.revoked,
                    "was_removed": done.was_removed,
                    "was_enabled": done.was_enabled,
                },
            ),
            issue_record(
                issued,
                agent_id,
                actor=actor,
                key=fingerprint,
                reason="reenroll",
                peer=peer,
                request_id=rid,
            ),
        )
        self._metrics.certificates_issued.labels(reason="reenroll").inc()
        if done.revoked:
            self._metrics.certificates_revoked.inc(len(done.revoked))
        log.info(
            "re-enrolled agent %s (serial %s) from token %s", agent_id, issued.serial, row.token_id
        )
        return self._response(agent_id, pool, labels, issued.chain_pem, issued.not_after)

    def _agent_id(self, row: identities.EnrollmentToken, name: str) -> str:
        if name:
            check_name(name, "name", AGENT_ID)
            agent_id = name
        else:
            agent_id = "agent-" + secrets.token_hex(6)
        if not fnmatch.fnmatchcase(agent_id, row.name_pattern):
            raise _Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"agent name {agent_id!r} is not allowed by this token "
                f"(pattern {row.name_pattern!r})",
                "name not allowed",
            )
        return agent_id

    def _response(
        self,
        agent_id: str,
        pool: str,
        labels: dict[str, str],
        chain_pem: bytes,
        not_after: datetime,
    ) -> enrollment_pb2.EnrollResponse:
        return enrollment_pb2.EnrollResponse(
            agent_id=agent_id,
            spiffe_id=f"spiffe://{self._reloader.ca.trust_domain}/agent/{agent_id}",
            certificate_chain_pem=chain_pem,
            trust_bundle_pem=self._reloader.ca.bundle_pem,
            agent_endpoint=self._agent_endpoint,
            not_after=convert.timestamp(not_after),
            pool=pool,
            labels=labels,
        )

    async def _record_refusal(
        self, presented: tokens.PresentedToken | None, refusal: ServiceError, peer: str, rid: str
    ) -> None:
        """Count a failed authentication (raising :class:`_Throttled` if its key is
        locked out: then nothing is audited), and audit the refusal."""
        reason = refusal.audit_reason if isinstance(refusal, _Refusal) else refusal.message
        if refusal.code == grpc.StatusCode.UNAUTHENTICATED:
            known = presented is not None and isinstance(refusal, _Refusal) and refusal.known_token
            token = f"{tokens.BOOTSTRAP}_{presented.token_id}" if known and presented else None
            failure = await count_auth_failure(
                self._quotas,
                self._audit,
                self._metrics,
                peer=peer,
                credential="bootstrap_token",
                token=token,
                request_id=rid,
            )
            if not failure.decision.allowed:
                raise _Throttled(failure.decision)
        async with self._db.transaction() as session:
            await record_in(
                session,
                AuditRecord(
                    actor=f"bootstrap:{presented.token_id}" if presented else "anonymous",
                    action="agent.enroll",
                    outcome="denied",
                    peer=peer,
                    request_id=rid,
                    details={"reason": reason, "code": refusal.code.name},
                ),
            )


def _token_problem(row: identities.EnrollmentToken) -> str:
    if row.deleted_at is not None:
        return "token deleted"
    if row.uses >= row.max_uses:
        return "token used up"
    return "token expired"


def _scope(
    row: identities.EnrollmentToken, request: enrollment_pb2.EnrollRequest
) -> tuple[str, dict[str, str]]:
    """The pool and labels an agent gets: the token's, plus labels that do not contradict them."""
    pool = request.pool or row.pool
    if pool != row.pool:
        raise _Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"this token enrolls agents into pool {row.pool!r}, not {pool!r}",
            "pool not allowed",
        )
    check_labels(dict(request.labels), "labels")
    labels = dict(request.labels)
    for key, value in row.labels.items():
        if labels.get(key, value) != value:
            raise _Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"label {key!r} is fixed to {value!r} by this token",
                "label not allowed",
            )
        labels[key] = value
    return pool, labels
