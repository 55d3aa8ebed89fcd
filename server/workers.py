"""``muster server --workers N``: one parent, N server processes sharing the listener ports.

Each worker is an ordinary ``muster server`` (``start_server``), started as
``python -m muster server`` with every setting in its environment (argv carries no
setting, so no secret shows in a process list), bound with SO_REUSEPORT to the same
api and agent ports: the kernel spreads new connections over the workers, and one host
uses all its cores. The parent:

- resolves port 0 once and holds a bound, never listening, SO_REUSEPORT socket on each
  listener port while it runs, so a restarted worker binds the same port again and no
  other program takes it meanwhile (only listening sockets receive connections);
- starts worker 0 alone, then the others once it is ready, so that a first start
  creates the CA, the server certificate and the admin token once;
- restarts a worker that exits without being asked to, after a backoff, logged;
- forwards SIGTERM and SIGINT to every worker (each drains as a single server does)
  and exits when all have stopped: 0 when every worker exited 0.

Workers are replicas on one host: each is named ``<replica_id>-w<i>`` (its own audit
chain, presence rows and log prefix) and serves its own ``/metrics`` on the metrics
port + i (port 0: a port of its own). A worker and its parent share a socket pair: the
worker reports its bound addresses over it when ready, and drains when the parent's
end closes (the parent died), so no worker outlives its parent for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from muster.errors import ConfigError
from muster.server.config import ServerConfig, parse_address

log = logging.getLogger(__name__)

CONTROL_FD_ENV = "MUSTER_WORKER_CONTROL_FD"
"""Names a worker's end of its socket pair with the parent (an inherited descriptor)."""
WORKER_COMMAND = (sys.executable, "-m", "muster", "server")
FIRST_RESTART_DELAY = 0.5
"""Seconds before restarting a worker that died; doubled per death in a row."""
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 60.0
"""A worker that ran this long before dying is restarted after the first delay again."""
STOP_MARGIN = 60.0
"""After a stop signal, workers get ``shutdown_grace`` plus this to exit, then SIGKILL."""


def restart_delay(failures: int) -> float:
    """Seconds to wait before restarting a worker that died ``failures`` times in a row."""
    doublings = min(max(failures, 1) - 1, 16)
    return min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * float(1 << doublings))


def worker_replica_id(replica_id: str, index: int) -> str:
    """Worker ``index``'s replica id: its audit chain and its name in logs and presence."""
    return f"{replica_id[:90]}-w{index}"


def worker_metrics_addr(metrics_addr: str, index: int) -> str:
    """Worker ``index``'s ``/metrics`` listener: the configured port + ``index`` (each
    worker counts its own requests, so Prometheus scrapes every worker); port 0 stays 0."""
    if not metrics_addr:
        return ""
    host, port = parse_address(metrics_addr, name="metrics_addr")
    if port == 0:
        return metrics_addr
    if port + index > 65535:
        raise ConfigError(f"metrics_addr: port {port} + worker {index} is above 65535")
    return f"{_bracketed(host)}:{port + index}"


