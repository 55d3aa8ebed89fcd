"""The Celery references' app: one no-op task, on one of two brokers.

- ``redis``: Redis as broker and result backend, Celery's defaults except what isolation
  needs: a queue and a Redis key prefix of this run's own, so parallel runs and other users
  of the same Redis never meet, and the harness deletes exactly its own keys afterwards.
- ``rabbitmq``: the durable setup Celery's documentation recommends for work that must not
  be lost: RabbitMQ (py-amqp) as broker in a virtual host of this run's own, persistent
  messages (delivery mode 2) on a durable queue, ``acks_late`` (a task is acknowledged
  after it ran, so a worker crash redelivers it) with a prefetch multiplier of 1, as the
  docs advise for ``acks_late``; results come back through the ``rpc://`` backend (AMQP
  messages to the caller), persistent too.

The worker (``celery -A bench.celeryapp``) reads its peer, prefix and vhost from the
environment (``BENCH_CELERY_*``); the harness builds its own client apps with
:func:`make_app`.
"""

from __future__ import annotations

import os
import secrets
from typing import Any
from urllib.parse import quote

from celery import Celery  # type: ignore[import-untyped]

PEERS = ("redis", "rabbitmq")
PREFIX = os.environ.get("BENCH_CELERY_PREFIX") or f"muster-bench-celery-{secrets.token_hex(5)}"
"""Chosen once per harness process (the worker gets it through the environment)."""
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
"""Without the virtual host: each run appends its own."""


def noop() -> None:
    """Does nothing: the reference measures the queue, not the work."""


def make_app(peer: str, prefix: str, vhost: str = "") -> Any:
    """A Celery app for ``peer`` whose queue (and Redis keys, or vhost) belong to ``prefix``."""
    if peer == "redis":
        app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
        app.conf.update(
            broker_transport_options={"global_keyprefix": f"{prefix}:"},
            result_backend_transport_options={"global_keyprefix": f"{prefix}:"},
            result_expires=3600,
        )
    elif peer == "rabbitmq":
        if not vhost:
            raise ValueError("the rabbitmq peer needs a virtual host of its own")
        app = Celery("bench", broker=f"{RABBITMQ_URL}/{quote(vhost, safe='')}", backend="rpc://")
        app.conf.update(
            task_default_delivery_mode="persistent",
            task_acks_late=True,
            worker_prefetch_multiplier=1,
            result_persistent=True,
        )
    else:
        raise ValueError(f"unknown celery peer {peer!r}: one of {', '.join(PEERS)}")
    app.conf.update(
        task_default_queue=prefix,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name="bench.noop")(noop)
    return app


app = make_app(
    os.environ.get("BENCH_CELERY_PEER", "redis"), PREFIX, os.environ.get("BENCH_CELERY_VHOST", "")
)
"""The worker's app (``celery -A bench.celeryapp worker``)."""
