"""The server's /metrics endpoint: the one both daemons share, :mod:`muster.metrics_http`.

Kept under this name for the server's imports (``ca/publish.py``, ``app.py``); the agent
imports the shared module directly, as it cannot import the server.
"""

from muster.metrics_http import Handler, MetricsServer, Reply, start_metrics_server

__all__ = ["Handler", "MetricsServer", "Reply", "start_metrics_server"]
