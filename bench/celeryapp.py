"""The Celery reference's app: Redis as broker and result backend, one no-op task.

Settings are Celery's defaults except what isolation needs: a queue and a Redis key prefix
of this run's own (``BENCH_CELERY_PREFIX``), so parallel runs and other users of the same
Redis never meet, and the harness deletes exactly its own keys afterwards.
"""

from __future__ import annotations

import os
import secrets

from celery import Celery  # type: ignore[import-untyped]

PREFIX = os.environ.get("BENCH_CELERY_PREFIX") or f"muster-bench-celery-{secrets.token_hex(5)}"
"""Chosen once per harness process (the worker gets it through the environment)."""
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=PREFIX,
    broker_transport_options={"global_keyprefix": f"{PREFIX}:"},
    result_backend_transport_options={"global_keyprefix": f"{PREFIX}:"},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=3600,
)


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Does nothing: the reference measures the queue, not the work."""
