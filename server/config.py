"""Server configuration: one typed object, read from flags, ``MUSTER_*`` variables and ``.env``.

Precedence is flag > environment > ``.env`` > default. Everything is validated when the
object is built, so a bad setting fails at start with a message naming the setting.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from muster import durations
from muster.errors import ConfigError

_TRUST_DOMAIN = re.compile(r"^[a-z0-9][a-z0-9.-]{0,253}$")
_CRL_URL = re.compile(r"^https?://[!-z|~]{1,1000}$")
"""Printable ASCII without spaces or braces ({ca} is taken out before matching)."""


def parse_duration(value: str, *, name: str = "duration") -> timedelta:
    """A duration setting (``30s``, ``10m``, ``24h``; a bare number is seconds)."""
    try:
        return durations.parse_duration(value)
    except ValueError as err:
        raise ConfigError(f"{name}: {err}") from None


def parse_address(value: str, *, name: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6); port 0 asks the OS for a free port."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{name}: {value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything ``muster server`` needs; defaults give the embedded single-node setup."""

    data_dir: Path = Path(".muster")
    """Holds the SQLite database, the dev CA (``ca/``), server certificate and ``admin.token``."""
    api_addr: str = "127.0.0.1:7443"
    """TLS listener for enrollment, tasks, admin, health and reflection."""
    agent_addr: str = "127.0.0.1:7444"
    """Mutual-TLS listener for agents (AgentService)."""
    metrics_addr: str = "127.0.0.1:9464"
    """Plain HTTP ``/metrics`` for Prometheus; empty disables it."""
    console_addr: str = ""
    """HTTPS listener of the read-only web console (``docs/console.md``), served with the
    server's certificate; sign in with an ``admin`` or ``viewer`` API token. Empty (the
    default) turns it off; ``muster dev`` turns it on at ``127.0.0.1:7445``."""
    console_session_ttl: timedelta = timedelta(hours=8)
    """How long a console sign-in lasts at most (it also ends after 30 minutes without a
    request, at sign-out, and when its API token is deleted or expires). 1m to 7d."""
    agent_advertise_addr: str = ""
    """The agent listener address told to enrolling agents; default: the bound agent address."""
    trust_domain: str = "muster.local"
    """SPIFFE trust domain of every identity this server issues and accepts."""
    database_url: str = ""
    """SQLAlchemy async URL; default ``sqlite+aiosqlite:///<data_dir>/muster.db``.
    Production: ``postgresql+asyncpg://user@host/db``."""
    database_pool_size: int = 10
    """Connections kept open to Postgres (SQLite always uses one)."""
    database_pool_timeout: timedelta = timedelta(seconds=30)
    """How long a request waits for a free database connection before failing."""
    database_echo: bool = False
    """Log every SQL statement (debugging only: statements carry no secrets, but are many)."""
    migrate: str = "auto"
    """Apply database migrations at start: ``yes``, ``no``, or ``auto`` (only for SQLite)."""
    redis_url: str = ""
    """``redis://`` or ``rediss://`` URL (user and password allowed) of the shared quota store
    and replica fan-out; empty keeps both in this process."""
    redis_prefix: str = "muster"
    """Prefix of every Redis key and channel, so several deployments can share one Redis."""
    submission_rate: float = 500.0
    """Sustained task submissions per second allowed to one principal (API token name)."""
    submission_burst: int = 5000
    """Submissions one principal may make at once before the rate applies."""
    enrollment_rate: float = 1.0
    """Sustained enrollment attempts per second allowed from one peer address."""
    enrollment_burst: int = 30
    """Enrollment attempts one peer address may make at once (a fleet behind one NAT)."""
    inflight_per_tenant: int = 1000
    """Attempts one tenant (API token name) may have assigned or running at once."""
    inflight_per_pool: int = 0
    """Attempts one pool may have assigned or running at once; 0 means no limit."""
    replica_id: str = ""
    """This replica's name in the audit chain and logs; default: the host name."""
    reuse_port: bool = False
    """Bind with SO_REUSEPORT so several replicas on one machine share the listener ports."""
    workers: int = 1
    """Server processes on this host (``muster server --workers N``): a parent starts N
    workers that share the api and agent ports (SO_REUSEPORT), so one host uses all its
    cores. Each is a replica (``<replica_id>-w<i>``), so N > 1 needs what replicas need:
    PostgreSQL and Redis. 1: one process, no parent (see ``server/workers.py``)."""
    worker_index: int = -1
    """Set by the ``--workers`` parent in each worker's environment (0..N-1): the worker
    writes ``endpoints.worker<i>.json`` and the parent ``endpoints.json``. -1: not a worker."""
    server_hostnames: tuple[str, ...] = ("localhost",)
    """DNS names put in the server certificate (besides the listeners' IPs)."""
    server_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    """IP addresses put in the server certificate."""
    cert_lifetime: timedelta = timedelta(hours=24)
    """Lifetime of agent certificates; renewal happens at half to two thirds of it."""
    server_cert_ttl: timedelta = timedelta(days=90)
    """Lifetime of the server's own TLS certificate (issued from the intermediate into
    ``data_dir/server``). The running server renews it when a third of it (at most 30
    days) is left and serves the new one without a restart; open connections keep theirs.
    At least 3s (short values are for tests)."""
    crl_url: str = ""
    """When set, every certificate issued (agents and servers) names this URL as its CRL
    distribution point; ``{ca}`` in it is replaced by the issuing intermediate's id, e.g.
    ``http://muster.example:9464/ca/crl/{ca}`` (the metrics listener serves the CRLs).
    Empty: no distribution point."""
    crl_lifetime: timedelta = timedelta(hours=1)
    """A published CRL's ``nextUpdate`` is this long after its ``thisUpdate``; it is
    rebuilt after half of it, and at once after a revocation. 1m to 7d."""
    ca_signer: str = ""
    """Where the CA's keys live: empty for key files in ``data_dir/ca``, or a PKCS#11 token
    (an HSM): ``pkcs11:module=LIBRARY;token=LABEL;pin-file=PATH`` (see
    ``server/ca/pkcs11.py``). The PIN is read from the file, never from this setting."""
    heartbeat_interval: timedelta = timedelta(seconds=5)
    """How often agents must heartbeat."""
    lease_duration: timedelta = timedelta(seconds=30)
    """A running attempt whose lease is not renewed by a heartbeat within this is requeued."""
    accept_timeout: timedelta = timedelta(seconds=10)
    """An assignment not Accepted within this is requeued."""
    eager_dispatch: bool = True
    """Assign a task in its submit's own transaction to an idle stream of its pool on this
    replica with credit, and push it at once (no claim); off: every task is queued and
    claimed (``MUSTER_EAGER_DISPATCH=false``, to compare the two)."""
    hello_timeout: timedelta = timedelta(seconds=10)
    """A stream that sends no Hello within this is closed."""
    poll_interval: timedelta = timedelta(seconds=1)
    """How often the reaper runs: lease and task timeouts, plus the polling backstop that
    carries new work, cancellations, revocations and disabled agents between replicas
    should a pub/sub message be missed."""
    max_stream_age: timedelta = timedelta(hours=1)
    """An agent stream older than this (±10 %) is sent Drain: the agent reconnects, its
    running work handed over (see ``handover_grace``), which spreads agents over replicas
    again after one failed. 0: never."""
    max_payload_bytes: int = 1 << 20
    """Cap on task payloads and outputs."""
    default_max_attempts: int = 3
    """Attempts for a task that does not say."""
    shutdown_grace: timedelta = timedelta(seconds=10)
    """On SIGTERM: how long drained agents get to report and reconnect elsewhere before
    their streams are cut."""
    handover_grace: timedelta = timedelta(minutes=5)
    """A stream this replica drained (shutdown or maximum age) hands its attempts over
    instead of requeueing them: their leases run this long from the stream's end, so the
    agent can bring them, still running or finished in its outbox, to its next stream here
    or on another replica (a planned restart of up to this long costs no attempt). An
    agent that never comes back loses them after it, as after a lease expiry."""
    prices_file: str = ""
    """A JSON price table merged over the shipped one (same format as
    ``server/ai/prices.json``): add a model or correct a price without a release."""
    ai_max_tokens: int = 64_000
    """The largest ``max_tokens`` an AI task may ask for."""
    ai_max_messages: int = 1000
    """The most messages an AI task's payload may hold."""
    claude_code_max_cost_usd: float = 1.0
    """What a ``claude-code`` attempt reserves (and is capped at, ``--max-budget-usd``)
    when its task sets no ``max_cost_usd``: its cost is not bounded by tokens."""
    ai_requests_per_minute: int = 600
    """AI task submissions per minute allowed to one tenant."""
    ai_tokens_per_minute: int = 2_000_000
    """Estimated AI tokens (input estimate + max_tokens) submitted per minute by one tenant."""
    handshake_timeout: timedelta = timedelta(seconds=10)
    """A connection to either listener that has not finished its TLS handshake and sent its
    HTTP/2 preface within this is closed, so silent or slow sockets cannot pile up."""
    connection_idle_timeout: timedelta = timedelta(minutes=5)
    """A connection that carries no call for this long is closed (HTTP/2 GOAWAY; a client
    reconnects on its next call). An agent's open stream keeps its connection busy. 0: never."""
    agent_max_streams_per_connection: int = 4
    """Calls one agent connection may carry at once (an agent needs its Connect stream and
    now and then a Renew); more are refused with HTTP/2 REFUSED_STREAM."""
    max_message_bytes: int = 4 << 20
    """The largest message either listener accepts (larger: RESOURCE_EXHAUSTED); at least
    ``max_payload_bytes`` + 64 KiB, as a message carries a payload and its envelope."""
    fanout_secret: str = field(default="", repr=False)
    """The key (at least 32 characters) every replica signs and checks its Redis fan-out
    messages with (HMAC-SHA256); messages without a valid tag are dropped. Required when
    ``redis_url`` is set; the same on every replica. Never logged."""
    fanout_secret_file: str = ""
    """A file holding ``fanout_secret`` (surrounding whitespace ignored), so the secret
    need not sit in the environment; set one or the other."""
    renewal_overlap: timedelta = timedelta(seconds=60)
    """How long a stream on an agent's older certificate may stay open beside a new stream
    on its renewed one (the make-before-break handover of a renewal); then it is closed
    with ABORTED. Any other second stream of an agent replaces the older one at once."""
    suspicious_policy: str = ""
    """Per kind of suspicious agent behaviour, ``log`` (the default) or ``disable`` the
    agent: ``kind=action,...`` with kinds two_addresses, unheld_attempt, message_rate,
    renewal_rate, hello_refused, excess_credit (see server/dispatch/suspicion.py)."""
    reflection: bool = True
    """Serve gRPC server reflection on the api listener, without an API token, so
    ``grpcurl`` and similar tools can list and describe the services. It reveals the
    public API schema (what ``proto/`` holds) and nothing else. On by default for the
    embedded and development setup; turn it off (``MUSTER_REFLECTION=false``) on an
    exposed production listener, so a stranger probing it learns no method names: with
    it off, reflection calls are UNIMPLEMENTED, like any method the listener does not
    serve."""

    def __post_init__(self) -> None:
        for name in ("api_addr", "agent_addr"):
            parse_address(getattr(self, name), name=name)
        if self.metrics_addr:
            parse_address(self.metrics_addr, name="metrics_addr")
        if self.agent_advertise_addr:
            parse_address(self.agent_advertise_addr, name="agent_advertise_addr")
        if self.console_addr:
            parse_address(self.console_addr, name="console_addr")
        if not timedelta(minutes=1) <= self.console_session_ttl <= timedelta(days=7):
            raise ConfigError("console_session_ttl: must be between 1m and 7d")
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise ConfigError(f"trust_domain: {self.trust_domain!r} is not a valid trust domain")
        for ip in self.server_ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError(f"server_ips: {ip!r} is not an IP address") from None
        if self.cert_lifetime < timedelta(minutes=5):
            raise ConfigError("cert_lifetime: must be at least 5m")
        if self.server_cert_ttl < timedelta(seconds=3):
            raise ConfigError("server_cert_ttl: must be at least 3s")
        if self.crl_url and not _CRL_URL.match(self.crl_url.replace("{ca}", "")):
            raise ConfigError(
                f"crl_url: {self.crl_url[:200]!r} is not an http:// or https:// URL "
                "(printable ASCII, no spaces; {ca} is the only placeholder)"
            )
        if not timedelta(minutes=1) <= self.crl_lifetime <= timedelta(days=7):
            raise ConfigError("crl_lifetime: must be between 1m and 7d")
        if (
            self.heartbeat_interval <= timedelta(0)
            or self.lease_duration <= self.heartbeat_interval
        ):
            raise ConfigError("lease_duration must be longer than heartbeat_interval (both > 0)")
        if not self.lease_duration <= self.handover_grace <= timedelta(hours=24):
            raise ConfigError("handover_grace: must be between lease_duration and 24h")
        if not 1 <= self.default_max_attempts <= 20:
            raise ConfigError("default_max_attempts: must be between 1 and 20")
        if self.migrate not in ("auto", "yes", "no"):
            raise ConfigError(f"migrate: {self.migrate!r} is not auto, yes or no")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("redis_url: must start with redis://, rediss:// or unix://")
        if self.submission_rate <= 0 or self.submission_burst < 1:
            raise ConfigError("submission_rate must be > 0 and submission_burst >= 1")
        if self.enrollment_rate <= 0 or self.enrollment_burst < 1:
            raise ConfigError("enrollment_rate must be > 0 and enrollment_burst >= 1")
        if self.inflight_per_tenant < 1 or self.inflight_per_pool < 0:
            raise ConfigError("inflight_per_tenant must be >= 1 and inflight_per_pool >= 0")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"workers: must be between 1 and {MAX_WORKERS}")
        if self.workers > 1 and not (
            self.resolved_database_url.startswith("postgresql") and self.redis_url
        ):
            raise ConfigError(
                "workers: more than one needs PostgreSQL (database_url) and Redis "
                "(redis_url). Workers are replicas on one host: on SQLite with in-process "
                "quotas and fan-out each would keep its own rate and in-flight limits, and "
                "work for another worker's agents would wait for the polling backstop"
            )
        if self.worker_index < -1:
            raise ConfigError("worker_index: must be -1 (not a worker) or at least 0")
        if self.database_pool_size < 1:
            raise ConfigError("database_pool_size: must be at least 1")
        if self.max_payload_bytes < 1024:
            raise ConfigError("max_payload_bytes: must be at least 1024")
        if not 1 <= self.ai_max_tokens <= 10_000_000 or self.ai_max_messages < 1:
            raise ConfigError("ai_max_tokens must be 1..10000000 and ai_max_messages >= 1")
        if not 0 < self.claude_code_max_cost_usd <= 10_000:
            raise ConfigError("claude_code_max_cost_usd: must be more than 0 and at most 10000")
        if self.ai_requests_per_minute < 1 or self.ai_tokens_per_minute < 1:
            raise ConfigError("ai_requests_per_minute and ai_tokens_per_minute must be >= 1")
        if not timedelta(0) < self.handshake_timeout <= timedelta(minutes=10):
            raise ConfigError("handshake_timeout: must be more than 0 and at most 10m")
        if self.connection_idle_timeout < timedelta(0):
            raise ConfigError("connection_idle_timeout: must not be negative (0: never)")
        if not 2 <= self.agent_max_streams_per_connection <= 1000:
            raise ConfigError("agent_max_streams_per_connection: must be between 2 and 1000")
        if not self.max_payload_bytes + (64 << 10) <= self.max_message_bytes <= (1 << 30):
            raise ConfigError(
                "max_message_bytes: must be at least max_payload_bytes + 65536 and at most 1 GiB"
            )
        if self.fanout_secret and self.fanout_secret_file:
            raise ConfigError("fanout_secret and fanout_secret_file: set one, not both")
        if self.fanout_secret and len(self.fanout_secret.strip()) < MIN_FANOUT_SECRET:
            raise ConfigError(f"fanout_secret: must be at least {MIN_FANOUT_SECRET} characters")
        if self.redis_url and not (self.fanout_secret or self.fanout_secret_file):
            raise ConfigError(
                "fanout_secret: required with redis_url (replicas sign their fan-out "
                "messages with it); set MUSTER_FANOUT_SECRET or MUSTER_FANOUT_SECRET_FILE"
            )
        if not timedelta(0) <= self.renewal_overlap <= timedelta(hours=1):
            raise ConfigError("renewal_overlap: must be between 0 and 1h")
        if self.ca_signer:
            from muster.server.ca.pkcs11 import parse_spec  # here: only the grammar, no token

            parse_spec(self.ca_signer)
        from muster.server.dispatch.suspicion import parse_policy  # here: dispatch imports config

        try:
            parse_policy(self.suspicious_policy)
        except ValueError as err:
            raise ConfigError(f"suspicious_policy: {err}") from None

    @property
    def ca_dir(self) -> Path:
        return self.data_dir / "ca"

    @property
    def endpoints_file(self) -> Path:
        """``endpoints.json``: the addresses a running server actually bound (a worker's
        own file is ``endpoints.worker<i>.json``; the parent writes ``endpoints.json``)."""
        if self.worker_index >= 0:
            return self.data_dir / f"endpoints.worker{self.worker_index}.json"
        return self.data_dir / "endpoints.json"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'muster.db'}"

    @property
    def resolved_replica_id(self) -> str:
        return self.replica_id or socket.gethostname()

    def resolved_fanout_secret(self) -> bytes:
        """The fan-out key: ``fanout_secret``, or read from ``fanout_secret_file``."""
        if not self.fanout_secret_file:
            return self.fanout_secret.strip().encode()
        try:
            secret = Path(self.fanout_secret_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"fanout_secret_file: cannot read {self.fanout_secret_file}: {type(err).__name__}"
            ) from None
        if len(secret) < MIN_FANOUT_SECRET:
            raise ConfigError(
                f"fanout_secret_file: the secret must be at least {MIN_FANOUT_SECRET} characters"
            )
        return secret.encode()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServerConfig:
        """Build from ``MUSTER_*`` variables (``env``: default os.environ) and explicit overrides.

        Overrides whose value is None are ignored, so argparse results can be passed straight in.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"MUSTER_{f.name.upper()}")
            # An empty value means "unset", except for text settings where "" is itself
            # meaningful (MUSTER_METRICS_ADDR="" turns /metrics off).
            if raw is not None and (raw != "" or isinstance(f.default, str)):
                values[f.name] = _convert(f.name, raw, cls)
        for key, value in overrides.items():
            if value is not None:
                values[key] = _convert(key, value, cls) if isinstance(value, str) else value
        return cls(**values)


def _convert(name: str, raw: str, cls: type[ServerConfig]) -> Any:
    default = {f.name: f.default for f in fields(cls)}.get(name)
    if name not in {f.name for f in fields(cls)}:
        raise ConfigError(f"unknown setting {name!r}")
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: {raw!r} is not a boolean (true or false)")
    if isinstance(default, timedelta):
        return parse_duration(raw, name=name)
    if isinstance(default, Path):
        return Path(raw)
    if isinstance(default, tuple):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name}: {raw!r} is not an integer") from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{name}: {raw!r} is not a number") from None
    return raw


MAX_WORKERS = 256
"""The most server processes ``--workers`` starts on one host."""

MIN_FANOUT_SECRET = 32
"""Characters a fan-out secret must have at least (``secrets.token_hex(32)`` gives 64)."""
