"""The daemon's own Prometheus metrics (``muster agent --metrics-addr HOST:PORT``).

Everything here is ``muster_agent_*``, in base units, in a registry of the daemon's own
(never prometheus_client's global one), so several agents can run in one process, as the
tests do. What the runner and the connection loop learn is counted as it happens; what
the daemon holds (outbox, running attempts, certificate, stream) is read at scrape time
from :class:`AgentState`, so a gauge can never drift from the truth.

No label or value carries a secret: labels are task kinds, models, outcomes, reasons and
the agent's id, pool and version. The agent never prices tokens itself: its cost is what
the server priced each recorded attempt at, as the Ack says (``Ack.cost_micros``, the same
figure as the server's ``muster_llm_cost_usd_total``), beside a tool's own figure
(claude-code's ``total_cost_usd``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from muster.metrics_http import MetricsServer, start_metrics_server
from muster.v1 import agent_pb2

__all__ = [
    "EXECUTOR_BUCKETS",
    "AgentMetrics",
    "AgentState",
    "serve_metrics",
]

EXECUTOR_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0,
    1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
)  # fmt: skip
"""Seconds: from an echo's milliseconds to a day-long job (the server's run buckets start at
0.1 s because they include the stream round trips; the executor alone is faster)."""

PRICED_PENDING_LIMIT = 4096
"""Attempts with usage whose Ack has not come yet that the cost counter remembers the kind
and model of (the outbox bounds them in practice; this keeps a silent server from growing
the map). An Ack beyond it is counted under ``unknown`` labels."""

UNKNOWN_KIND = "unknown"
"""The ``kind`` label of an attempt of a kind this agent has no executor for (the server
should not send one); keeps a confused server from minting series."""

_OUTCOMES = {
    agent_pb2.OUTCOME_SUCCEEDED: "succeeded",
    agent_pb2.OUTCOME_FAILED: "failed",
    agent_pb2.OUTCOME_CANCELLED: "cancelled",
}


class AgentState(Protocol):
    """What the daemon tells the metrics at scrape time."""

    def metrics_connected(self) -> bool:
        """A stream is established (welcomed and not ended)."""
        ...

    def metrics_running(self) -> int:
        """Attempts whose executor is running."""
        ...

    def metrics_concurrency(self) -> int:
        """Slots: how many attempts may run at once."""
        ...

    def metrics_outbox(self) -> int | None:
        """Results waiting for the server's Ack; None before the state dir is open."""
        ...

    def metrics_certificate_not_after(self) -> dt.datetime | None:
        """The agent certificate's expiry; None before it is loaded."""
        ...