def reserve_port(address: str, *, name: str) -> tuple[str, socket.socket]:
    """Bind (never listen on) a SO_REUSEPORT socket at ``address``: the address with the
    real port, and the socket, which holds the port until closed."""
    host, port = parse_address(address, name=name)
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as err:
        raise ConfigError(f"{name}: cannot resolve {host!r}: {err.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as err:
        sock.close()
        raise ConfigError(f"{name}: cannot listen on {address}: {err.strerror}") from None
    return f"{_bracketed(host)}:{sock.getsockname()[1]}", sock


def worker_environ(
    config: ServerConfig,
    index: int,
    *,
    api_addr: str,
    agent_addr: str,
    log_level: str,
    base: Mapping[str, str],
) -> dict[str, str]:
    """Worker ``index``'s whole configuration, as ``MUSTER_*`` variables over ``base``:
    the settings the parent took from its flags, and the worker's own."""
    environ = dict(base)
    environ.update(
        MUSTER_DATA_DIR=str(config.data_dir.resolve()),
        MUSTER_API_ADDR=api_addr,
        MUSTER_AGENT_ADDR=agent_addr,
        MUSTER_METRICS_ADDR=worker_metrics_addr(config.metrics_addr, index),
        MUSTER_AGENT_ADVERTISE_ADDR=config.agent_advertise_addr,
        MUSTER_CONSOLE_ADDR=config.console_addr,  # served by worker 0 alone (server/app.py)
        MUSTER_TRUST_DOMAIN=config.trust_domain,
        MUSTER_DATABASE_URL=config.database_url,
        MUSTER_REPLICA_ID=worker_replica_id(config.resolved_replica_id, index),
        MUSTER_REUSE_PORT="true",
        MUSTER_WORKERS="1",
        MUSTER_WORKER_INDEX=str(index),
        MUSTER_LOG_LEVEL=log_level,
    )
    return environ


@dataclass
class _Worker:
    index: int
    environ: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    reader: asyncio.StreamReader | None = None
    """Where the worker's ready line arrives."""
    control: asyncio.StreamWriter | None = None
    """The parent's end of the socket pair (kept open: its closing tells the worker)."""
    endpoints: dict[str, Any] = field(default_factory=dict)
    """What the worker reported when it was last ready."""
    started_at: float = 0.0
    failures: int = 0
    """Deaths in a row, each within ``STABLE_AFTER`` of its start."""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class WorkerSupervisor:
    """Runs ``config.workers`` worker processes until ``stop`` is set (see the module)."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        log_level: str,
        command: Sequence[str] = WORKER_COMMAND,
        environ: Mapping[str, str] | None = None,
        delay: Callable[[int], float] = restart_delay,
    ) -> None:
        """``command`` starts one worker; ``environ`` (default: this process's) is the
        base of its environment; ``delay`` (tests shorten it) maps deaths in a row to
        seconds before the restart."""
        self._config = config
        self._delay = delay
        self._log_level = log_level
        self._command = tuple(command)
        self._base = dict(os.environ if environ is None else environ)
        self._workers: list[_Worker] = []

    async def run(self, stop: asyncio.Event) -> int:
        """Start the workers, keep them running until ``stop``, then stop them all.
        Returns the exit code: 0 when every worker exited 0 after the stop."""
        api_addr, api_sock = reserve_port(self._config.api_addr, name="api_addr")
        try:
            agent_addr, agent_sock = reserve_port(self._config.agent_addr, name="agent_addr")
        except BaseException:
            api_sock.close()
            raise
        try:
            self._workers = [
                _Worker(
                    i,
                    worker_environ(
                        self._config,
                        i,
                        api_addr=api_addr,
                        agent_addr=agent_addr,
                        log_level=self._log_level,
                        base=self._base,
                    ),
                )
                for i in range(self._config.workers)
            ]
            return await self._run(stop)
        finally:
            for worker in self._workers:
                if worker.control is not None:
                    worker.control.close()
            api_sock.close()
            agent_sock.close()
            self._config.endpoints_file.unlink(missing_ok=True)

    async def _run(self, stop: asyncio.Event) -> int:
        first, rest = self._workers[:1], self._workers[1:]
        code = await self._start_all(first)
        if code == 0:
            code = await self._start_all(rest)
        if code != 0:
            await self._stop_all()
            return code
        self._write_endpoints()
        log.info(
            "%d workers up on api %s, agents %s: pids %s",
            len(self._workers),
            first[0].endpoints.get("api"),
            first[0].endpoints.get("agent"),
            ", ".join(str(w.endpoints.get("pid")) for w in self._workers),
        )
        keepers = [
            asyncio.create_task(self._keep(w, stop), name=f"worker-{w.index}")
            for w in self._workers
        ]
        stopped = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait([stopped, *keepers], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        broken = False
        for task in done:
            if task is not stopped and (error := task.exception()) is not None:
                # A keeper only returns after a stop: this is a bug, and nothing keeps
                # the workers running any more.
                log.error("supervising %s failed", task.get_name(), exc_info=error)
                broken = True
        stop.set()
        log.info("stopping %d workers", len(self._workers))
        code = await self._stop_all(keepers)
        return 1 if broken else code

    async def _start_all(self, workers: Sequence[_Worker]) -> int:
        """Start ``workers`` and wait until each is ready: 0, or the exit code of one
        that ended first (its own log says why)."""
        for worker in workers:
            await self._spawn(worker)
        ready = await asyncio.gather(*(self._ready(w) for w in workers))
        for worker, ok in zip(workers, ready, strict=True):
            if not ok:
                assert worker.process is not None
                code = await worker.process.wait()
                log.error(
                    "worker %d (pid %d) %s before it was ready; stopping",
                    worker.index,
                    worker.process.pid,
                    _ended(code),
                )
                return code or 1
        return 0

    async def _spawn(self, worker: _Worker) -> None:
        if worker.control is not None:
            worker.control.close()
            worker.control = None
        ours, theirs = socket.socketpair()
        try:
            environ = {**worker.environ, CONTROL_FD_ENV: str(theirs.fileno())}
            worker.process = await asyncio.create_subprocess_exec(
                *self._command,
                env=environ,
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
            worker.reader, worker.control = await asyncio.open_connection(sock=ours)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker.started_at = asyncio.get_running_loop().time()
        worker.endpoints = {}

    async def _ready(self, worker: _Worker) -> bool:
        """Wait for the worker's ready line: False if it ended without one."""
        assert worker.reader is not None
        line = await worker.reader.readline()
        if not line:
            return False
        try:
            worker.endpoints = json.loads(line)
        except ValueError:
            log.error("worker %d sent an unreadable ready line", worker.index)
            return False
        return True

    async def _keep(self, worker: _Worker, stop: asyncio.Event) -> None:
        """Restart ``worker`` whenever it ends without a stop; return after a stop."""
        loop = asyncio.get_running_loop()
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if stop.is_set():
                return
            uptime = loop.time() - worker.started_at
            worker.failures = 1 if uptime >= STABLE_AFTER else worker.failures + 1
            delay = self._delay(worker.failures)
            log.warning(
                "worker %d (pid %d) %s unexpectedly after %.1fs; restarting it in %.1fs",
                worker.index,
                worker.process.pid,
                _ended(code),
                uptime,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            await self._spawn(worker)
            if stop.is_set():  # the stop came while it was being started: it drains too
                _signal(worker, signal.SIGTERM)
            if await self._ready(worker):
                log.info("worker %d restarted: pid %s", worker.index, worker.endpoints.get("pid"))
                self._write_endpoints()

    async def _stop_all(self, keepers: Sequence[asyncio.Task[None]] = ()) -> int:
        """SIGTERM every running worker and wait for all (SIGKILL after the margin):
        0 when each exited 0. A worker already dead (waiting for its restart) had its
        end logged then and does not count."""
        stopping = [w for w in self._workers if w.running]
        for worker in stopping:
            _signal(worker, signal.SIGTERM)
        timeout = self._config.shutdown_grace.total_seconds() + STOP_MARGIN
        waits = [w.process.wait() for w in self._workers if w.process is not None]
        everything = [*keepers, *(asyncio.ensure_future(w) for w in waits)]
        if everything:
            _, late = await asyncio.wait(everything, timeout=timeout)
            if late:
                for worker in self._workers:
                    if worker.running:
                        log.error(
                            "worker %d did not stop in %.0fs: killing it", worker.index, timeout
                        )
                        _signal(worker, signal.SIGKILL)
                await asyncio.wait(everything)
        codes = {w.index: w.process.returncode for w in stopping if w.process is not None}
        for index, code in codes.items():
            if code != 0:
                log.warning("worker %d %s after the stop", index, _ended(code))
        return 0 if all(code == 0 for code in codes.values()) else 1

    def _write_endpoints(self) -> None:
        """``endpoints.json``: the shared addresses, this parent's pid and each worker's."""
        first = self._workers[0].endpoints
        endpoints = {
            "api": first.get("api", ""),
            "agent": first.get("agent", ""),
            "metrics": first.get("metrics", ""),
            "pid": os.getpid(),
            "workers": [
                {
                    "index": w.index,
                    "pid": w.endpoints.get("pid"),
                    "replica_id": w.endpoints.get("replica_id"),
                    "metrics": w.endpoints.get("metrics", ""),
                }
                for w in self._workers
            ],
        }
        path = self._config.endpoints_file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(endpoints, indent=2) + "\n")
        os.replace(tmp, path)


class ParentLink:
    """A worker's end of the socket pair with its ``--workers`` parent."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sock.setblocking(False)
        self._watching = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None) -> ParentLink | None:
        """The link named by ``MUSTER_WORKER_CONTROL_FD`` (taken out of the environment,
        so nothing this process starts inherits it), or None outside a worker."""
        raw = (os.environ if environ is None else environ).pop(CONTROL_FD_ENV, None)
        if raw is None:
            return None
        if not raw.isdigit():
            raise ConfigError(f"{CONTROL_FD_ENV}: {raw!r} is not a file descriptor")
        try:
            return cls(socket.socket(fileno=int(raw)))
        except OSError as err:
            raise ConfigError(f"{CONTROL_FD_ENV}: {raw}: {err.strerror}") from None

    def watch(self, on_gone: Callable[[], None]) -> None:
        """Call ``on_gone`` once when the parent's end closes (the parent died)."""
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = self._sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._unwatch()
                log.warning("the --workers parent process is gone: shutting down")
                on_gone()

        loop.add_reader(self._sock.fileno(), readable)
        self._watching = True

    async def ready(self, info: Mapping[str, Any]) -> None:
        """Tell the parent this worker serves, and where."""
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(self._sock, json.dumps(dict(info)).encode() + b"\n")
        except OSError as err:
            log.warning("cannot tell the --workers parent this worker is ready: %s", err)

    def close(self) -> None:
        self._unwatch()
        self._sock.close()

    def _unwatch(self) -> None:
        if self._watching:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._watching = False


def _signal(worker: _Worker, sig: int) -> None:
    if worker.process is not None and worker.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            worker.process.send_signal(sig)


def _ended(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
