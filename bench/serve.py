"""``python -m bench.serve``: one Muster server for the harness, configured from ``MUSTER_*``.

Why not ``muster server``: the harness raises the open-file limit to its hard limit
(10,000 agents are 10,000 sockets), which the command does not do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys

from muster.server import app
from muster.server.allocator import pin_mmap_threshold
from muster.server.config import ServerConfig


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(config: ServerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.workers > 1:
        # As `muster server --workers N`: this process is the parent, the workers are
        # `muster server` processes (they inherit the raised open-file limit).
        from muster.server.workers import WorkerSupervisor

        level = os.environ.get("MUSTER_LOG_LEVEL", "INFO")
        await WorkerSupervisor(config, log_level=level).run(stop)
        return
    handle = await app.start_server(config)
    handle.supervisor.on_crash(lambda _crash: stop.set())  # a crash ends the bench server too
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
    pin_mmap_threshold()  # as `muster server` does
    asyncio.run(_serve(ServerConfig.from_env()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
