"""``muster server``, ``muster dev`` and ``muster ca init``: the control plane's commands.

Contributed to the ``muster`` dispatcher through the ``muster.commands`` entry point.
Signal handling lives here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dotenv import load_dotenv

from muster import tracing
from muster.cli import Subparsers, command_group
from muster.errors import ConfigError
from muster.server.auditcli import register_audit
from muster.server.ca import CAError, CertificateAuthority
from muster.server.ca.authority import key_ref
from muster.server.ca.keystore import key_store
from muster.server.cacli import register_ca_rotation
from muster.server.config import ServerConfig
from muster.server.dbcli import register_db

log = logging.getLogger(__name__)

DEV_AGENT = "dev-agent"
DEV_CONSOLE_ADDR = "127.0.0.1:7445"
"""Where ``muster dev`` serves the web console unless told otherwise (empty: off)."""


def register(subparsers: Subparsers) -> None:
    server = subparsers.add_parser(
        "server",
        help="run the control plane",
        description="Run the Muster control plane. With no settings it uses embedded defaults: "
        "SQLite and a dev CA in ./.muster, in-process quotas.",
    )
    _server_flags(server)
    server.add_argument(
        "--workers",
        type=int,
        help="server processes on this host sharing the api and agent ports (SO_REUSEPORT); "
        "more than 1 needs PostgreSQL and Redis (default $MUSTER_WORKERS or 1)",
    )
    server.set_defaults(func=_run_server)

    dev = subparsers.add_parser(
        "dev",
        help="run the control plane plus one local agent (try it out)",
        description="Run `muster server` on embedded defaults and one local `muster agent` "
        f"({DEV_AGENT!r}, pool 'default', executors echo and sleep) enrolled to it, with the "
        f"web console on https://{DEV_CONSOLE_ADDR} (--console-addr '' turns it off).",
    )
    _server_flags(dev)
    dev.set_defaults(func=_run_dev)

    ca = command_group(subparsers, "ca", help="manage the certificate authority")
    init = ca.add_parser(
        "init",
        help="create the root and intermediate CA",
        description="Create a root and an online intermediate CA in DATA_DIR/ca "
        "(keys mode 0600; with MUSTER_CA_SIGNER=pkcs11:... the keys are generated in "
        "that token instead). Refuses to overwrite an existing CA without --force.",
    )
    init.add_argument(
        "--data-dir", type=Path, help="data directory (default $MUSTER_DATA_DIR or ./.muster)"
    )
    init.add_argument("--trust-domain", help="SPIFFE trust domain (default muster.local)")
    init.add_argument(
        "--key-type",
        choices=("ec-p256", "ec-p384", "ed25519"),
        default="ec-p256",
        help="CA key type",
    )
    init.add_argument(
        "--force", action="store_true", help="replace an existing CA (invalidates every agent)"
    )
    init.set_defaults(func=_ca_init)
    register_ca_rotation(ca)
    register_audit(subparsers)
    register_db(subparsers)


def _server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, help="data directory (default $MUSTER_DATA_DIR or ./.muster)"
    )
    parser.add_argument("--api-addr", help="TLS api listener HOST:PORT (default 127.0.0.1:7443)")
    parser.add_argument(
        "--agent-addr", help="mTLS agent listener HOST:PORT (default 127.0.0.1:7444)"
    )
    parser.add_argument(
        "--metrics-addr", help="Prometheus /metrics HOST:PORT (default 127.0.0.1:9464; '' disables)"
    )
    parser.add_argument(
        "--agent-advertise-addr", help="agent listener address told to enrolling agents"
    )
    parser.add_argument(
        "--console-addr",
        help="HTTPS read-only web console HOST:PORT (default: off; in `muster dev` "
        f"{DEV_CONSOLE_ADDR}; '' turns it off)",
    )
    parser.add_argument("--trust-domain", help="SPIFFE trust domain (default muster.local)")
    parser.add_argument(
        "--database-url", help="SQLAlchemy async URL (default SQLite in the data directory)"
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")


def _config(args: argparse.Namespace, *, console_addr: str | None = None) -> ServerConfig:
    """``console_addr``: the default of the console's address when neither the flag
    nor ``MUSTER_CONSOLE_ADDR`` says (``muster dev`` turns the console on)."""
    load_dotenv(Path.cwd() / ".env", override=False)
    _setup_logging(args.log_level or os.environ.get("MUSTER_LOG_LEVEL") or "INFO")
    if args.console_addr is None and "MUSTER_CONSOLE_ADDR" not in os.environ:
        args.console_addr = console_addr
    return ServerConfig.from_env(
        data_dir=args.data_dir,
        api_addr=args.api_addr,
        agent_addr=args.agent_addr,
        metrics_addr=args.metrics_addr,
        agent_advertise_addr=args.agent_advertise_addr,
        console_addr=args.console_addr,
        trust_domain=args.trust_domain,
        database_url=args.database_url,
        workers=getattr(args, "workers", None),
    )


def _setup_logging(level: str) -> None:
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level: {level!r} is not DEBUG, INFO, WARNING or ERROR")
    worker = os.environ.get("MUSTER_WORKER_INDEX", "")
    # A --workers worker's lines say which worker wrote them (they share one stderr).
    who = f"worker {worker} [%(process)d] " if worker.isdigit() else ""
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_server(args: argparse.Namespace) -> int:
    config = _config(args)
    if config.workers > 1:
        return asyncio.run(_supervise(config, args.log_level))
    return asyncio.run(_serve(config, None))


async def _supervise(config: ServerConfig, log_level: str | None) -> int:
    """``--workers N``: the parent, which forwards SIGTERM and SIGINT to the workers."""
    from muster.server.workers import WorkerSupervisor

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    level = log_level or os.environ.get("MUSTER_LOG_LEVEL") or "INFO"
    return await WorkerSupervisor(config, log_level=level).run(stop)


def _run_dev(args: argparse.Namespace) -> int:
    config = _config(args, console_addr=DEV_CONSOLE_ADDR)
    if config.workers > 1:
        raise ConfigError("workers: muster dev runs one server process; unset MUSTER_WORKERS")
    from muster.server.dev import run_dev_agent

    return asyncio.run(_serve(config, run_dev_agent))


async def _serve(
    config: ServerConfig, companion: Callable[[Any, asyncio.Event], Awaitable[None]] | None
) -> int:
    from muster.server.allocator import pin_mmap_threshold
    from muster.server.app import start_server
    from muster.server.workers import ParentLink

    pin_mmap_threshold()  # a steady load must not creep the heap (issue 10)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = ParentLink.from_env()  # set only in a `--workers` worker
    if parent is not None:
        parent.watch(stop.set)
    traces = tracing.configure("muster-server")  # only when OTEL_* ask for traces
    try:
        handle = await start_server(config)
    except BaseException:
        if parent is not None:
            parent.close()
        if traces is not None:
            await asyncio.to_thread(traces.shutdown)
        raise
    handle.supervisor.on_crash(lambda _crash: stop.set())  # then as on SIGTERM, exit 1
    try:
        if parent is not None:
            await parent.ready(
                {
                    "pid": os.getpid(),
                    "replica_id": config.resolved_replica_id,
                    "api": handle.api_address,
                    "agent": handle.agent_endpoint,
                    "metrics": handle.metrics_address or "",
                }
            )
        if handle.admin_token is not None:
            _announce_admin_token(handle.admin_token, config.admin_token_file)
        if companion is not None:
            await companion(handle, stop)
        else:
            await stop.wait()
        log.info("shutting down")
    finally:
        await handle.stop()
        if traces is not None:
            await asyncio.to_thread(traces.shutdown)  # export what the stop still traced
        if parent is not None:
            parent.close()
    return 1 if handle.crash is not None else 0  # a background task crashed


def _ca_init(args: argparse.Namespace) -> int:
    load_dotenv(Path.cwd() / ".env", override=False)
    config = ServerConfig.from_env(data_dir=args.data_dir, trust_domain=args.trust_domain)
    try:
        ca = CertificateAuthority.init(
            config.ca_dir,
            config.trust_domain,
            key_type=args.key_type,
            force=args.force,
            keys=key_store(config) if config.ca_signer else None,
        )
    except CAError as err:
        raise ConfigError(str(err)) from None
    print(f"created CA for trust domain {ca.trust_domain} in {config.ca_dir}")
    if config.ca_signer:
        refs = ", ".join(key_ref(config.ca_dir, role) for role in ("root", "intermediate"))
        print(f"keys (in the PKCS#11 token, not in files): {refs}")
    print(f"trust bundle: {config.ca_dir / 'bundle.pem'}")
    return 0


def _announce_admin_token(secret: str, path: Path) -> None:
    """Show the first-start admin token to the person at the terminal, once. Standard
    error that is not a terminal is a log (systemd, docker, a file): the token stays in
    its 0600 file and only where it is gets said."""
    if sys.stderr.isatty():
        print(f"Admin API token (shown once; also saved to {path}):\n  {secret}", file=sys.stderr)
    else:
        print(
            f"Admin API token created in {path} (mode 0600); it is not shown here", file=sys.stderr
        )
