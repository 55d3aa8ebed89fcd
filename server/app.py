"""Assembles the control plane: storage, CA, the two gRPC listeners, /metrics, the reaper.

``start_server(config)`` returns a running :class:`ServerHandle` with the real bound
ports (bind port 0 in tests); ``await handle.stop()`` shuts it down gracefully. Signal
handling lives in the CLI, not here. Every background task is supervised
(server/supervisor.py): when one crashes, health turns NOT_SERVING and the server stops
itself the way ``stop()`` does; ``handle.crash`` then says which one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from muster.errors import ConfigError
from muster.server.ai.prices import PriceTable
from muster.server.audit import AuditRecord, AuditWriter, record_in
from muster.server.ca import CertificateAuthority, ServerCertificate, ServerCertificates
from muster.server.ca.keystore import key_store
from muster.server.ca.publish import CrlPublisher, ca_routes
from muster.server.ca.reload import CAReloader
from muster.server.clock import Clock, SystemClock, sleep_unless
from muster.server.config import ServerConfig, parse_address
from muster.server.console import ConsoleServer, start_console
from muster.server.console.server import ConsoleParts
from muster.server.dispatch.budgets import BudgetGate
from muster.server.dispatch.dispatcher import Dispatcher
from muster.server.dispatch.fanout import Fanout
from muster.server.dispatch.fanout_auth import REASONS as FANOUT_REJECTIONS
from muster.server.dispatch.hub import Hub
from muster.server.dispatch.inflight import InflightLimits
from muster.server.dispatch.metering import Metering
from muster.server.dispatch.presence import Presence
from muster.server.interceptors.auth import ApiTokenAuth
from muster.server.interceptors.errors import ErrorsInterceptor
from muster.server.interceptors.identity import AgentIdentityAuth
from muster.server.interceptors.metrics import GrpcServerMetrics, MetricsInterceptor
from muster.server.metrics import MetricsServer, MusterMetrics, start_metrics_server
from muster.server.quotas import (
    QuotaPolicy,
    Quotas,
    QuotaStoreUnavailable,
    RateLimit,
    RedisQuotaStore,
)
from muster.server.services.admin import AdminService, create_api_token
from muster.server.services.agents import AgentService
from muster.server.services.ai_submit import AiAdmission
from muster.server.services.enrollment import EnrollmentService
from muster.server.services.tasks import TaskService
from muster.server.storage import identities
from muster.server.storage.database import Database
from muster.server.storage.migrate import ensure_schema
from muster.server.supervisor import Crash, Supervisor
from muster.server.token_cache import ApiTokenCache
from muster.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    enrollment_pb2,
    enrollment_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)

log = logging.getLogger(__name__)

API_SERVICES = (
    enrollment_pb2.DESCRIPTOR.services_by_name["EnrollmentService"],
    task_pb2.DESCRIPTOR.services_by_name["TaskService"],
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
)
AGENT_SERVICES = (agent_pb2.DESCRIPTOR.services_by_name["AgentService"],)
GAUGE_REFRESH_SECONDS = 5.0
BACKGROUND_STOP_TIMEOUT = 10.0
"""How long :meth:`ServerHandle.stop` lets background loops finish their pass."""


@dataclass
class ServerHandle:
    """A running control plane. ``stop()`` is idempotent."""

    config: ServerConfig
    api_port: int
    agent_port: int
    metrics_port: int | None
    agent_endpoint: str
    ca: CertificateAuthority
    server_certificates: ServerCertificates
    """The certificate both listeners serve now (renewed while the server runs)."""
    ca_reloader: CAReloader
    """Keeps ``ca`` in step with the CA's shared record (its reaper pass calls refresh)."""
    db: Database
    hub: Hub
    registry: CollectorRegistry
    admin_token: str | None
    """The dev admin token's secret if this start created it (to show once), else None."""
    _api: grpc.aio.Server
    _agent: grpc.aio.Server
    _health: health.aio.HealthServicer
    _metrics_http: MetricsServer | None
    _audit: AuditWriter
    _fanout: Fanout
    _inflight: InflightLimits
    _quotas: Quotas
    presence: Presence
    console: ConsoleServer | None
    """The web console, when ``console_addr`` turned it on."""
    """Cluster-wide presence as this replica writes and reads it (tests move its clock)."""
    supervisor: Supervisor
    """Owns the background tasks; its first crash stops the server."""
    _background: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by :meth:`stop`: background loops finish their pass and return."""
    _stop_task: asyncio.Task[None] | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def metrics_address(self) -> str | None:
        if self.metrics_port is None:
            return None
        host = parse_address(self.config.metrics_addr, name="metrics_addr")[0]
        return f"{_connect_host(host)}:{self.metrics_port}"

    @property
    def console_url(self) -> str | None:
        """``https://host:port/`` of the web console; None when it is off."""
        if self.console is None:
            return None
        host = parse_address(self.config.console_addr, name="console_addr")[0]
        return f"https://{_connect_host(host)}:{self.console.port}/"

    @property
    def api_address(self) -> str:
        host = parse_address(self.config.api_addr, name="api_addr")[0]
        return f"{_connect_host(host)}:{self.api_port}"

    async def flush_audit(self) -> None:
        """Wait until every audit event queued so far is in the database."""
        await self._audit.flush()

    @property
    def crash(self) -> Crash | None:
        """The background task whose crash stopped the server, if one did."""
        return self.supervisor.crash

    async def stop(self, grace: float | None = None) -> None:
        """Drain agents, stop both listeners, then flush the audit trail and close the
        database. Idempotent: a second call (or one after a crash began the shutdown)
        waits for the same shutdown."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stop_task)

    async def wait_stopped(self) -> None:
        """Wait until the server has stopped (after :meth:`stop`, or after a crash)."""
        await self._stopped.wait()

    def _crashed(self, crash: Crash) -> None:
        """A background task crashed: the shutdown of SIGTERM, health NOT_SERVING first."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop(None))
            self._stop_task.add_done_callback(_log_stop_failure)

    async def _stop(self, grace: float | None) -> None:
        self.supervisor.stop()  # from here on, background tasks end because we end them
        grace = self.config.shutdown_grace.total_seconds() if grace is None else grace
        await self._health.enter_graceful_shutdown()
        # A handover, not a requeue: every agent is sent Drain and reconnects with its
        # running work listed in Hello; what its stream held stays its own for the
        # handover grace (AgentSession.drain). The agent listener stops listening now, so
        # an agent that knows other replicas reaches one of them at once; open streams
        # get ``grace`` to end.
        self.hub.drain_all("server shutting down")
        agent_stopped = asyncio.ensure_future(self._agent.stop(grace))
        await self.hub.wait_idle(grace)
        await asyncio.gather(self._api.stop(1.0), agent_stopped)
        if self.console is not None:
            await self.console.close()
        await self.hub.wait_idle(5.0)  # cut streams hand their work over first
        # Background loops end between passes: one cancelled inside a database call can
        # leave its connection half-used and the audit writer's last flush waiting on it.
        self._stopping.set()
        if self._background:
            await asyncio.wait(self._background, timeout=BACKGROUND_STOP_TIMEOUT)
        for task in self._background:
            task.cancel()  # the backstop, for a pass that hangs
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # an error was the supervisor's to report
        # What the on-demand writers hold (suspicion reports, releases, transactions).
        with contextlib.suppress(TimeoutError):
            drains = [drain.wait() for drain in self.supervisor.drains.values()]
            await asyncio.wait_for(asyncio.gather(*drains), BACKGROUND_STOP_TIMEOUT)
        if self._metrics_http is not None:
            await self._metrics_http.close()
        await self._fanout.close()
        await self._inflight.close()  # the releases of the last attempts
        await self._quotas.close()
        await self._audit.close()
        await self.db.close()
        self.config.endpoints_file.unlink(missing_ok=True)
        self._stopped.set()
        log.info("server stopped")

    async def wait(self) -> None:
        await self._api.wait_for_termination()


