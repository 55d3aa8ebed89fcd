"""Prometheus metrics of the control plane: Muster's own (``muster_*``) and the
/metrics endpoint. The go-grpc-prometheus ``grpc_server_*`` metrics live with their
interceptor in :mod:`muster.server.interceptors.metrics`."""

from muster.server.metrics._muster import (
    QUOTA_OUTCOMES,
    SCHEDULE_TO_START_BUCKETS,
    TASK_RUN_BUCKETS,
    MusterMetrics,
    QueueStats,
)
from muster.server.metrics._state import StateGauge, StateValues
from muster.server.metrics.http import MetricsServer, start_metrics_server

__all__ = [
    "QUOTA_OUTCOMES",
    "SCHEDULE_TO_START_BUCKETS",
    "TASK_RUN_BUCKETS",
    "MetricsServer",
    "MusterMetrics",
    "QueueStats",
    "StateGauge",
    "StateValues",
    "start_metrics_server",
]
