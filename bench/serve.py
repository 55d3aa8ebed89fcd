"""``python -m bench.serve``: one Muster server for the harness, configured from ``MUSTER_*``.

Why not ``muster server``: the harness needs two things the command does not offer. The
open-file limit is raised to its hard limit (10,000 agents are 10,000 sockets), and
``BENCH_ENROLLMENT_RATE`` replaces the per-peer enrollment rate limit (1/s, burst 30),
because every simulated agent enrolls from 127.0.0.1. The limit is still checked on every
enrollment, in Redis when ``MUSTER_REDIS_URL`` is set; only its numbers change.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import signal
import sys

from server import app
from server.config import ServerConfig
from server.quotas import QuotaPolicy, RateLimit


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _override_enrollment_limit() -> None:
    rate = os.environ.get("BENCH_ENROLLMENT_RATE")
    if rate:
        limit = RateLimit(float(rate), int(float(rate)))
        vars(app)["QuotaPolicy"] = functools.partial(QuotaPolicy, enrollments=limit)


async def _serve(config: ServerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    handle = await app.start_server(config)
    try:
        await stop.wait()
    finally:
        await handle.stop()


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("MUSTER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _raise_nofile()
    _override_enrollment_limit()
    asyncio.run(_serve(ServerConfig.from_env()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
