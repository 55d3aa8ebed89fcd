"""The daemon's settings as one validated object, so bad input fails at startup, not mid-stream."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from muster.agent.executors.base import ExecutorSettings
from muster.errors import ConfigError
from muster.signing import TrustedSubmitters
from muster.spiffe import AGENT_ID

STATE_DIR_ENV = "MUSTER_AGENT_STATE_DIR"
CA_FILE_ENV = "MUSTER_CA_FILE"
TOKEN_ENV = "MUSTER_BOOTSTRAP_TOKEN"  # noqa: S105 (a variable name, not a secret)
KEY_PASSPHRASE_FILE_ENV = "MUSTER_AGENT_KEY_PASSPHRASE_FILE"  # noqa: S105 (a variable name)
MAX_KEY_PASSPHRASE = 1023
"""Bytes; the most PKCS#8 encryption in ``cryptography`` (OpenSSL) takes."""
DEFAULT_STATE_DIR = Path(".muster-agent")
DEFAULT_CA_FILE = Path(".muster/ca/bundle.pem")
MAX_CONCURRENCY = 1024
ANTHROPIC_BASE_URL_ENV = "MUSTER_ANTHROPIC_BASE_URL"
ANTHROPIC_KEY_FILE_ENV = "MUSTER_ANTHROPIC_KEY_FILE"
CLAUDE_BIN_ENV = "MUSTER_CLAUDE_BIN"
OLLAMA_URL_ENV = "MUSTER_OLLAMA_URL"
TRUSTED_SUBMITTERS_ENV = "MUSTER_TRUSTED_SUBMITTERS"
REQUIRE_SIGNED_ENV = "MUSTER_REQUIRE_SIGNED"
METRICS_ADDR_ENV = "MUSTER_AGENT_METRICS_ADDR"
MAX_OUTPUT_BYTES_ENV = "MUSTER_AGENT_MAX_OUTPUT_BYTES"
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
"""The server's default cap on outputs (``MUSTER_MAX_PAYLOAD_BYTES``)."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``muster agent`` needs; validated at construction."""

    state_dir: Path = DEFAULT_STATE_DIR
    """Where the key, certificate, identity and outbox live (created 0700)."""
    server: str | None = None
    """host:port of the api listener, used only to enroll."""
    token: str | None = field(default=None, repr=False)
    """The bootstrap token, used only to enroll; never logged."""
    key_passphrase: bytes | None = field(default=None, repr=False)
    """Encrypts the private key files at rest (PKCS#8); None keeps them plain (mode 0600).
    Read from a file (:func:`read_key_passphrase`), never logged."""
    ca_file: Path | None = None
    """Roots that verify the api listener during enrollment."""
    name: str | None = None
    """The agent id to ask for at enrollment (None lets the server choose)."""
    pool: str = ""
    """The pool to ask for at enrollment (empty takes the token's)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Labels to ask for at enrollment; after that the enrolled labels are used."""
    agent_server: str | None = None
    """The agent listener: host:port or a gRPC target listing several replicas
    (``ipv4:a:7444,b:7444``); overrides the endpoint learned at enrollment."""
    tls_server_name: str | None = None
    """Name to verify in the server certificate when it differs from the dialled host."""
    concurrency: int = 4
    """How many tasks run at once (Hello.max_concurrency)."""
    executors: tuple[str, ...] | None = None
    """Entry-point names of the executors to load; None loads all."""
    drain_timeout: float = 30.0
    """On shutdown, how long to wait for in-flight tasks and their Acks."""
    exit_on_revoke: bool = False
    """Stop (non-zero) when the server refuses our identity, instead of retrying slowly."""
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    welcome_timeout: float = 15.0
    """How long to wait for Welcome after Hello before giving the stream up."""
    rpc_timeout: float = 30.0
    """Deadline for the unary Enroll and Renew calls."""
    anthropic_base_url: str | None = None
    """Messages API endpoint for ``anthropic.messages`` (None: the SDK's own default or
    ``$ANTHROPIC_BASE_URL``)."""
    anthropic_key_file: Path | None = None
    """File holding the Anthropic API key (None: ``$ANTHROPIC_API_KEY``)."""
    claude_bin: str = "claude"
    """The Claude Code executable for ``claude-code``: a path or a name on PATH."""
    ollama_url: str | None = None
    """Ollama server for ``ollama.chat`` (None: ``$OLLAMA_HOST`` or http://127.0.0.1:11434)."""
    trusted_submitters: Path | None = None
    """The submitter public keys whose signatures this agent accepts (a JWK Set or PEM);
    local configuration only, never taken from the server."""
    require_signed: frozenset[str] = frozenset()
    """Task kinds this agent runs only when signed by a trusted submitter (``*``: all)."""
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    """The largest task output this agent delivers: a success with more fails for good
    (not retried), without its output. Match the server's ``MUSTER_MAX_PAYLOAD_BYTES``:
    the server refuses larger outputs anyway, and one beyond its gRPC message limit could
    not even be delivered (the stream would break on every resend)."""
    metrics_addr: str | None = None
    """HOST:PORT of the agent's own Prometheus /metrics over plain HTTP (port 0: any free
    port); None serves none."""

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ConfigError(f"--concurrency must be between 1 and {MAX_CONCURRENCY}")
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout must not be negative")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ConfigError("backoff needs 0 < initial <= max")
        if self.welcome_timeout <= 0 or self.rpc_timeout <= 0:
            raise ConfigError("timeouts must be positive")
        for flag, address in (("--server", self.server), ("--agent-server", self.agent_server)):
            if address is not None and (not address or any(c.isspace() for c in address)):
                raise ConfigError(f"{flag} must look like host:port, got {address!r}")
        if self.name is not None and not AGENT_ID.match(self.name):
            raise ConfigError(
                f"--name {self.name[:80]!r} is not a valid agent id: use 1-63 lower-case "
                "letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        for key, value in self.labels.items():
            if not key or "=" in key:
                raise ConfigError(f"invalid label key {key!r}")
            if not isinstance(value, str):
                raise ConfigError(f"label {key!r} must have a string value")
        if self.executors is not None and not self.executors:
            raise ConfigError("--executors names no executor")
        if self.token is not None and not self.token.strip():
            raise ConfigError("the bootstrap token is empty")
        if self.key_passphrase is not None and not self.key_passphrase:
            raise ConfigError("the key passphrase is empty")
        if self.key_passphrase is not None and len(self.key_passphrase) > MAX_KEY_PASSPHRASE:
            raise ConfigError(f"the key passphrase is longer than {MAX_KEY_PASSPHRASE} bytes")
        for flag, url in (
            ("--anthropic-base-url", self.anthropic_base_url),
            ("--ollama-url", self.ollama_url),
        ):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"{flag} must be an http:// or https:// URL, got {url[:80]!r}")
        if not 1024 <= self.max_output_bytes <= 1 << 30:
            raise ConfigError("--max-output-bytes must be between 1024 and 1073741824")
        if self.metrics_addr is not None:
            split_address(self.metrics_addr, flag="--metrics-addr")
        if not self.claude_bin.strip():
            raise ConfigError("--claude-bin is empty")
        for kind in self.require_signed:
            if not kind or kind != kind.strip() or "," in kind:
                raise ConfigError(f"--require-signed {kind[:80]!r} is not a task kind (or '*')")
        if self.require_signed and self.trusted_submitters is None:
            raise ConfigError(
                "--require-signed needs --trusted-submitters FILE: the public keys (JWK Set "
                "or PEM) of the submitters whose signatures this agent accepts"
            )

    def load_trusted_submitters(self) -> TrustedSubmitters | None:
        """The keys of --trusted-submitters (ConfigError if unreadable or invalid)."""
        if self.trusted_submitters is None:
            return None
        return TrustedSubmitters.load(self.trusted_submitters)

    def executor_settings(self) -> ExecutorSettings:
        """What the executors may read of this configuration (plus the environment)."""
        return ExecutorSettings(
            anthropic_base_url=self.anthropic_base_url,
            anthropic_key_file=self.anthropic_key_file,
            claude_bin=self.claude_bin,
            ollama_url=self.ollama_url,
        )

    def resolved_ca_file(self) -> Path:
        """The CA bundle for enrollment: the flag, then $MUSTER_CA_FILE, then the dev default."""
        if self.ca_file is not None:
            candidate = self.ca_file
        elif os.environ.get(CA_FILE_ENV):
            candidate = Path(os.environ[CA_FILE_ENV])
        elif DEFAULT_CA_FILE.is_file():
            candidate = DEFAULT_CA_FILE
        else:
            raise ConfigError(
                "no CA bundle to verify the server: pass --ca-file, set "
                f"{CA_FILE_ENV}, or run from a directory holding {DEFAULT_CA_FILE}"
            )
        if not candidate.is_file():
            raise ConfigError(f"CA bundle {candidate} does not exist or is not a file")
        return candidate


