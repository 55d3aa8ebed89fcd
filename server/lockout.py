"""Counting failed authentications, and recording a lockout.

Both credentials the api listener takes (API tokens and bootstrap tokens) count here.
The key is the peer address and, for a well-formed token of a known id, that token's
public id (see :func:`muster.server.quotas.policy.auth_failure_subject`): a script guessing
one token's secret locks out only that token at that address, and a missing, malformed
or unknown token spends the address's own allowance. A failure is counted before it is
answered, so however many are in flight, at most the threshold per key per window are
answered UNAUTHENTICATED; the rest get the lockout's RESOURCE_EXHAUSTED. The failure
that uses a key up is written to the audit trail, so an operator sees who was guessing.
"""

from __future__ import annotations

import logging

from muster.server.audit import AuditRecord, AuditWriter
from muster.server.metrics import MusterMetrics
from muster.server.quotas import Quotas
from muster.server.quotas.policy import AuthFailure

log = logging.getLogger(__name__)


async def count_auth_failure(
    quotas: Quotas,
    audit: AuditWriter,
    metrics: MusterMetrics,
    *,
    peer: str,
    credential: str,
    token: str | None,
    request_id: str,
) -> AuthFailure:
    """Count a failed authentication from ``peer`` against its key; ``token`` is the
    public ``<prefix>_<id>`` of a well-formed token of a known id, else None.

    When the answer's ``decision`` is refused the key was already locked out: answer
    ``decision.status()`` and audit nothing (refusals are counted in
    ``muster_quota_decisions_total``). Otherwise the failure was counted (and
    ``muster_auth_failures_total`` with it): answer UNAUTHENTICATED.
    """
    failure = await quotas.record_auth_failure(peer, token)
    if not failure.decision.allowed:
        return failure
    metrics.auth_failures.labels(listener="api", reason=credential).inc()
    if failure.locked_now:
        scope = f"token {token}" if token else "unknown or malformed tokens"
        log.warning("peer %s locked out (%s) after repeated failed authentications", peer, scope)
        details: dict[str, object] = {"credential": credential, "retry_after": failure.retry_after}
        if token is not None:
            details["token"] = token
        await audit.submit(
            AuditRecord(
                actor="anonymous",
                action="auth.lockout",
                target=f"peer:{peer}",
                outcome="denied",
                peer=peer,
                request_id=request_id,
                details=details,
            )
        )
    return failure
