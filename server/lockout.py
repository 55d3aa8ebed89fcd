"""Counting failed authentications per peer address, and recording a lockout.

Both credentials the api listener takes (API tokens and bootstrap tokens) count against
the same per-peer allowance; the failure that uses it up locks the peer out for a while
and is written to the audit trail, so an operator sees who was guessing.
"""

from __future__ import annotations

import logging

from server.audit import AuditRecord, AuditWriter
from server.metrics import MusterMetrics
from server.quotas import Quotas

log = logging.getLogger(__name__)


async def count_auth_failure(
    quotas: Quotas,
    audit: AuditWriter,
    metrics: MusterMetrics,
    *,
    peer: str,
    credential: str,
    request_id: str,
) -> None:
    decision = await quotas.record_auth_failure(peer)
    metrics.auth_failures.labels(listener="api", reason=credential).inc()
    if decision.allowed:
        return
    log.warning("peer %s locked out after repeated failed authentications", peer)
    await audit.submit(
        AuditRecord(
            actor="anonymous",
            action="auth.lockout",
            target=f"peer:{peer}",
            outcome="denied",
            peer=peer,
            request_id=request_id,
            details={"credential": credential, "retry_after": decision.retry_after},
        )
    )