def split_address(value: str, *, flag: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as a pair; port 0 asks the OS for a free one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{flag} must look like HOST:PORT, got {value[:80]!r}")
    return host.strip("[]"), int(port)


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def parse_kinds(items: Iterable[str]) -> frozenset[str]:
    """``--require-signed`` values (each may list several, comma-separated)."""
    return frozenset(kind.strip() for item in items for kind in item.split(",") if kind.strip())


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> dict; a repeated key or a missing '=' is an error."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--label expects key=value, got {item!r}")
        if key in labels:
            raise ConfigError(f"--label {key!r} given twice")
        labels[key] = value
    return labels


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """The bootstrap token from --token, --token-file or $MUSTER_BOOTSTRAP_TOKEN, in that order."""
    if token is not None and token_file is not None:
        raise ConfigError("give --token or --token-file, not both")
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"cannot read --token-file {token_file}: {err.strerror}") from err
        if not text:
            raise ConfigError(f"--token-file {token_file} is empty")
        return text
    if token is not None:
        return token.strip()
    env = os.environ.get(TOKEN_ENV, "").strip()
    return env or None


def read_key_passphrase(path: Path | None) -> bytes | None:
    """The key passphrase from --key-passphrase-file, else from the file that
    $MUSTER_AGENT_KEY_PASSPHRASE_FILE names (a systemd credential, ``%d/key-passphrase``,
    fits either); None when neither is given. One trailing newline is not part of it."""
    if path is None:
        named = os.environ.get(KEY_PASSPHRASE_FILE_ENV, "").strip()
        if not named:
            return None
        path = Path(named)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the key passphrase file {path}: {err.strerror}") from err
    if data.endswith(b"\n"):
        data = data[:-1].removesuffix(b"\r")
    if not data:
        raise ConfigError(f"the key passphrase file {path} is empty")
    if len(data) > MAX_KEY_PASSPHRASE:
        raise ConfigError(
            f"the key passphrase file {path} holds more than {MAX_KEY_PASSPHRASE} bytes"
        )
    return data
