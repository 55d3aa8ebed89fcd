"""Which task kinds this agent runs only when signed, and by whom.

Configured locally (``--require-signed``, ``--trusted-submitters``), never by the
server: the point is that a compromised control plane cannot make the agent run work no
trusted submitter signed. Verification follows TaskSignature in common.proto; a refusal
is a non-retryable failed Result carrying the reason, logged (never the payload) and
counted here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from muster.signing import TrustedSubmitters, verify_assignment
from muster.v1 import agent_pb2

log = logging.getLogger(__name__)

EVERY_KIND = "*"


def _now() -> datetime:
    return datetime.now(UTC)


class SignatureGate:
    """Refuses Assignments of the required kinds whose signature does not hold.

    ``pool`` and ``labels`` are the agent's own, as it enrolled (a signed statement's
    pool and selector must admit them)."""

    def __init__(
        self,
        trusted: TrustedSubmitters,
        required: frozenset[str],
        *,
        pool: str,
        labels: Mapping[str, str],
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.trusted = trusted
        self.required = required
        self.pool = pool
        self.labels = dict(labels)
        self._clock = clock
        self.refusals: Counter[str] = Counter()
        """Refused attempts by reason (``SIGNATURE_MISMATCH`` ...), since the agent started."""

    def requires(self, kind: str) -> bool:
        return EVERY_KIND in self.required or kind in self.required

    def check(self, assignment: agent_pb2.Assignment) -> agent_pb2.Result | None:
        """None when the attempt may run; else the Result that refuses it."""
        if not self.requires(assignment.kind):
            return None
        refusal = verify_assignment(
            assignment, self.trusted, pool=self.pool, labels=self.labels, now=self._clock()
        )
        task_id, attempt = assignment.task_id, assignment.attempt
        if refusal is None:
            log.info(
                "attempt %s#%d: signature by %s verified",
                task_id,
                attempt,
                assignment.signature.key_id,
            )
            return None
        self.refusals[refusal.name] += 1
        log.warning(
            "attempt %s#%d (%s) refused, %s: %s (%d refused since start)",
            task_id,
            attempt,
            ascii(assignment.kind[:64]),
            refusal.name,
            refusal.message,
            sum(self.refusals.values()),
        )
        return agent_pb2.Result(
            task_id=task_id,
            attempt=attempt,
            outcome=agent_pb2.OUTCOME_FAILED,
            error=f"refused by the agent: {refusal.message}",
            retryable=False,
            refusal=refusal.reason,
        )


def gate_for(
    trusted: TrustedSubmitters | None,
    required: frozenset[str],
    *,
    pool: str,
    labels: Mapping[str, str],
) -> SignatureGate | None:
    """The gate the configuration asks for; None when no kind requires a signature."""
    if trusted is None or not required:
        if trusted is not None:
            log.warning("--trusted-submitters is set but no --require-signed kind: none is checked")
        return None
    log.info(
        "kinds run only when signed: %s; trusted submitter keys: %s",
        ", ".join(sorted(required)),
        ", ".join(trusted),
    )
    return SignatureGate(trusted, required, pool=pool, labels=labels)
