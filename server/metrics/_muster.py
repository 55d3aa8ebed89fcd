"""Muster's own metrics (``muster_*``), in base units, on a registry the caller owns.

Why a class: each server (and each test) gets its own ``CollectorRegistry``, so
metric objects are attributes of an instance rather than module globals.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from muster.server.metrics._state import StateGauge

__all__ = [
    "QUOTA_OUTCOMES",
    "REFUSAL_REASONS",
    "SCHEDULE_TO_START_BUCKETS",
    "TASK_RUN_BUCKETS",
    "MusterMetrics",
    "QueueStats",
]

SCHEDULE_TO_START_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
)  # fmt: skip
"""From "picked up at once" to "waited an hour for a free agent"."""

TASK_RUN_BUCKETS = (
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
    86400.0,
)  # fmt: skip
"""Tasks run from sub-second probes to day-long jobs."""

REFUSAL_REASONS = (
    "signature_missing",
    "signature_invalid",
    "signature_expired",
    "signature_mismatch",
    "signer_untrusted",
)
"""Why agents refuse signed-task Assignments (RefusalReason, lower-case, no prefix)."""

QUOTA_OUTCOMES = ("allowed", "rejected", "degraded")
"""``degraded``: decided without the shared store (it was unreachable)."""


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One pool's queue of one kind, as the server measured it."""

    depth: int
    """Tasks waiting (QUEUED)."""
    oldest_age_seconds: float
    """Age of the oldest waiting task; 0 when the queue is empty."""