class AgentMetrics:
    """The daemon's metrics; ``registry`` is what /metrics serves."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self.info = Info(
            "muster_agent",
            "This agent: its id and pool (known once enrolled) and the Muster version it runs.",
            registry=self.registry,
        )
        self.tasks = Counter(
            "muster_agent_tasks_total",
            "Attempts this agent finished, by task kind and outcome (succeeded, failed, "
            "timed_out, cancelled; abandoned: stopped unfinished at shutdown).",
            ("kind", "outcome"),
            registry=self.registry,
        )
        self.executor_seconds = Histogram(
            "muster_agent_executor_duration_seconds",
            "Seconds an executor ran for one attempt (whatever the outcome), by task kind.",
            ("kind",),
            buckets=EXECUTOR_BUCKETS,
            registry=self.registry,
        )
        self.streams = Counter(
            "muster_agent_streams_total",
            "Streams the server welcomed: the first, and each reconnection that succeeded.",
            registry=self.registry,
        )
        self.reconnects = Counter(
            "muster_agent_reconnects_total",
            "Times the agent connected again, by why the stream before ended or the attempt "
            "before failed: drained (a replica let it go), server_closed, closed, refused "
            "(identity refused: revoked, disabled), protocol, error, or the gRPC status "
            "(unavailable, aborted: replaced by a newer stream of this agent, ...).",
            ("reason",),
            registry=self.registry,
        )
        self.renewals = Counter(
            "muster_agent_certificate_renewals_total",
            "Certificate renewals, by outcome (renewed, failed).",
            ("outcome",),
            registry=self.registry,
        )
        self.llm_tokens = Counter(
            "muster_agent_llm_tokens_total",
            "AI tokens this agent's attempts reported, by task kind, model and type (input, "
            "output, cache_creation, cache_read); failed and cancelled attempts count too.",
            ("kind", "model", "type"),
            registry=self.registry,
        )
        self.llm_reported_cost_usd = Counter(
            "muster_agent_llm_reported_cost_usd_total",
            "A tool's own cost figure (claude-code's total_cost_usd) in US dollars, by task "
            "kind and model. The priced cost is the server's muster_llm_cost_usd_total.",
            ("kind", "model"),
            registry=self.registry,
        )
        self.llm_cost_usd = Counter(
            "muster_agent_llm_cost_usd_total",
            "What the control plane priced this agent's recorded attempts at (Ack.cost_micros: "
            "its price table, the figure budgets count), in US dollars, by task kind and model.",
            ("kind", "model"),
            registry=self.registry,
        )
        self._awaiting_price: dict[tuple[str, int], tuple[str, str]] = {}

    # Identity ---------------------------------------------------------------

    def identify(self, *, agent_id: str, pool: str, version: str) -> None:
        """Fill ``muster_agent_info`` once the identity is known (after enrollment)."""
        self.info.info({"agent_id": agent_id, "pool": pool, "version": version})

    def watch(self, state: AgentState) -> None:
        """Serve the gauges read from the daemon at scrape time."""
        self.registry.register(_StateCollector(state, self._clock))

    # Events ------------------------------------------------------------------

    def attempt_finished(
        self,
        kind: str,
        result: agent_pb2.Result | None,
        ran: float | None,
        *,
        timed_out: bool = False,
    ) -> None:
        """One attempt ended: ``result`` None when it was abandoned at shutdown; ``ran`` the
        executor's seconds, None when no executor ran (unknown kind, refused, bad schema)."""
        if result is None:
            outcome = "abandoned"
        elif timed_out and result.outcome == agent_pb2.OUTCOME_FAILED:
            outcome = "timed_out"
        else:
            outcome = _OUTCOMES.get(result.outcome, "failed")
        self.tasks.labels(kind, outcome).inc()
        if ran is not None:
            self.executor_seconds.labels(kind).observe(max(0.0, ran))
        if result is not None and result.HasField("usage"):
            usage = result.usage
            model = usage.model or UNKNOWN_KIND
            for type_, value in (
                ("input", usage.input_tokens),
                ("output", usage.output_tokens),
                ("cache_creation", usage.cache_creation_input_tokens),
                ("cache_read", usage.cache_read_input_tokens),
            ):
                if value > 0:
                    self.llm_tokens.labels(kind, model, type_).inc(value)
            if usage.reported_cost_micros > 0:
                self.llm_reported_cost_usd.labels(kind, model).inc(
                    usage.reported_cost_micros / 1_000_000
                )
            if len(self._awaiting_price) < PRICED_PENDING_LIMIT:
                self._awaiting_price[(result.task_id, result.attempt)] = (kind, model)

    def acknowledged(self, ack: agent_pb2.Ack) -> None:
        """The server recorded (or set aside) a Result: count the cost it priced it at."""
        kind, model = self._awaiting_price.pop(
            (ack.task_id, ack.attempt), (UNKNOWN_KIND, UNKNOWN_KIND)
        )
        if ack.cost_micros > 0:
            self.llm_cost_usd.labels(kind, model).inc(ack.cost_micros / 1_000_000)

    def welcomed(self) -> None:
        self.streams.inc()

    def reconnecting(self, reason: str) -> None:
        self.reconnects.labels(reason).inc()

    def renewed(self, ok: bool) -> None:
        self.renewals.labels("renewed" if ok else "failed").inc()


class _StateCollector(Collector):
    """The gauges of what the daemon holds, read when scraped."""

    def __init__(self, state: AgentState, clock: Callable[[], float]) -> None:
        self._state = state
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._state)

    def _families(self, state: AgentState | None) -> list[Metric]:
        connected = GaugeMetricFamily(
            "muster_agent_connected", "1 while a stream to the server is established, else 0."
        )
        running = GaugeMetricFamily(
            "muster_agent_tasks_running", "Attempts whose executor is running now."
        )
        slots = GaugeMetricFamily(
            "muster_agent_concurrency", "How many attempts may run at once (--concurrency)."
        )
        outbox = GaugeMetricFamily(
            "muster_agent_outbox_results",
            "Results waiting in the local outbox for the server's acknowledgement.",
        )
        not_after = GaugeMetricFamily(
            "muster_agent_certificate_expiry_timestamp_seconds",
            "When the agent certificate expires (not_after), in Unix seconds.",
        )
        left = GaugeMetricFamily(
            "muster_agent_certificate_expiry_seconds",
            "Seconds until the agent certificate expires; negative once expired.",
        )
        families: list[Metric] = [connected, running, slots, outbox, not_after, left]
        if state is None:
            return families
        connected.add_metric([], 1.0 if state.metrics_connected() else 0.0)
        running.add_metric([], float(state.metrics_running()))
        slots.add_metric([], float(state.metrics_concurrency()))
        if (pending := state.metrics_outbox()) is not None:
            outbox.add_metric([], float(pending))
        if (expiry := state.metrics_certificate_not_after()) is not None:
            at = expiry.timestamp()
            not_after.add_metric([], at)
            left.add_metric([], at - self._clock())
        return families


async def serve_metrics(metrics: AgentMetrics, host: str, port: int) -> MetricsServer:
    """Listen on ``host:port`` (port 0: any free one, see ``.port``) and serve ``metrics``
    at /metrics (and ``ok`` at /healthz)."""
    return await start_metrics_server(metrics.registry, host, port)