def _log_stop_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("stopping the server after a crash failed", exc_info=task.exception())


async def start_server(
    config: ServerConfig,
    *,
    extra_api_handlers: Sequence[grpc.GenericRpcHandler] = (),
    clock: Clock | None = None,
) -> ServerHandle:
    """Start the control plane. ``extra_api_handlers`` are served on the api listener
    too (behind the same interceptors); tests use it to show that a service without an
    access rule is refused. ``clock`` (default: the real time) is the time of every
    task transition, lease and timeout, and of the server certificate's renewal; tests
    pass a :class:`~muster.server.clock.ManualClock` and advance it instead of sleeping."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(
        config.resolved_database_url,
        audit_chain=config.resolved_replica_id,
        echo=config.database_echo,
        pool_size=config.database_pool_size,
        pool_timeout=config.database_pool_timeout.total_seconds(),
    )
    cleanup = contextlib.AsyncExitStack()
    cleanup.push_async_callback(db.close)
    supervisor = Supervisor()
    try:
        return await _start(
            config, db, cleanup, supervisor, tuple(extra_api_handlers), clock or SystemClock()
        )
    except BaseException:
        # Whatever started is stopped again: no half-running server, no leaked sockets.
        supervisor.stop()
        await cleanup.aclose()
        raise


async def _start(
    config: ServerConfig,
    db: Database,
    cleanup: contextlib.AsyncExitStack,
    supervisor: Supervisor,
    extra_api_handlers: tuple[grpc.GenericRpcHandler, ...],
    clock: Clock,
) -> ServerHandle:
    db.group.on_crash = supervisor.hook("group-commit", db.group.drain)
    await ensure_schema(db, config.migrate)
    keys = key_store(config)  # the HSM of MUSTER_CA_SIGNER (logged in), or the CA's key files
    reloader = await CAReloader.open(
        db,
        keys,
        config.ca_dir,
        config.trust_domain,
        crl_url=config.crl_url,
        init_keys=keys if config.ca_signer else None,  # key files keep init's classic names
    )
    ca = reloader.ca
    server_certs = ServerCertificates(
        ca,
        config.data_dir / "server",
        dns_names=list(config.server_hostnames),
        ip_addresses=list(config.server_ips),
        lifetime=config.server_cert_ttl,
        clock=clock,
    )
    registry = CollectorRegistry()
    metrics = MusterMetrics(registry)
    grpc_metrics = GrpcServerMetrics(registry)
    grpc_metrics.initialize(*API_SERVICES, *AGENT_SERVICES)
    metrics.watch_certificate_expiry(
        lambda: {
            "root": ca.root_not_after,
            "intermediate": ca.intermediate_not_after,
            "server": server_certs.current.not_after,
        }
    )
    metrics.trust_bundle_version.set_function(lambda: ca.bundle_version)
    policy = QuotaPolicy(
        submissions=RateLimit(config.submission_rate, config.submission_burst),
        enrollments=RateLimit(config.enrollment_rate, config.enrollment_burst),
        inflight_per_tenant=config.inflight_per_tenant,
        inflight_per_pool=config.inflight_per_pool,
        ai_requests_per_minute=config.ai_requests_per_minute,
        ai_tokens_per_minute=config.ai_tokens_per_minute,
    )
    prices = PriceTable.load(Path(config.prices_file) if config.prices_file else None)
    quotas = Quotas.from_config(config.redis_url, config.redis_prefix, policy, metrics)
    if config.redis_url:
        try:
            await quotas.ping()
        except QuotaStoreUnavailable as err:
            # Not fatal: rate limits fall back to a local cap, leases and spend fail closed.
            log.warning("the Redis quota store is unreachable at start: %s", err)
    cleanup.push_async_callback(quotas.close)
    if isinstance(quotas.store, RedisQuotaStore):
        decisions = quotas.store.decisions
        decisions.on_crash = supervisor.hook("quota-decisions", decisions.drain)
    audit = AuditWriter(db, spool_path=config.data_dir / "audit-spool")
    audit.start()
    assert audit.task is not None
    supervisor.watch("audit-writer", audit.task)
    cleanup.push_async_callback(audit.close)
    metrics.audit_queue_depth.set_function(lambda: audit.depth)
    metrics.audit_spool_bytes.set_function(lambda: audit.spool_bytes)
    hub = Hub()
    for reason in FANOUT_REJECTIONS:
        metrics.fanout_rejected.labels(reason)
    fanout = Fanout(
        hub,
        origin=f"{config.resolved_replica_id}:{os.getpid()}:{secrets.token_hex(4)}",
        redis_url=config.redis_url,
        prefix=config.redis_prefix,
        secret=config.resolved_fanout_secret() if config.redis_url else b"",
        rejected=lambda reason: metrics.fanout_rejected.labels(reason).inc(),
    )
    await fanout.start()
    for name, task in fanout.tasks.items():
        supervisor.watch(name, task)
    cleanup.push_async_callback(fanout.close)
    metrics.agents_connected.set_function(hub.connected_by_pool)
    inflight = InflightLimits(quotas)
    supervisor.adopt("inflight-release", inflight.releaser)
    budgets = BudgetGate(db, quotas, metrics)
    if not config.redis_url:
        await budgets.restore()  # the in-process store starts empty
    dispatcher = Dispatcher(
        db,
        fanout,
        audit,
        metrics,
        config,
        inflight,
        budgets,
        Metering(prices, metrics),
        clock=clock,
    )
    supervisor.adopt("suspicion-reports", dispatcher.suspicion.reports)

    token_cache = ApiTokenCache()
    agent_server = grpc.aio.server(
        interceptors=[
            MetricsInterceptor(grpc_metrics),
            ErrorsInterceptor(),
            AgentIdentityAuth(db, config.trust_domain, audit, metrics),
        ],
        options=_server_options(config, agent=True),
    )
    agent_pb2_grpc.add_AgentServiceServicer_to_server(
        AgentService(dispatcher, reloader, quotas), agent_server
    )
    cleanup.push_async_callback(agent_server.stop, None)
    agent_port = _bind(
        agent_server,
        config.agent_addr,
        _listener_credentials(server_certs, ca, client_certificates=True),
        "agent_addr",
    )
    agent_host = parse_address(config.agent_addr, name="agent_addr")[0]
    agent_endpoint = (
        config.agent_advertise_addr or f"{_advertised_host(agent_host, config)}:{agent_port}"
    )

    api_auth = ApiTokenAuth(db, quotas, audit, metrics, token_cache, reflection=config.reflection)
    api_server = grpc.aio.server(
        interceptors=[MetricsInterceptor(grpc_metrics), ErrorsInterceptor(), api_auth],
        options=_server_options(config, agent=False),
    )
    enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server(
        EnrollmentService(db, reloader, quotas, audit, metrics, config, agent_endpoint),
        api_server,
    )
    task_pb2_grpc.add_TaskServiceServicer_to_server(
        TaskService(dispatcher, quotas, config, AiAdmission(db, quotas, prices, config, budgets)),
        api_server,
    )
    admin_service = AdminService(
        db,
        fanout,
        metrics,
        config.trust_domain,
        token_cache,
        quotas,
        prices,
        presence=dispatcher.presence,
    )
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin_service, api_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, api_server)
    if config.reflection:
        names = [s.full_name for s in API_SERVICES]
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], api_server
        )
    if extra_api_handlers:
        api_server.add_generic_rpc_handlers(extra_api_handlers)
    cleanup.push_async_callback(api_server.stop, None)
    api_port = _bind(
        api_server,
        config.api_addr,
        _listener_credentials(server_certs, ca, client_certificates=False),
        "api_addr",
    )

    admin_secret = await _ensure_admin_token(db, config.admin_token_file)
    await agent_server.start()
    await api_server.start()
    for name in ["", *(s.full_name for s in API_SERVICES)]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    metrics_http = None
    metrics_port = None
    if config.metrics_addr:
        host, port = parse_address(config.metrics_addr, name="metrics_addr")
        try:
            crls = CrlPublisher(
                db,
                lambda: ca.signer,
                keys,
                lifetime=config.crl_lifetime,
                clock=clock,
            )
            routes = ca_routes(crls, lambda: ca.bundle_pem)
            metrics_http = await start_metrics_server(registry, host, port, routes=routes)
        except OSError as err:
            raise ConfigError(
                f"metrics_addr: cannot listen on {config.metrics_addr}: {err.strerror}"
            ) from None
        cleanup.push_async_callback(metrics_http.close)
        metrics_port = metrics_http.port

    console = None
    # One process serves a console port (its sessions are in memory): with --workers, worker 0.
    if config.console_addr and config.worker_index <= 0:
        parts = ConsoleParts(
            db=db,
            admin=admin_service,
            presence=dispatcher.presence,
            tokens=api_auth.check,
            audit=audit,
            certificates=server_certs,
            clock=clock,
        )
        console = await start_console(config, parts)
        cleanup.push_async_callback(console.close)

    handle = ServerHandle(
        config=config,
        api_port=api_port,
        agent_port=agent_port,
        metrics_port=metrics_port,
        agent_endpoint=agent_endpoint,
        ca=ca,
        server_certificates=server_certs,
        ca_reloader=reloader,
        db=db,
        hub=hub,
        registry=registry,
        admin_token=admin_secret,
        _api=api_server,
        _agent=agent_server,
        _health=health_servicer,
        _metrics_http=metrics_http,
        _audit=audit,
        _fanout=fanout,
        _inflight=inflight,
        _quotas=quotas,
        presence=dispatcher.presence,
        console=console,
        supervisor=supervisor,
    )
    reloader.on_change = partial(_ca_changed, server_certs, hub)
    handle._background.append(
        supervisor.start(
            "reaper",
            _reaper(
                dispatcher,
                reloader,
                config,
                renew_every=policy.inflight_lease_ttl / 3,
                stopping=handle._stopping,
                clock=clock,
            ),
        )
    )
    handle._background.append(
        supervisor.start("server-certificate", server_certs.run(handle._stopping))
    )
    _write_endpoints(handle)
    cleanup.pop_all()  # the handle owns everything now
    supervisor.on_crash(handle._crashed)  # at once, if one crashed while starting
    log.info(
        "muster server up: api %s, agents %s, metrics %s, console %s, data %s",
        api_port,
        agent_endpoint,
        metrics_port,
        handle.console_url or "off",
        config.data_dir,
    )
    return handle


def _listener_credentials(
    certificates: ServerCertificates, ca: CertificateAuthority, *, client_certificates: bool
) -> grpc.ServerCredentials:
    """TLS credentials that always serve the current server certificate: grpc asks the
    fetcher at each new connection, so a renewed certificate (or a changed CA bundle) is
    served without a restart, while open connections keep what they began with.
    ``client_certificates``: require one chained to Muster's CA (the agent listener)."""

    def configuration(
        cert: ServerCertificate, bundle: bytes
    ) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(cert.private_key_pem, cert.chain_pem)],
            root_certificates=bundle if client_certificates else None,
        )

    served = (certificates.current, ca.bundle_pem)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        # Runs on a grpc thread at every handshake: None keeps what grpc has.
        nonlocal served
        current = (certificates.current, ca.bundle_pem)
        if current[0] is served[0] and current[1] == served[1]:
            return None
        served = current
        return configuration(*current)

    return grpc.dynamic_ssl_server_credentials(
        configuration(*served),
        fetch,  # type: ignore[arg-type]  # grpc documents None (no change); its stub does not
        require_client_authentication=client_certificates,
    )