class MusterMetrics:
    """Every ``muster_*`` metric, registered in ``registry``.

    Counters and histograms are plain prometheus_client objects: call
    ``.labels(...).inc()`` / ``.observe()`` on them. State gauges (agents connected,
    queue depth and age, certificate expiry) are :class:`StateGauge`: push a snapshot
    with ``update()``/``set()``/``inc()`` or compute them at scrape with
    ``set_function()``; the helpers below cover the usual cases.
    """

    def __init__(
        self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry
        self._clock = clock

        # Agents and dispatch.
        self.agents_connected = StateGauge(
            "muster_agents_connected",
            "Agent streams open on this server replica, by pool.",
            ("pool",),
            registry,
        )
        # By pool and kind: sum by (pool) gives a pool's depth, max by (pool) its oldest.
        self.queue_depth = StateGauge(
            "muster_queue_depth",
            "Tasks waiting to be assigned (QUEUED), by pool and kind.",
            ("pool", "kind"),
            registry,
        )
        self.queue_oldest_age_seconds = StateGauge(
            "muster_queue_oldest_age_seconds",
            "Seconds the oldest waiting task of a pool and kind has been queued.",
            ("pool", "kind"),
            registry,
        )
        self.schedule_to_start_seconds = Histogram(
            "muster_schedule_to_start_seconds",
            "Seconds from a task attempt being queued to an agent starting it.",
            ("pool",),
            buckets=SCHEDULE_TO_START_BUCKETS,
            registry=registry,
        )
        self.task_run_seconds = Histogram(
            "muster_task_run_seconds",
            "Seconds an attempt ran on its agent, from start to result.",
            ("pool", "kind"),
            buckets=TASK_RUN_BUCKETS,
            registry=registry,
        )
        self.tasks_submitted = Counter(
            "muster_tasks_submitted_total",
            "Task submissions accepted (idempotent retries count once).",
            registry=registry,
        )
        self.tasks_finished = Counter(
            "muster_tasks_finished_total",
            "Tasks that reached a terminal state, by outcome "
            "(succeeded, failed, cancelled, timed_out).",
            ("outcome",),
            registry=registry,
        )
        for outcome in ("succeeded", "failed", "cancelled", "timed_out"):
            self.tasks_finished.labels(outcome=outcome)  # at 0 from the start, for rates
        self.task_refusals = Counter(
            "muster_task_refusals_total",
            "Attempts an agent refused to run because a signature it requires is missing or "
            "does not hold, by reason (signature_missing, signature_invalid, "
            "signature_expired, signature_mismatch, signer_untrusted).",
            ("reason",),
            registry=registry,
        )
        for reason in REFUSAL_REASONS:
            self.task_refusals.labels(reason=reason)  # at 0 from the start, for alerts

        # Identity.
        self.certificates_issued = Counter(
            "muster_certificates_issued_total",
            "Agent certificates issued, by reason (enroll, reenroll, renew).",
            ("reason",),
            registry=registry,
        )
        self.certificates_revoked = Counter(
            "muster_certificates_revoked_total",
            "Agent certificates revoked.",
            registry=registry,
        )
        self.certificate_expiry_seconds = StateGauge(
            "muster_certificate_expiry_seconds",
            "Seconds until a certificate the server relies on expires "
            "(root, intermediate, server); negative once expired.",
            ("certificate",),
            registry,
        )
        self.trust_bundle_version = Gauge(
            "muster_trust_bundle_version",
            "Version of the trust bundle this replica serves and pushes to agents (it "
            "goes up at muster ca rotate-root --prepare and --retire); replicas that "
            "disagree for longer than a poll interval have not reloaded.",
            registry=registry,
        )
        self.auth_failures = Counter(
            "muster_auth_failures_total",
            "Calls refused for authentication, by listener (api, agent) and reason.",
            ("listener", "reason"),
            registry=registry,
        )

        # Quotas and budgets.
        self.quota_decisions = Counter(
            "muster_quota_decisions_total",
            "Quota decisions, by limit and outcome (allowed, rejected, degraded).",
            ("limit", "outcome"),
            registry=registry,
        )
        # AI work. No tenant label on counters (cardinality); tenants appear only in the
        # budget gauge, one series per budget an operator set.
        self.llm_tokens = Counter(
            "muster_llm_tokens_total",
            "AI tokens reported by attempts, by task kind, model and type (input, output, "
            "cache_creation, cache_read).",
            ("kind", "model", "type"),
            registry=registry,
        )
        self.llm_cost_usd = Counter(
            "muster_llm_cost_usd_total",
            "Cost of AI attempts in US dollars, computed by the server from reported tokens "
            "and its price table, by task kind and model.",
            ("kind", "model"),
            registry=registry,
        )
        self.budget_remaining_usd = StateGauge(
            "muster_budget_remaining_usd",
            "What is left of each budget with a limit in its current period (limit minus "
            "spent and reserved), in US dollars, by scope.",
            ("scope",),
            registry,
        )
        self.budget_limit_usd = StateGauge(
            "muster_budget_limit_usd",
            "The limit of each budget with one, in US dollars, by scope (the same series as "
            "muster_budget_remaining_usd: spent and reserved = limit - remaining).",
            ("scope",),
            registry,
        )
        self.budget_reservations = Counter(
            "muster_budget_reservations_total",
            "Budget reservations at dispatch, by outcome (reserved, refused, degraded).",
            ("outcome",),
            registry=registry,
        )
        for outcome in ("reserved", "refused", "degraded"):
            self.budget_reservations.labels(outcome=outcome)  # for alerts on the first one

        # Audit.
        self.audit_queue_depth = Gauge(
            "muster_audit_queue_depth",
            "Audit events waiting in the batch writer's queue.",
            registry=registry,
        )
        self.audit_spool_bytes = Gauge(
            "muster_audit_spool_bytes",
            "Bytes of audit events spooled to local disk while the database is unreachable.",
            registry=registry,
        )
        self.streams_replaced = Counter(
            "muster_streams_replaced_total",
            "Agent streams closed because a newer stream of the same agent connected, by "
            "reason (reconnect: at once; renewal: after the renewal overlap).",
            ("reason",),
            registry=registry,
        )
        for reason in ("reconnect", "renewal"):
            self.streams_replaced.labels(reason=reason)
        self.suspicious_events = Counter(
            "muster_suspicious_events_total",
            "Suspicious agent behaviour seen, by kind (see server/dispatch/suspicion.py).",
            ("kind",),
            registry=registry,
        )

        # Replicas.
        self.fanout_rejected = Counter(
            "muster_fanout_rejected_total",
            "Fan-out messages received on Redis and dropped because they did not verify, by "
            "reason (unsigned, bad_tag, stale, replayed).",
            ("reason",),
            registry=registry,
        )

    def update_queues(self, stats: Mapping[tuple[str, str], QueueStats]) -> None:
        """Replace the queue gauges, keyed by (pool, kind); queues missing from ``stats``
        (emptied) disappear rather than linger at their last value."""
        depth: dict[tuple[str, ...], float] = {key: s.depth for key, s in stats.items()}
        oldest: dict[tuple[str, ...], float] = {
            key: s.oldest_age_seconds for key, s in stats.items()
        }
        self.queue_depth.update(depth)
        self.queue_oldest_age_seconds.update(oldest)

    def watch_certificate_expiry(self, not_after: Callable[[], Mapping[str, dt.datetime]]) -> None:
        """Export seconds until expiry of the certificates ``not_after()`` returns
        (``{"root": ..., "intermediate": ..., "server": ...}``), computed at each scrape
        so reloaded certificates show without a push. Naive datetimes are UTC."""

        def seconds_left() -> dict[str, float]:
            now = self._clock()
            return {name: _timestamp(when) - now for name, when in not_after().items()}

        self.certificate_expiry_seconds.set_function(seconds_left)

    def quota_decision(self, limit: str, outcome: str) -> None:
        """Count one quota decision; ``outcome`` is one of :data:`QUOTA_OUTCOMES`."""
        if outcome not in QUOTA_OUTCOMES:
            raise ValueError(f"quota outcome must be one of {QUOTA_OUTCOMES}, not {outcome!r}")
        self.quota_decisions.labels(limit, outcome).inc()


def _timestamp(when: dt.datetime) -> float:
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()
