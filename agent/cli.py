"""``muster agent``: run the daemon. Signal handling lives here and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from dotenv import load_dotenv

from muster import tracing
from muster.agent.config import (
    ANTHROPIC_BASE_URL_ENV,
    ANTHROPIC_KEY_FILE_ENV,
    CA_FILE_ENV,
    CLAUDE_BIN_ENV,
    DEFAULT_CA_FILE,
    DEFAULT_MAX_OUTPUT_BYTES,
    KEY_PASSPHRASE_FILE_ENV,
    MAX_OUTPUT_BYTES_ENV,
    METRICS_ADDR_ENV,
    OLLAMA_URL_ENV,
    REQUIRE_SIGNED_ENV,
    STATE_DIR_ENV,
    TOKEN_ENV,
    TRUSTED_SUBMITTERS_ENV,
    AgentConfig,
    default_state_dir,
    parse_kinds,
    parse_labels,
    read_key_passphrase,
    read_token,
)
from muster.agent.daemon import Agent
from muster.errors import ConfigError

log = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``agent`` subcommand to the ``muster`` dispatcher."""
    parser = subparsers.add_parser(
        "agent",
        help="run an agent daemon",
        description="Run a Muster agent. The first run enrolls with a bootstrap token "
        "(--server, --token) and keeps its key, certificate and identity in --state-dir; "
        "later runs need no token. SIGTERM/SIGINT drain: no new work, in-flight tasks "
        "finish and are acknowledged, then exit 0; a second signal exits at once.",
    )
    enroll = parser.add_argument_group("enrollment (first run only)")
    enroll.add_argument("--server", metavar="HOST:PORT", help="api listener to enroll with")
    enroll.add_argument(
        "--token",
        help=f"bootstrap token (prefer --token-file or ${TOKEN_ENV}: argv is visible to others)",
    )
    enroll.add_argument("--token-file", type=Path, help="file holding the bootstrap token")
    enroll.add_argument(
        "--ca-file",
        type=Path,
        help=f"CA bundle that verifies the api listener (default ${CA_FILE_ENV}, "
        f"else ./{DEFAULT_CA_FILE} when it exists)",
    )
    enroll.add_argument("--name", help="agent id to ask for (default: the server chooses)")
    enroll.add_argument("--pool", default="", help="pool to serve (default: the token's pool)")
    enroll.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label to ask for; repeat for more",
    )
    run = parser.add_argument_group("running")
    run.add_argument(
        "--state-dir",
        type=Path,
        help=f"key, certificate, identity and outbox (default ${STATE_DIR_ENV} or ./.muster-agent)",
    )
    run.add_argument(
        "--key-passphrase-file",
        type=Path,
        metavar="FILE",
        help="encrypt the private key at rest (PKCS#8) with the passphrase in FILE, e.g. a "
        f"systemd credential (%%d/key-passphrase); default ${KEY_PASSPHRASE_FILE_ENV}. A plain "
        "key is encrypted at start; without it an encrypted key is an error",
    )
    run.add_argument(
        "--agent-server",
        metavar="HOST:PORT",
        help="agent listener (mTLS) to connect to: HOST:PORT or any gRPC target, e.g. "
        "ipv4:10.0.0.1:7444,10.0.0.2:7444 to fail over between replicas (pair it with "
        "--tls-server-name); default: the endpoint learned at enrollment",
    )
    run.add_argument(
        "--tls-server-name",
        help="name to verify in the server certificate, when it differs from the host dialled",
    )
    run.add_argument("--concurrency", type=int, default=4, help="tasks run at once (default 4)")
    run.add_argument(
        "--executors",
        metavar="NAME,...",
        help="executors to load from the muster.executors entry points (default: all found)",
    )
    run.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on shutdown, how long to wait for in-flight tasks and their acks (default 30)",
    )
    run.add_argument(
        "--exit-on-revoke",
        action="store_true",
        help="exit with an error when the server refuses our identity (revoked, disabled) "
        "instead of retrying every ~30s until an operator re-enables the agent",
    )
    run.add_argument(
        "--max-output-bytes",
        type=int,
        metavar="BYTES",
        help="the largest task output to deliver; a bigger one fails the attempt for good "
        f"(default ${MAX_OUTPUT_BYTES_ENV}, else {DEFAULT_MAX_OUTPUT_BYTES}: the server's "
        "default MUSTER_MAX_PAYLOAD_BYTES; keep them equal)",
    )
    run.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve this agent's Prometheus /metrics over plain HTTP on HOST:PORT (port 0: any "
        f"free port, logged at start); default ${METRICS_ADDR_ENV}, else none",
    )
    run.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="log verbosity (default info)"
    )
    ai = parser.add_argument_group(
        "AI executors",
        "Provider keys stay on the agent: they are read from its environment or files, "
        "never from a task. Without --executors, an AI executor that lacks what it needs "
        "(a key, the claude binary, an Ollama URL) is skipped and not advertised.",
    )
    ai.add_argument(
        "--anthropic-base-url",
        metavar="URL",
        help=f"Messages API endpoint for anthropic.messages (default ${ANTHROPIC_BASE_URL_ENV}, "
        "else $ANTHROPIC_BASE_URL, else the SDK's default)",
    )
    ai.add_argument(
        "--anthropic-key-file",
        type=Path,
        metavar="FILE",
        help=f"file holding the Anthropic API key (default ${ANTHROPIC_KEY_FILE_ENV}, "
        "else the key in $ANTHROPIC_API_KEY)",
    )
    ai.add_argument(
        "--claude-bin",
        metavar="PATH",
        help=f"Claude Code executable for claude-code (default ${CLAUDE_BIN_ENV}, else "
        "`claude` on PATH)",
    )
    ai.add_argument(
        "--ollama-url",
        metavar="URL",
        help=f"Ollama server for ollama.chat (default ${OLLAMA_URL_ENV}, else $OLLAMA_HOST, "
        "else http://127.0.0.1:11434)",
    )
    signed = parser.add_argument_group(
        "signed tasks",
        "Set here, never by the server: a kind that requires a signature runs only when a "
        "trusted submitter signed it and the task is as signed; anything else is refused "
        "as a failure that is not retried.",
    )
    signed.add_argument(
        "--trusted-submitters",
        type=Path,
        metavar="FILE",
        help="the submitters' Ed25519 public keys: a JWK Set or PEM (muster key public "
        f"... --jwks); default ${TRUSTED_SUBMITTERS_ENV}",
    )
    signed.add_argument(
        "--require-signed",
        action="append",
        default=[],
        metavar="KIND",
        help="run tasks of KIND only when signed by a trusted submitter; repeat for more, "
        f"'*' for every kind (default ${REQUIRE_SIGNED_ENV}, comma-separated)",
    )
    parser.set_defaults(func=handle)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Build a validated AgentConfig from the parsed flags and the MUSTER_* environment."""
    executors = None
    if args.executors is not None:
        executors = tuple(name.strip() for name in args.executors.split(",") if name.strip())
        if not executors:
            raise ConfigError("--executors names no executor")
    return AgentConfig(
        state_dir=args.state_dir or default_state_dir(),
        server=args.server,
        token=read_token(args.token, args.token_file),
        key_passphrase=read_key_passphrase(args.key_passphrase_file),
        ca_file=args.ca_file,
        name=args.name,
        pool=args.pool,
        labels=parse_labels(args.label),
        agent_server=args.agent_server,
        tls_server_name=args.tls_server_name,
        concurrency=args.concurrency,
        executors=executors,
        drain_timeout=args.drain_timeout,
        exit_on_revoke=args.exit_on_revoke,
        anthropic_base_url=args.anthropic_base_url or _env(ANTHROPIC_BASE_URL_ENV),
        anthropic_key_file=args.anthropic_key_file or _env_path(ANTHROPIC_KEY_FILE_ENV),
        claude_bin=args.claude_bin or _env(CLAUDE_BIN_ENV) or "claude",
        ollama_url=args.ollama_url or _env(OLLAMA_URL_ENV),
        trusted_submitters=args.trusted_submitters or _env_path(TRUSTED_SUBMITTERS_ENV),
        require_signed=parse_kinds(args.require_signed or [_env(REQUIRE_SIGNED_ENV) or ""]),
        max_output_bytes=(
            args.max_output_bytes
            if args.max_output_bytes is not None
            else _env_int(MAX_OUTPUT_BYTES_ENV) or DEFAULT_MAX_OUTPUT_BYTES
        ),
        metrics_addr=(
            args.metrics_addr.strip() if args.metrics_addr is not None else _env(METRICS_ADDR_ENV)
        )
        or None,
    )


def _env(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None


def _env_int(name: str) -> int | None:
    value = _env(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name} must be a whole number, got {value[:40]!r}") from None


def _env_path(name: str) -> Path | None:
    value = _env(name)
    return Path(value) if value else None


def handle(args: argparse.Namespace) -> int:
    """Run the agent until it is stopped; the exit code for ``muster``."""
    load_dotenv(override=False)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = config_from_args(args)
    traces = tracing.configure("muster-agent")  # only when OTEL_* ask for traces
    try:
        return asyncio.run(_serve(config))
    finally:
        if traces is not None:
            traces.shutdown()  # export the last attempts' spans


async def _serve(config: AgentConfig) -> int:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    forced: list[int] = []

    def on_signal(signum: int) -> None:
        if not forced and agent.accepting_work:
            log.info("%s: draining (send it again to stop at once)", signal.Signals(signum).name)
            agent.shutdown()
            return
        log.warning("%s again: stopping now", signal.Signals(signum).name)
        forced.append(signum)
        if main is not None:
            main.cancel()

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await agent.run()
    except asyncio.CancelledError:
        if forced:
            return 128 + forced[0]
        raise
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
    return 0