def _bind(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials, name: str
) -> int:
    """Add a listening port, or fail with a message that names the setting."""
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigError(f"{name}: cannot listen on {address} (in use, or not an address here)")
    return port


def _server_options(config: ServerConfig, *, agent: bool) -> list[tuple[str, Any]]:
    """grpc core channel arguments of one listener (``agent``: the agent listener)."""
    options: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Covers the TLS handshake and the client's HTTP/2 preface: a socket that never
        # speaks is closed after this, not after grpc's default of 120 s.
        ("grpc.server_handshake_timeout_ms", _milliseconds(config.handshake_timeout)),
        # Off unless asked: a second server on the same port by mistake must fail to bind.
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
    ]
    if config.connection_idle_timeout:
        idle = _milliseconds(config.connection_idle_timeout)
        options.append(("grpc.max_connection_idle_ms", idle))
    if agent:
        # Advertised in SETTINGS; a stream beyond it is reset with REFUSED_STREAM. The
        # api listener has no such cap: one client multiplexes many calls on purpose.
        streams = config.agent_max_streams_per_connection
        options.append(("grpc.max_concurrent_streams", streams))
    return options


def _milliseconds(duration: timedelta) -> int:
    """A duration as a grpc channel argument (a C int of milliseconds, at least 1)."""
    return max(1, min(int(duration.total_seconds() * 1000), 2**31 - 1))


