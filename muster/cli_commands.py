"""The client subcommands of ``muster`` (submit, submit-many, task, key, token,
api-token, tenant, agents, cert, budget, pool, audit).

Registered through the ``muster.commands`` entry point ``client``. Each handler uses
the blocking SDK clients and returns an exit code; MusterErrors reach the dispatcher,
which prints them as one line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from muster import tracing
from muster._admin import AdminClient
from muster._cli_format import (
    BUDGET_HEADERS,
    TASK_HEADERS,
    budget_details,
    budget_row,
    format_labels,
    format_models,
    format_time,
    key_values,
    pool_details,
    table,
    task_details,
    task_row,
    to_json,
    token_status,
    waiting_text,
)
from muster._requests import MAX_SUBMIT_MANY
from muster._submit_lines import Line, read_lines
from muster._sync_client import Client
from muster._types import Role, Task, TaskState
from muster.cli import Subparsers, command_group
from muster.config import ClientConfig
from muster.durations import parse_duration, parse_time
from muster.errors import ConfigError, WaitTimeoutError
from muster.files import PUBLIC_FILE_MODE, write_atomic
from muster.sanitize import neutralize
from muster.signing import (
    DEFAULT_VALIDITY,
    TaskSigner,
    generate_key,
    jwks,
    key_id,
    load_private_key,
    private_key_pem,
    public_key_pem,
    raw_public_key,
    read_public_keys,
)


def register(subparsers: Subparsers) -> None:
    """Add the client commands to the ``muster`` parser."""
    common = _common_flags()
    _add_submit(subparsers, common)
    _add_submit_many(subparsers, common)
    _add_task(subparsers, common)
    _add_key(subparsers)
    _add_token(subparsers, common)
    _add_api_token(subparsers, common)
    _add_tenant(subparsers, common)
    _add_agents(subparsers, common)
    _add_cert(subparsers, common)
    _add_budget(subparsers, common)
    _add_pool(subparsers, common)
    _add_audit(subparsers, common)


# Argument types: argparse turns their ArgumentTypeError into a usage error (exit 2).


def _duration_arg(text: str) -> float:
    try:
        seconds = parse_duration(text).total_seconds()
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return seconds


def _time_arg(text: str) -> datetime:
    """ISO 8601, ``-1h`` (an hour ago), or a bare ``1h`` meaning the same, as docker does."""
    try:
        return datetime.now(UTC) - parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_NEGATIVE_DURATION = re.compile(r"^-\d[\d.]*(ms|[smhdw])?([\d.]+(ms|[smhdw]))*$")


def _label_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _usd_arg(text: str) -> float:
    """A non-negative, finite amount of US dollars."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected US dollars, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite amount of at least 0, got {text!r}")
    return value


def _positive_usd_arg(text: str) -> float:
    value = _usd_arg(text)
    if round(value * 1_000_000) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0.000001, got {text!r}")
    return value


def _models_arg(text: str) -> list[str]:
    """``M1,M2``; the empty string is the empty list (any priced model)."""
    return [m.strip() for m in text.split(",") if m.strip()]


def _state_arg(text: str) -> TaskState:
    try:
        return TaskState.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    flags = common.add_argument_group("connection (override MUSTER_* and .env)")
    flags.add_argument("--addr", metavar="HOST:PORT", help="api listener (MUSTER_ADDR)")
    flags.add_argument(
        "--token-file", metavar="FILE", help="file holding the API token (MUSTER_TOKEN_FILE)"
    )
    flags.add_argument(
        "--ca-file", metavar="FILE", help="CA bundle the server chains to (MUSTER_CA_FILE)"
    )
    return common


def _config(args: argparse.Namespace) -> ClientConfig:
    return ClientConfig.from_env(
        address=args.addr, token_file=args.token_file, ca_file=args.ca_file
    )


def _client(args: argparse.Namespace) -> Client:
    # The command's submit spans; the provider exports what is left when the process exits.
    tracing.configure("muster-cli")
    return Client(_config(args))


def _admin(args: argparse.Namespace) -> AdminClient:
    return AdminClient(_config(args))


def _out(text: str) -> None:
    print(text)


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def _leaf(
    group: Subparsers, name: str, common: argparse.ArgumentParser, help: str
) -> argparse.ArgumentParser:
    return group.add_parser(name, parents=[common], help=help, description=help)


# submit


def _add_submit(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _leaf(subparsers, "submit", common, "Queue a task; print its id, or its output with --wait")
    p.add_argument("kind", metavar="KIND", help="what to run, e.g. echo")
    payload = p.add_mutually_exclusive_group()
    payload.add_argument("--payload", metavar="JSON_OR_TEXT", help="input, sent as given")
    payload.add_argument("--payload-file", metavar="FILE", help="read input from FILE ('-': stdin)")
    p.add_argument("--pool", default="default", help="target pool (default: %(default)s)")
    p.add_argument(
        "--selector",
        metavar="K=V",
        action="append",
        type=_label_arg,
        default=[],
        help="label the agent must carry (repeatable)",
    )
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    p.add_argument("--max-attempts", type=_positive_int, metavar="N")
    p.add_argument("--idempotency-key", metavar="KEY", help="a repeat returns the first task")
    p.add_argument("--schedule-to-start-timeout", type=_duration_arg, metavar="DURATION")
    p.add_argument("--start-to-close-timeout", type=_duration_arg, metavar="DURATION")
    p.add_argument(
        "--max-cost-usd",
        type=_positive_usd_arg,
        metavar="X",
        help="spend cap for the task over all its attempts (AI kinds)",
    )
    p.add_argument(
        "--output-schema",
        metavar="FILE_OR_JSON",
        help="JSON Schema the output must satisfy: inline JSON (starting with '{') or a file",
    )
    p.add_argument(
        "--sign-key",
        metavar="FILE",
        help="sign the task with this Ed25519 private key (muster key generate); agents "
        "that require signatures run it only if they trust the key",
    )
    p.add_argument(
        "--sign-valid-for",
        type=_duration_arg,
        metavar="DURATION",
        help="with --sign-key: how long the signature holds; agents refuse the task after "
        f"it (default {DEFAULT_VALIDITY.total_seconds() / 3600:g}h, at most 30d)",
    )
    p.add_argument("--wait", action="store_true", help="wait for the result and print its output")
    p.add_argument(
        "--timeout", type=_duration_arg, metavar="DURATION", help="with --wait: give up after this"
    )
    p.add_argument("--json", action="store_true", help="print the task as JSON")
    p.set_defaults(func=_submit)


def _read_payload(args: argparse.Namespace) -> bytes:
    if args.payload is not None:
        return str(args.payload).encode("utf-8")
    if args.payload_file is None:
        return b""
    if args.payload_file == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(args.payload_file).read_bytes()
    except OSError as err:
        raise ConfigError(
            f"cannot read --payload-file {args.payload_file!r}: {err.strerror}"
        ) from err


def _read_schema(value: str | None) -> str | None:
    """Inline JSON when it starts with '{', otherwise a file to read (the server checks
    that it is a valid schema)."""
    if value is None:
        return None
    if value.lstrip().startswith("{"):
        return value
    try:
        return Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read --output-schema file {value!r}: {reason}") from err


def _signer(args: argparse.Namespace) -> TaskSigner | None:
    if args.sign_key is None:
        if args.sign_valid_for is not None:
            raise ConfigError("--sign-valid-for needs --sign-key")
        return None
    valid_for = (
        DEFAULT_VALIDITY if args.sign_valid_for is None else timedelta(seconds=args.sign_valid_for)
    )
    return TaskSigner.load(Path(args.sign_key), valid_for=valid_for)


def _submit(args: argparse.Namespace) -> int:
    payload = _read_payload(args)
    schema = _read_schema(args.output_schema)
    signer = _signer(args)
    with _client(args) as client:
        task = client.submit(
            args.kind,
            payload,
            pool=args.pool,
            selector=dict(args.selector),
            priority=args.priority,
            max_attempts=args.max_attempts,
            idempotency_key=args.idempotency_key,
            schedule_to_start_timeout=args.schedule_to_start_timeout,
            start_to_close_timeout=args.start_to_close_timeout,
            max_cost_usd=args.max_cost_usd,
            output_schema=schema,
            signer=signer,
        )
        if task.submit_warning:
            _err(f"muster: warning: {neutralize(task.submit_warning, single_line=True)}")
        if not args.wait:
            _out(to_json(task) if args.json else task.task_id)
            return 0
        try:
            final = client.wait(task.task_id, timeout=args.timeout)
        except WaitTimeoutError as err:
            _err(f"muster: error: {neutralize(str(err), single_line=True)}")
            # Asked afresh: the wait's last state may be older than the reason.
            current = client.get(task.task_id)
            if current.state is TaskState.QUEUED and current.waiting_reason:
                reason = neutralize(waiting_text(current), single_line=True)
                _err(f"muster: task {task.task_id} is waiting: {reason}")
            return 1
    return _report_final(final, args.json)


def _report_final(task: Task, as_json: bool) -> int:
    if as_json:
        _out(to_json(task))
    elif task.succeeded:
        # Output is untrusted (model output included): shown, never obeyed. --json has
        # the exact text.
        text = neutralize(task.output_text)
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    else:
        reason = f": {neutralize(task.error, single_line=True)}" if task.error else ""
        _err(f"muster: task {task.task_id} {task.state.name}{reason}")
    return 0 if task.succeeded else 1


# submit-many


def _add_submit_many(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _leaf(
        subparsers,
        "submit-many",
        common,
        "Queue many tasks from JSON lines; print one line per task: its id, or the error",
    )
    p.description = (
        "Queue many tasks from JSON lines, one task per line, with keys named like "
        "`muster submit`'s options: kind (required), payload (a string sent as given, "
        "any other JSON value as JSON), pool, selector (or labels: an object, or a list "
        "of 'K=V'), priority, max_attempts, idempotency_key, schedule_to_start_timeout "
        "and start_to_close_timeout (seconds or '30s'), deadline (ISO 8601), "
        "max_cost_usd, output_schema (an object). Prints one line per task, in input "
        "order: its id, or 'error: line N: ...'. Exits 1 if any line failed."
    )
    p.add_argument(
        "file", metavar="FILE", nargs="?", default="-", help="JSON lines ('-' or absent: stdin)"
    )
    p.add_argument(
        "--sign-key", metavar="FILE", help="sign every task with this Ed25519 private key"
    )
    p.add_argument(
        "--sign-valid-for",
        type=_duration_arg,
        metavar="DURATION",
        help=f"with --sign-key: how long the signatures hold (default "
        f"{DEFAULT_VALIDITY.total_seconds() / 3600:g}h)",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object per task: line, task or error"
    )
    p.set_defaults(func=_submit_many)


def _submit_many(args: argparse.Namespace) -> int:
    signer = _signer(args)
    if args.file == "-":
        return _submit_lines(args, sys.stdin.buffer, signer)
    try:
        with Path(args.file).open("rb") as lines:
            return _submit_lines(args, lines, signer)
    except OSError as err:
        raise ConfigError(f"cannot read {args.file!r}: {err.strerror}") from err


def _submit_lines(
    args: argparse.Namespace, lines: Iterable[bytes], signer: TaskSigner | None
) -> int:
    """Send the lines in chunks of the server's per-call maximum, printing as each ends."""
    failed = total = 0
    with _client(args) as client:
        chunk: list[Line] = []
        for line in itertools.chain(read_lines(lines, signer), [None]):
            if line is not None:
                chunk.append(line)
                if len(chunk) < MAX_SUBMIT_MANY:
                    continue
            specs = [entry.spec for entry in chunk if entry.spec is not None]
            outcomes = iter(client.submit_many(specs) if specs else [])
            for entry in chunk:
                total += 1
                error: Exception | None = entry.error
                task = None
                if entry.spec is not None:
                    outcome = next(outcomes)
                    task, error = outcome.task, outcome.error
                failed += error is not None
                _print_line(entry.number, task, error, args.json)
            chunk = []
    if failed:
        _err(f"muster: {failed} of {total} tasks were not submitted")
    return 1 if failed else 0


def _print_line(number: int, task: Task | None, error: Exception | None, as_json: bool) -> None:
    if as_json:
        if task is not None:
            _out(json.dumps({"line": number, "task": json.loads(to_json(task))}))
        else:
            message = str(error) or type(error).__name__
            _out(
                json.dumps(
                    {"line": number, "error": {"type": type(error).__name__, "message": message}}
                )
            )
        return
    if task is not None:
        if task.submit_warning:
            warning = neutralize(task.submit_warning, single_line=True)
            _err(f"muster: warning: line {number}: {warning}")
        _out(task.task_id)
    else:
        # Server messages may quote the input: shown, never obeyed.
        _out(f"error: line {number}: {neutralize(str(error), single_line=True)}")


# task


def _add_task(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    group = command_group(subparsers, "task", help="Read, list, cancel and watch tasks")

    p = _leaf(group, "get", common, "Show one task")
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_task_get)

    p = _leaf(group, "list", common, "List tasks, newest first")
    p.add_argument(
        "--state",
        action="append",
        type=_state_arg,
        default=[],
        metavar="STATE",
        help="only this state (repeatable): " + ", ".join(s.name.lower() for s in TaskState),
    )
    p.add_argument("--pool")
    p.add_argument("--kind")
    p.add_argument("--limit", type=_positive_int, default=50, help="at most N (default 50)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_task_list)

    p = _leaf(group, "cancel", common, "Cancel a task")
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--reason", default="", help="recorded with the cancellation")
    p.set_defaults(func=_task_cancel)

    p = _leaf(group, "watch", common, "Print a line per state change until the task ends")
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--json", action="store_true", help="one JSON object per change")
    p.set_defaults(func=_task_watch)


def _task_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        task = client.get(args.task_id)
    _out(to_json(task) if args.json else task_details(task))
    return 0


def _task_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        tasks = client.list(states=args.state, pool=args.pool, kind=args.kind, limit=args.limit)
    _out(to_json(tasks) if args.json else table(TASK_HEADERS, [task_row(t) for t in tasks]))
    return 0


def _task_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        task = client.cancel(args.task_id, reason=args.reason)
    pending = " (cancel requested; waiting for its agent)" if not task.is_terminal else ""
    _out(f"{task.task_id} {task.state.name}{pending}")
    return 0


def _task_watch(args: argparse.Namespace) -> int:
    last: Task | None = None
    seen: tuple[object, ...] | None = None
    with _client(args) as client:
        for task in client.watch(args.task_id):
            last = task
            key = (
                task.state,
                task.attempt,
                task.agent_id,
                task.cancel_requested,
                task.waiting_reason,
            )
            if key == seen:
                continue
            seen = key
            if args.json:
                _out(to_json(task).replace("\n", " "))
                continue
            extra = f" agent={task.agent_id}" if task.agent_id else ""
            extra += " cancel-requested" if task.cancel_requested else ""
            if task.waiting_reason and not task.is_terminal:
                extra += f' waiting="{task.waiting_reason}"'
            extra += f' error="{task.error}"' if task.error and task.is_terminal else ""
            stamp = format_time(task.updated_at or task.created_at)
            line = f"{stamp} {task.task_id} {task.state.name} attempt={task.attempt}{extra}"
            _out(neutralize(line, single_line=True))
    return 0 if last is not None and last.succeeded else 1


# key (signing keys for signed tasks)


def _add_key(subparsers: Subparsers) -> None:
    group = command_group(subparsers, "key", help="Ed25519 keys for signing tasks")

    help = "Make a signing key: FILE (private, 0600) and FILE.pub (public, PEM)"
    p = group.add_parser("generate", help=help, description=help)
    p.add_argument("--out", required=True, metavar="FILE", help="where the private key goes")
    p.add_argument(
        "--jwks", action="store_true", help="print the public key as a JWK Set on stdout"
    )
    p.set_defaults(func=_key_generate)

    help = "Print the public keys of key files (private or public PEM, or a JWK Set)"
    p = group.add_parser("public", help=help, description=help)
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument(
        "--jwks",
        action="store_true",
        help="as one JWK Set (a --trusted-submitters file) instead of PEM",
    )
    p.set_defaults(func=_key_public)


def _key_generate(args: argparse.Namespace) -> int:
    private = Path(args.out)
    public = private.with_name(private.name + ".pub")
    for path in (private, public):
        if path.exists():
            raise ConfigError(f"{path} exists already; choose another --out or remove it")
    key = generate_key()
    raw = raw_public_key(key)
    try:
        write_atomic(private, private_key_pem(key), overwrite=False)
        write_atomic(public, public_key_pem(raw), mode=PUBLIC_FILE_MODE, overwrite=False)
    except OSError as err:
        raise ConfigError(f"cannot write the key to {private}: {err.strerror}") from err
    info = (
        f"key id:      {key_id(raw)}\n"
        f"private key: {private} (keep it secret; it signs tasks)\n"
        f"public key:  {public}\n"
        f"sign:        muster submit KIND --sign-key {private} ...\n"
        f"trust it:    muster agent --trusted-submitters {public} --require-signed KIND"
    )
    if args.jwks:
        _err(info)
        _out(json.dumps(jwks([raw]), indent=2))
    else:
        _out(info)
    return 0


def _key_public(args: argparse.Namespace) -> int:
    keys: list[bytes] = []
    for name in args.files:
        path = Path(name)
        try:
            private = b"PRIVATE KEY-----" in path.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read {path}: {err.strerror}") from err
        found = [raw_public_key(load_private_key(path))] if private else read_public_keys(path)
        keys += [raw for raw in found if raw not in keys]
    for raw in keys:
        _err(f"key id: {key_id(raw)}")
    if args.jwks:
        _out(json.dumps(jwks(keys), indent=2))
    else:
        sys.stdout.write("".join(public_key_pem(raw).decode("ascii") for raw in keys))
    return 0


# token (bootstrap tokens)


def _add_token(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    group = command_group(subparsers, "token", help="Bootstrap tokens for enrolling agents")

    p = _leaf(group, "create", common, "Create a bootstrap token; prints only the secret")
    p.add_argument("--pool", help="pool the enrolled agents serve (required unless --reenroll)")
    p.add_argument(
        "--reenroll",
        metavar="AGENT_ID",
        help="a single-use token that re-enrolls this existing agent (revoked, expired or "
        "removed) with a fresh certificate; it keeps its pool and labels",
    )
    p.add_argument(
        "--label",
        metavar="K=V",
        action="append",
        type=_label_arg,
        default=[],
        help="label every enrolled agent carries (repeatable)",
    )
    p.add_argument("--ttl", type=_duration_arg, metavar="DURATION", help="server default 1h")
    p.add_argument("--uses", type=_positive_int, metavar="N", help="server default 1")
    p.add_argument("--name-pattern", metavar="GLOB", help="agent ids allowed (default '*')")
    p.set_defaults(func=_token_create)

    p = _leaf(group, "list", common, "List bootstrap tokens (never their secrets)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_token_list)

    p = _leaf(group, "delete", common, "Make a bootstrap token unusable at once")
    p.add_argument("token_id", metavar="ID")
    p.set_defaults(func=_token_delete)


def _token_create(args: argparse.Namespace) -> int:
    if not args.pool and not args.reenroll:
        _err("muster token create: give --pool (or --reenroll AGENT_ID)")
        return 2
    with _admin(args) as admin:
        token, secret = admin.create_bootstrap_token(
            args.pool or "",
            labels=dict(args.label),
            ttl=args.ttl,
            max_uses=args.uses,
            name_pattern=args.name_pattern,
            reenroll=args.reenroll,
        )
    # Only the secret on stdout, so `T=$(muster token create ...)` captures just it.
    _out(secret)
    bound = f" re-enrolls={token.reenroll_agent_id}" if token.reenroll_agent_id else ""
    _err(
        f"bootstrap token {token.token_id}: pool={token.pool} uses={token.max_uses}{bound} "
        f"expires={format_time(token.expires_at)}"
    )
    return 0


def _token_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        tokens = admin.list_bootstrap_tokens()
    if args.json:
        _out(to_json(tokens))
        return 0
    rows = [
        [
            t.token_id,
            t.pool,
            f"{t.uses}/{t.max_uses}",
            t.name_pattern or "*",
            format_labels(t.labels),
            format_time(t.expires_at),
            token_status(t.status, t.deleted),
        ]
        for t in tokens
    ]
    _out(table(("TOKEN_ID", "POOL", "USES", "NAMES", "LABELS", "EXPIRES", "STATUS"), rows))
    return 0


def _token_delete(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        admin.delete_bootstrap_token(args.token_id)
    _err(f"deleted bootstrap token {args.token_id}")
    return 0


# api-token


def _add_api_token(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    group = command_group(subparsers, "api-token", help="API tokens for clients")

    p = _leaf(group, "create", common, "Create an API token; prints only the secret")
    p.add_argument("name", metavar="NAME", help="the principal recorded as actor and submitter")
    p.add_argument("--role", required=True, choices=[str(r) for r in Role])
    p.add_argument("--ttl", type=_duration_arg, metavar="DURATION", help="default: never expires")
    p.add_argument(
        "--tenant",
        metavar="T",
        help="the tenant it joins, created if new (default: a new tenant of its own)",
    )
    p.set_defaults(func=_api_token_create)

    p = _leaf(group, "list", common, "List API tokens (never their secrets)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_api_token_list)

    p = _leaf(group, "delete", common, "Delete an API token")
    p.add_argument("token_id", metavar="ID")
    p.set_defaults(func=_api_token_delete)


def _api_token_create(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        token, secret = admin.create_api_token(
            args.name, args.role, ttl=args.ttl, tenant=args.tenant
        )
    _out(secret)
    line = (
        f"api token {token.token_id}: name={token.name} tenant={token.tenant or '-'} "
        f"role={token.role} "
        f"expires={format_time(token.expires_at) if token.expires_at else 'never'}"
    )
    _err(neutralize(line, single_line=True))
    return 0


def _api_token_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        tokens = admin.list_api_tokens()
    if args.json:
        _out(to_json(tokens))
        return 0
    rows = [
        [
            t.token_id,
            t.name,
            str(t.role) if t.role is not None else "?",
            t.tenant or "-",
            format_time(t.created_at),
            format_time(t.expires_at) if t.expires_at else "never",
            token_status(t.status, t.deleted),
        ]
        for t in tokens
    ]
    _out(table(("TOKEN_ID", "NAME", "ROLE", "TENANT", "CREATED", "EXPIRES", "STATUS"), rows))
    return 0


def _api_token_delete(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        admin.delete_api_token(args.token_id)
    _err(f"deleted api token {args.token_id}")
    return 0


# tenants


def _add_tenant(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    group = command_group(subparsers, "tenant", help="Tenants: who owns tasks and budgets")
    p = _leaf(group, "list", common, "List tenants and their live API tokens")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_tenant_list)


def _tenant_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        tenants = admin.list_tenants()
    if args.json:
        _out(to_json(tenants))
        return 0
    rows = [[t.name, str(t.tokens), format_time(t.created_at)] for t in tenants]
    _out(table(("TENANT", "TOKENS", "CREATED"), rows))
    return 0


# agents and certificates


def _add_agents(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    group = command_group(subparsers, "agents", help="Inspect, disable and revoke agents")

    p = _leaf(group, "list", common, "List enrolled agents")
    p.add_argument("--pool")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_agents_list)

    p = _leaf(group, "get", common, "Show one agent and its certificates")
    p.add_argument("agent_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_agents_get)

    p = _leaf(group, "disable", common, "Disable an agent (its streams close at once)")
    p.add_argument("agent_id", metavar="ID")
    p.set_defaults(func=_agents_set_enabled, enabled=False)

    p = _leaf(group, "enable", common, "Re-enable a disabled agent")
    p.add_argument("agent_id", metavar="ID")
    p.set_defaults(func=_agents_set_enabled, enabled=True)

    p = _leaf(group, "revoke", common, "Revoke every certificate of an agent")
    p.add_argument("agent_id", metavar="ID")
    p.add_argument("--reason", default="", help="recorded in the audit trail")
    p.set_defaults(func=_agents_revoke)

    p = _leaf(
        group,
        "remove",
        common,
        "Retire an agent: revoke its certificates and close its streams; only a token "
        "from 'muster token create --reenroll ID' brings the id back",
    )
    p.add_argument("agent_id", metavar="ID")
    p.add_argument("--reason", default="", help="recorded in the audit trail")
    p.set_defaults(func=_agents_remove)

    p = _leaf(
        group,
        "rotate",
        common,
        "Make an agent (or every agent) renew its certificate now, or when it next connects",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("agent_id", metavar="ID", nargs="?")
    which.add_argument("--all", action="store_true", help="every agent that is not removed")
    p.add_argument("--reason", default="", help="sent to the agents and audited")
    p.set_defaults(func=_agents_rotate)


def _agents_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        agents = admin.list_agents(pool=args.pool)
    if args.json:
        _out(to_json(agents))
        return 0
    rows = [
        [
            a.agent_id,
            a.pool,
            "removed" if a.removed else "enabled" if a.enabled else "disabled",
            (a.replica or "yes") if a.connected else "no",
            f"{a.in_flight}/{a.max_concurrency}" if a.max_concurrency else "-",
            ",".join(a.capabilities) or "-",
            format_time(a.last_seen_at),
            format_time(a.certificate_expires_at),
            format_labels(a.labels),
        ]
        for a in agents
    ]
    headers = (
        "AGENT_ID",
        "POOL",
        "STATUS",
        "CONNECTED",
        "IN_FLIGHT",
        "KINDS",
        "LAST_SEEN",
        "CERT_EXPIRES",
        "LABELS",
    )
    _out(table(headers, rows))
    return 0


def _agents_get(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        agent = admin.get_agent(args.agent_id)
    if args.json:
        _out(to_json(agent))
        return 0
    _out(
        key_values(
            [
                ("agent_id", agent.agent_id),
                ("spiffe_id", agent.spiffe_id),
                ("pool", agent.pool),
                ("labels", format_labels(agent.labels)),
                (
                    "status",
                    "removed" if agent.removed else "enabled" if agent.enabled else "disabled",
                ),
                (
                    "connected",
                    f"yes, to replica {agent.replica} since {format_time(agent.connected_at)}"
                    if agent.connected and agent.replica
                    else "yes"
                    if agent.connected
                    else "no",
                ),
                ("kinds", ",".join(agent.capabilities) or "-"),
                ("concurrency", str(agent.max_concurrency or "-")),
                ("in_flight", str(agent.in_flight)),
                ("cert_expires", format_time(agent.certificate_expires_at)),
                ("enrolled", format_time(agent.enrolled_at)),
                ("last_seen", format_time(agent.last_seen_at)),
                ("token_id", agent.token_id or "-"),
            ]
        )
    )
    _out("certificates:")
    rows = [
        [
            c.serial,
            format_time(c.not_before),
            format_time(c.not_after),
            f"revoked {format_time(c.revoked_at)}" if c.revoked else "valid",
            c.reason or "-",
            c.renewed_from or "-",
        ]
        for c in agent.certificates
    ]
    headers = ("SERIAL", "NOT_BEFORE", "NOT_AFTER", "STATUS", "ISSUED_FOR", "RENEWED_FROM")
    _out(table(headers, rows, indent="  "))
    return 0


def _agents_set_enabled(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        agent = admin.set_agent_enabled(args.agent_id, args.enabled)
    _out(f"{agent.agent_id} {'enabled' if agent.enabled else 'disabled'}")
    return 0


def _agents_remove(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        serials = admin.remove_agent(args.agent_id, reason=args.reason)
    for serial in serials:
        _out(serial)
    _err(
        f"removed agent {args.agent_id} ({len(serials)} certificate(s) revoked); to bring "
        f"it back: muster token create --reenroll {args.agent_id}"
    )
    return 0


def _agents_rotate(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        count = admin.rotate_agents(None if args.all else args.agent_id, reason=args.reason)
    _err(
        f"asked {count} agent(s) to renew their certificates (connected ones now, the "
        "others when they next connect)"
    )
    return 0


def _agents_revoke(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        serials = admin.revoke_agent(args.agent_id, reason=args.reason)
    for serial in serials:
        _out(serial)
    _err(f"revoked {len(serials)} certificate(s) of agent {args.agent_id}")
    return 0


def _add_cert(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    group = command_group(subparsers, "cert", help="Agent certificates")
    p = _leaf(group, "revoke", common, "Revoke one certificate by its hex serial")
    p.add_argument("serial", metavar="SERIAL")
    p.add_argument("--reason", default="", help="recorded in the audit trail")
    p.set_defaults(func=_cert_revoke)


def _cert_revoke(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        serials = admin.revoke_certificate(args.serial, reason=args.reason)
    for serial in serials:
        _out(serial)
    _err(
        f"revoked certificate {args.serial} and {max(0, len(serials) - 1)} renewed from it"
        if serials
        else f"certificate {args.serial} was revoked already"
    )
    return 0


# budgets and pools


def _add_budget(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    group = command_group(subparsers, "budget", help="Spend budgets for AI work")

    p = _leaf(group, "set", common, "Set (create or change) the budget of a scope")
    p.add_argument("scope", metavar="SCOPE", help="global, tenant:<name> or pool:<name>")
    p.add_argument(
        "--limit-usd",
        required=True,
        type=_usd_arg,
        metavar="X",
        help="at most this much per period (0 stops the scope's AI work)",
    )
    p.add_argument(
        "--period",
        choices=("day", "month", "none"),
        default="month",
        help="UTC calendar day or month, or none (one period forever); default %(default)s",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_budget_set)

    p = _leaf(group, "get", common, "Show a budget: limit, spent, reserved, left, period")
    p.add_argument("scope", metavar="SCOPE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_budget_get)

    p = _leaf(group, "list", common, "List budgets with their current period's figures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_budget_list)

    p = _leaf(group, "delete", common, "Remove a budget: the scope is no longer limited")
    p.add_argument("scope", metavar="SCOPE")
    p.set_defaults(func=_budget_delete)


def _budget_set(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        budget = admin.set_budget(args.scope, args.limit_usd, args.period)
    _out(to_json(budget) if args.json else budget_details(budget))
    return 0


def _budget_get(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        budget = admin.get_budget(args.scope)
    _out(to_json(budget) if args.json else budget_details(budget))
    return 0


def _budget_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        budgets = admin.list_budgets()
    _out(to_json(budgets) if args.json else table(BUDGET_HEADERS, [budget_row(b) for b in budgets]))
    return 0


def _budget_delete(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        admin.delete_budget(args.scope)
    _err(neutralize(f"deleted the budget of {args.scope}", single_line=True))
    return 0


def _add_pool(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    group = command_group(subparsers, "pool", help="Pool settings (the models AI tasks may use)")

    p = _leaf(group, "set", common, "Set the models AI tasks in a pool may name")
    p.add_argument("pool", metavar="POOL")
    p.add_argument(
        "--models",
        required=True,
        type=_models_arg,
        metavar="M1,M2",
        help="comma-separated, each with a price on the server; '' allows any priced model",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_pool_set)

    p = _leaf(group, "get", common, "Show a pool's settings")
    p.add_argument("pool", metavar="POOL")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_pool_get)

    p = _leaf(group, "list", common, "List pools that have settings")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_pool_list)


def _pool_set(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        settings = admin.set_pool_models(args.pool, args.models)
    _out(to_json(settings) if args.json else pool_details(settings))
    return 0


def _pool_get(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        settings = admin.get_pool_settings(args.pool)
    _out(to_json(settings) if args.json else pool_details(settings))
    return 0


def _pool_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        pools = admin.list_pool_settings()
    if args.json:
        _out(to_json(pools))
        return 0
    rows = [
        [p.pool, format_models(p), format_time(p.updated_at), p.updated_by or "-"] for p in pools
    ]
    _out(table(("POOL", "MODELS", "UPDATED", "BY"), rows))
    return 0


# audit


def _add_audit(subparsers: Subparsers, common: argparse.ArgumentParser) -> None:
    group = command_group(subparsers, "audit", help="The audit trail")
    p = _leaf(group, "query", common, "Read audit events, newest first")
    p.add_argument("--actor", help="SPIFFE ID, API token name, bootstrap:<id> or anonymous")
    p.add_argument("--action", help="dotted verb, e.g. token.create")
    p.add_argument("--since", type=_time_arg, metavar="TIME", help="ISO 8601, or ago: -1h or 1h")
    p.add_argument("--until", type=_time_arg, metavar="TIME", help="ISO 8601, or ago: -5m or 5m")
    # argparse takes "-1h" for an option (it only knows "-1" as a negative number); widen
    # its pattern on this parser, which has no option that looks like a number.
    p._negative_number_matcher = _NEGATIVE_DURATION
    p.add_argument("--limit", type=_positive_int, metavar="N", help="server default 100")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_audit_query)


def _audit_query(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        events = admin.query_audit(
            actor=args.actor,
            action=args.action,
            since=args.since,
            until=args.until,
            limit=args.limit,
        )
    if args.json:
        _out(to_json(events))
        return 0
    rows = [
        [format_time(e.time), e.actor, e.action, e.target or "-", e.outcome, e.peer or "-"]
        for e in events
    ]
    _out(table(("TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "PEER"), rows))
    return 0