def _ca_changed(server_certs: ServerCertificates, hub: Hub) -> None:
    """The CA rotated: a server certificate from the new issuing intermediate (the
    listeners serve it from the next handshake), the bundle and Renews to the streams."""
    try:
        server_certs.renew()
    except Exception:  # keep serving the current one; its renewal loop tries again
        log.exception("reissuing the server certificate after a CA change failed")
    hub.trust_changed()


async def _reaper(
    dispatcher: Dispatcher,
    reloader: CAReloader,
    config: ServerConfig,
    renew_every: float,
    stopping: asyncio.Event,
    clock: Clock,
) -> None:
    """Requeues lost leases, times out late tasks, applies what other replicas changed
    (the CA's rotations included), renews in-flight slots, keeps this replica's agents
    present and refreshes the queue gauges, until ``stopping`` is set. It passes every
    ``poll_interval`` on ``clock`` (a manual clock: one pass each time a test advances it
    past the next)."""
    loop = asyncio.get_running_loop()
    next_gauges = next_renewal = next_presence = loop.time()
    presence_every = dispatcher.presence.refresh_every.total_seconds()
    while not stopping.is_set():
        try:
            # Its own step: the CA reloads even when a step below fails, and vice versa.
            await reloader.refresh()
        except Exception:
            log.exception("reloading the CA failed")
        try:
            # First: presence needs only the database, so a failing step below (the
            # quota store down) must not make this replica's agents look gone.
            if loop.time() >= next_presence:
                await dispatcher.presence.refresh()
                next_presence = loop.time() + presence_every
            await dispatcher.reap()
            await dispatcher.poll_queues()
            await dispatcher.sync_streams()
            if loop.time() >= next_gauges:
                await dispatcher.refresh_gauges()
                next_gauges = loop.time() + GAUGE_REFRESH_SECONDS
            if loop.time() >= next_renewal:
                await dispatcher.renew_inflight()
                next_renewal = loop.time() + renew_every
        except Exception:  # keep reaping; one bad pass must not stop requeueing forever
            log.exception("reaper pass failed")
        await sleep_unless(clock, stopping, config.poll_interval.total_seconds())
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            # Cancelled, but a step swallowed it (asyncio.wait_for on Python 3.11 can, when
            # what it waited for finished at the same moment): end as cancelled all the same,
            # so the supervisor sees it (seen once in some hundred runs of its test).
            raise asyncio.CancelledError


async def _ensure_admin_token(db: Database, path: Path) -> str | None:
    """First start: create an admin API token and write it, 0600, to ``path``.

    Returns the secret when created (the CLI shows it once), else None.
    """
    async with db.transaction() as session:
        if path.exists() and await identities.has_live_admin_token(session):  # noqa: ASYNC240
            return None
        row, secret = await create_api_token(session, "admin", "admin")
        await record_in(
            session,
            AuditRecord(
                actor="server",
                action="api_token.create",
                target=row.token_id,
                details={"name": "admin", "role": "admin"},
            ),
        )
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(path.with_suffix(".tmp"), path)
    log.info("created the admin API token in %s", path)
    return secret


def _write_endpoints(handle: ServerHandle) -> None:
    """Publish the bound addresses (ports may have been 0) for scripts, tests and operators."""
    endpoints = {
        "api": handle.api_address,
        "agent": handle.agent_endpoint,
        "metrics": handle.metrics_address or "",
        "console": handle.console_url or "",
        "pid": os.getpid(),
    }
    tmp = handle.config.endpoints_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(endpoints, indent=2) + "\n")
    os.replace(tmp, handle.config.endpoints_file)


_WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104 (recognising, not binding)


def _advertised_host(bind_host: str, config: ServerConfig) -> str:
    """The host agents elsewhere should dial: the first server hostname for a wildcard bind."""
    if bind_host in _WILDCARDS:
        return config.server_hostnames[0] if config.server_hostnames else "localhost"
    return _bracketed(bind_host)


def _connect_host(bind_host: str) -> str:
    """The host a client on this machine dials to reach a listener bound to ``bind_host``."""
    return "127.0.0.1" if bind_host in _WILDCARDS else _bracketed(bind_host)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
