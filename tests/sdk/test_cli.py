"""The ``muster`` dispatcher and the client subcommands, called through ``main([...])``."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

from muster import cli
from muster.cli import ENTRY_POINT_GROUP, build_parser, main
from muster.sanitize import neutralize
from muster.v1 import admin_pb2, common_pb2

from .fakes import API_SECRET, BOOTSTRAP_SECRET, TOKEN, State, Step, seed

pytestmark = pytest.mark.slow

S = common_pb2.TaskState


@pytest.fixture
def conn(address: str, token_file: Path, ca_file: Path, fake: State) -> list[str]:
    """The connection flags for the test server."""
    return ["--addr", address, "--token-file", str(token_file), "--ca-file", str(ca_file)]


def _leaf_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield prefix
    for group in groups:
        for name, sub in group.choices.items():
            yield from _leaf_paths(sub, (*prefix, name))


def _client_only() -> list[EntryPoint]:
    return [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "client"]


CLIENT_COMMANDS = sorted(_leaf_paths(build_parser(_client_only())))


# The dispatcher


def test_no_subcommand_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: muster")
    assert "submit" in err


def test_a_group_without_its_subcommand_prints_its_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["task"]) == 2
    assert "usage: muster task" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("muster ")


def test_usage_errors_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    assert main(["token", "create", "--pool", "p", "--ttl", "10x"]) == 2
    assert "invalid duration" in capsys.readouterr().err


def test_the_client_commands_exist() -> None:
    assert (
        sorted(
            [
                ("submit",),
                ("submit-many",),
                ("key", "generate"),
                ("key", "public"),
                ("task", "get"),
                ("task", "list"),
                ("task", "cancel"),
                ("task", "watch"),
                ("token", "create"),
                ("token", "list"),
                ("token", "delete"),
                ("api-token", "create"),
                ("api-token", "list"),
                ("api-token", "delete"),
                ("agents", "list"),
                ("agents", "get"),
                ("agents", "disable"),
                ("agents", "enable"),
                ("agents", "revoke"),
                ("agents", "remove"),
                ("agents", "rotate"),
                ("cert", "revoke"),
                ("audit", "query"),
                ("tenant", "list"),
                ("budget", "set"),
                ("budget", "get"),
                ("budget", "list"),
                ("budget", "delete"),
                ("pool", "set"),
                ("pool", "get"),
                ("pool", "list"),
            ]
        )
        == CLIENT_COMMANDS
    )


@pytest.mark.parametrize("path", CLIENT_COMMANDS, ids=" ".join)
def test_every_client_subcommand_has_help(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: muster {' '.join(path)}")
    if path[0] != "key":  # keys are local files: no server to reach
        assert "--addr" in out and "--token-file" in out and "--ca-file" in out


def test_the_client_commands_come_from_the_installed_entry_point() -> None:
    names = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert names["client"] == "muster.cli_commands:register"
    assert "submit" in build_parser().format_help()


PLUGIN = textwrap.dedent(
    """
    from muster.cli import command_group
    from muster.errors import MusterError

    def register(subparsers):
        hello = subparsers.add_parser("hello")
        hello.add_argument("--code", type=int, default=0)
        hello.set_defaults(func=lambda args: args.code)
        fail = subparsers.add_parser("fail")
        fail.set_defaults(func=_fail)
        interrupt = subparsers.add_parser("interrupt")
        interrupt.set_defaults(func=_interrupt)
        verify = command_group(subparsers, "audit", help="audit").add_parser("verify")
        verify.set_defaults(func=lambda args: 7)

    def _fail(args):
        raise MusterError("it broke\\non two lines")

    def _interrupt(args):
        raise KeyboardInterrupt
    """
)


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[EntryPoint]:
    """The real client commands plus a third-party plugin, a broken one and an absent one."""
    (tmp_path / "muster_test_plugin.py").write_text(PLUGIN)
    (tmp_path / "muster_broken_plugin.py").write_text("raise RuntimeError('plugin bug')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = [
        *_client_only(),
        EntryPoint("zplugin", "muster_test_plugin:register", ENTRY_POINT_GROUP),
        EntryPoint("broken", "muster_broken_plugin:register", ENTRY_POINT_GROUP),
        EntryPoint("absent", "muster_not_installed.cli:register", ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(
        cli, "entry_points", lambda group: found if group == ENTRY_POINT_GROUP else []
    )
    return found


def test_plugins_are_discovered_and_broken_ones_only_warn(
    plugins: list[EntryPoint], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["hello", "--code", "3"]) == 3
    err = capsys.readouterr().err
    assert err.count("muster: warning:") == 1
    assert "'broken'" in err and "plugin bug" in err
    assert "absent" not in err


def test_two_packages_share_a_command_group(plugins: list[EntryPoint]) -> None:
    assert main(["audit", "verify"]) == 7
    assert main(["audit", "query", "--help"]) == 0


def test_a_muster_error_is_one_line_on_stderr(
    plugins: list[EntryPoint], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["fail"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == "muster: error: it broke on two lines"
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_keyboard_interrupt_returns_130(plugins: list[EntryPoint]) -> None:
    assert main(["interrupt"]) == 130


def test_the_dispatcher_imports_neither_server_nor_agent() -> None:
    code = (
        "import sys, muster, muster.cli, muster.cli_commands\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('server', 'agent'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_python_dash_m_muster() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "muster", "--version"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert out.startswith("muster ")


# Client commands against the test server


def test_submit_wait_prints_the_echo_output(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", "echo", "--payload", '{"msg":"hi"}', "--wait", *conn]) == 0
    captured = capsys.readouterr()
    assert captured.out == '{"msg":"hi"}\n'
    assert captured.err == ""
    assert fake.requests[0].payload == b'{"msg":"hi"}'


def test_submit_prints_the_task_id(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    payload = tmp_path / "in.bin"
    payload.write_bytes(b"\x00\x01")
    args = ["submit", "build", "--payload-file", str(payload), "--pool", "gpu", *conn]
    args += ["--selector", "zone=a", "--selector", "arch=arm64", "--priority", "4"]
    args += ["--max-attempts", "2", "--idempotency-key", "k", "--start-to-close-timeout", "5m"]
    assert main(args) == 0
    assert capsys.readouterr().out == "t-0001\n"
    sent = fake.requests[0]
    assert (sent.kind, sent.payload, sent.pool, sent.priority) == ("build", b"\x00\x01", "gpu", 4)
    assert dict(sent.selector) == {"zone": "a", "arch": "arm64"}
    assert (sent.max_attempts, sent.idempotency_key) == (2, "k")
    assert sent.start_to_close_timeout.ToTimedelta() == timedelta(minutes=5)


def test_submit_wait_on_failure_exits_1_with_the_error(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.kind_scripts["build"] = [Step(S.TASK_STATE_FAILED, error="compiler crashed")]
    assert main(["submit", "build", "--wait", *conn]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "muster: task t-0001 FAILED: compiler crashed\n"


def test_submit_wait_timeout(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", "build", "--wait", "--timeout", "300ms", *conn]) == 1
    err = capsys.readouterr().err
    assert err == "muster: error: task t-0001 did not finish within 0.3s (last state QUEUED)\n"


def test_submit_wait_json(conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "echo", "--payload", "plain text", "--wait", "--json", *conn]) == 0
    task = json.loads(capsys.readouterr().out)
    assert (task["state"], task["output"], task["payload"]) == (
        "SUCCEEDED",
        "plain text",
        "plain text",
    )


def test_config_errors_are_one_line(capsys: pytest.CaptureFixture[str], address: str) -> None:
    assert main(["task", "list", "--addr", address]) == 1
    err = capsys.readouterr().err
    assert err.startswith("muster: error: no API token: set MUSTER_TOKEN or MUSTER_TOKEN_FILE")
    assert err.count("\n") == 1


def test_server_errors_are_one_line(conn: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["task", "get", "missing", *conn]) == 1
    assert capsys.readouterr().err == "muster: error: task missing not found\n"


def test_the_dev_flow_needs_no_flags(
    isolated_env: Path,
    address: str,
    ca_file: Path,
    fake: State,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``muster dev`` leaves .muster/admin.token and .muster/ca/bundle.pem behind."""
    (isolated_env / ".muster" / "ca").mkdir(parents=True)
    (isolated_env / ".muster" / "admin.token").write_text(TOKEN)
    (isolated_env / ".muster" / "ca" / "bundle.pem").write_bytes(ca_file.read_bytes())
    (isolated_env / ".env").write_text(f"MUSTER_ADDR={address}\n")
    assert main(["submit", "echo", "--payload", "hi", "--wait"]) == 0
    assert capsys.readouterr().out == "hi\n"


def test_task_get_list_cancel(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    for kind in ("echo", "sleep", "sleep"):
        assert main(["submit", kind, *conn]) == 0
    assert main(["task", "cancel", "t-0002", "--reason", "no longer needed", *conn]) == 0
    assert main(["task", "get", "t-0002", *conn]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[3] == "t-0002 CANCELLED"
    details = dict((k, v.strip()) for k, v in (line.split(":", 1) for line in out[4:]))
    assert (details["task_id"], details["state"]) == ("t-0002", "CANCELLED")
    assert details["error"] == "no longer needed"

    assert main(["task", "list", "--kind", "sleep", "--limit", "10", *conn]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["TASK_ID", "KIND", "POOL", "STATE", "ATTEMPT", "AGENT", "CREATED"]
    assert [row.split()[:4] for row in table[1:]] == [
        ["t-0003", "sleep", "default", "QUEUED"],
        ["t-0002", "sleep", "default", "CANCELLED"],
    ]
    sent = fake.requests[-1]
    assert (sent.kind, sent.page_size) == ("sleep", 10)

    assert main(["task", "list", "--state", "cancelled", "--state", "FAILED", "--json", *conn]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["task_id"] for t in listed] == ["t-0002"]
    assert list(fake.requests[-1].states) == [S.TASK_STATE_CANCELLED, S.TASK_STATE_FAILED]


def test_task_list_rejects_an_unknown_state(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["task", "list", "--state", "sleeping"]) == 2
    assert "unknown task state" in capsys.readouterr().err


def test_task_watch_prints_a_line_per_change(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", "echo", "--payload", "x", *conn]) == 0
    capsys.readouterr()
    assert main(["task", "watch", "t-0001", *conn]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1:4] for line in lines] == [
        ["t-0001", "QUEUED", "attempt=1"],
        ["t-0001", "RUNNING", "attempt=1"],
        ["t-0001", "SUCCEEDED", "attempt=1"],
    ]
    assert "agent=agent-1" in lines[1]


def test_token_create_prints_only_the_secret_on_stdout(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["token", "create", "--pool", "gpu", "--label", "zone=a", "--ttl", "10m"]
    args += ["--uses", "3", "--name-pattern", "gpu-*", *conn]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == BOOTSTRAP_SECRET + "\n"
    assert "bt-1" in captured.err
    assert "2030-01-02T03:04:05Z" in captured.err
    assert BOOTSTRAP_SECRET not in captured.err
    sent: admin_pb2.CreateBootstrapTokenRequest = fake.requests[0]
    assert (sent.pool, dict(sent.labels), sent.max_uses, sent.name_pattern) == (
        "gpu",
        {"zone": "a"},
        3,
        "gpu-*",
    )
    assert sent.ttl.ToTimedelta() == timedelta(minutes=10)


def test_token_list_and_delete(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "list", *conn]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:3] == ["TOKEN_ID", "POOL", "USES"]
    assert rows[1].split()[:3] == ["bt-1", "gpu", "1/2"]
    assert main(["token", "delete", "bt-1", *conn]) == 0
    assert main(["token", "delete", "bt-9", *conn]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == "muster: error: no bootstrap token bt-9"


def test_api_token_commands(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["api-token", "create", "ci", "--role", "admin", "--ttl", "7d", *conn]) == 0
    captured = capsys.readouterr()
    assert captured.out == API_SECRET + "\n"
    assert "at-1" in captured.err and API_SECRET not in captured.err
    sent: admin_pb2.CreateApiTokenRequest = fake.requests[0]
    assert (sent.name, sent.role) == ("ci", admin_pb2.ROLE_ADMIN)
    assert sent.ttl.ToTimedelta() == timedelta(days=7)
    assert sent.tenant == ""
    assert "tenant=own" in captured.err
    assert (
        main(["api-token", "create", "ci-2", "--role", "submitter", "--tenant", "acme", *conn]) == 0
    )
    assert fake.requests[-1].tenant == "acme"
    assert "tenant=acme" in capsys.readouterr().err
    assert main(["api-token", "list", *conn]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:4] == ["TOKEN_ID", "NAME", "ROLE", "TENANT"]
    assert rows[1].split()[:4] == ["at-1", "ci", "submitter", "acme"]
    assert main(["api-token", "delete", "at-1", *conn]) == 0
    assert main(["api-token", "create", "x", "--role", "root", *conn]) == 2


def test_tenant_list(conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tenant", "list", *conn]) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["TENANT", "TOKENS", "CREATED"],
        ["acme", "2", "2026-12-01T00:00:00Z"],
        ["ci", "0", "2026-12-01T00:00:00Z"],
    ]
    assert main(["tenant", "list", "--json", *conn]) == 0
    assert json.loads(capsys.readouterr().out)[0] == {
        "name": "acme",
        "created_at": "2026-12-01T00:00:00Z",
        "tokens": 2,
    }


def test_budget_commands(conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["budget", "set", "tenant:acme", "--limit-usd", "10", "--period", "day", *conn]
    assert main(args) == 0
    sent: admin_pb2.SetBudgetRequest = fake.requests[-1]
    assert (sent.scope, sent.limit_micros, sent.period) == ("tenant:acme", 10_000_000, "day")
    assert main(["budget", "set", "global", "--limit-usd", "0.5", *conn]) == 0
    assert (fake.requests[-1].limit_micros, fake.requests[-1].period) == (500_000, "month")
    capsys.readouterr()

    assert main(["budget", "get", "tenant:acme", *conn]) == 0
    details = dict(
        (k, v.strip())
        for k, v in (line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    )
    assert details == {
        "scope": "tenant:acme",
        "limit": "10.00 USD per day",
        "spent": "1.25 USD",
        "reserved": "0.40 USD",
        "left": "8.35 USD",
        "period": "day (2026-12-01T00:00:00Z to 2027-01-01T00:00:00Z)",
        "updated": "2026-12-01T00:00:00Z by admin",
    }

    assert main(["budget", "list", *conn]) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["SCOPE", "LIMIT_USD", "SPENT_USD", "RESERVED_USD", "LEFT_USD", "PERIOD", "ENDS"],
        ["global", "0.50", "1.25", "0.40", "0.00", "month", "2027-01-01T00:00:00Z"],
        ["tenant:acme", "10.00", "1.25", "0.40", "8.35", "day", "2027-01-01T00:00:00Z"],
    ]
    assert main(["budget", "get", "global", "--json", *conn]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert (as_json["limit_micros"], as_json["spent_micros"]) == (500_000, 1_250_000)

    assert main(["budget", "delete", "global", *conn]) == 0
    assert capsys.readouterr().err == "deleted the budget of global\n"
    assert main(["budget", "get", "global", *conn]) == 1
    assert capsys.readouterr().err == "muster: error: no budget for scope 'global'\n"


@pytest.mark.parametrize(
    "bad",
    [
        ["budget", "set", "global"],
        ["budget", "set", "global", "--limit-usd", "-1"],
        ["budget", "set", "global", "--limit-usd", "nan"],
        ["budget", "set", "global", "--limit-usd", "ten"],
        ["budget", "set", "global", "--limit-usd", "1", "--period", "week"],
        ["submit", "echo", "--max-cost-usd", "0"],
        ["submit", "echo", "--max-cost-usd", "inf"],
        ["pool", "set", "gpu"],
    ],
    ids=" ".join,
)
def test_budget_and_pool_usage_errors(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(bad) == 2
    assert "usage: muster" in capsys.readouterr().err


def test_pool_commands(conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pool", "get", "gpu", *conn]) == 0
    out = capsys.readouterr().out
    assert "models:  any priced model" in out and "never (defaults)" in out
    args = ["pool", "set", "gpu", "--models", "claude-sonnet-4-5, claude-haiku-4-5", *conn]
    assert main(args) == 0
    assert list(fake.requests[-1].allowed_models) == ["claude-sonnet-4-5", "claude-haiku-4-5"]
    assert "models:  claude-sonnet-4-5,claude-haiku-4-5" in capsys.readouterr().out
    assert main(["pool", "set", "cpu", "--models", "", *conn]) == 0
    assert list(fake.requests[-1].allowed_models) == []
    capsys.readouterr()
    assert main(["pool", "list", *conn]) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["POOL", "MODELS", "UPDATED", "BY"],
        ["cpu", "any", "priced", "model", "2026-12-01T00:00:00Z", "admin"],
        ["gpu", "claude-sonnet-4-5,claude-haiku-4-5", "2026-12-01T00:00:00Z", "admin"],
    ]
    assert main(["pool", "get", "gpu", "--json", *conn]) == 0
    assert json.loads(capsys.readouterr().out)["allowed_models"] == [
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
    ]


def test_submit_with_a_cost_cap_and_an_output_schema(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "required": ["answer"]}\n')
    args = ["submit", "anthropic.messages", "--payload", "{}", "--max-cost-usd", "0.25", *conn]
    assert main([*args, "--output-schema", str(schema)]) == 0
    sent = fake.requests[-1]
    assert (sent.max_cost_usd, sent.output_schema) == (0.25, schema.read_text())
    assert main([*args, "--output-schema", ' {"type": "string"}']) == 0
    assert fake.requests[-1].output_schema == ' {"type": "string"}'
    assert main([*args, "--output-schema", str(tmp_path / "missing.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("muster: error: cannot read --output-schema file ")
    assert "No such file" in err


def test_task_get_shows_waiting_reason_and_usage(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    (waiting_id, done_id) = seed(fake, 2, kind="anthropic.messages")
    fake.tasks[
        waiting_id
    ].waiting_reason = "waiting for budget tenant:acme: 0.12 of 10.00 USD left, 0.40 needed"
    done = fake.tasks[done_id]
    done.state = S.TASK_STATE_SUCCEEDED
    done.attempt = 2
    done.max_cost_micros = 2_000_000
    done.usage.CopyFrom(
        common_pb2.Usage(
            model="claude-sonnet-4-5",
            input_tokens=1200,
            output_tokens=350,
            cache_creation_input_tokens=100,
            cache_creation_1h_input_tokens=40,
            cache_read_input_tokens=800,
            cost_micros=9_315,
        )
    )
    done.attempt_usage.add(
        attempt=1,
        agent_id="agent-1",
        usage=common_pb2.Usage(model="claude-sonnet-4-5", input_tokens=600, cost_micros=1_800),
    )
    done.attempt_usage.add(
        attempt=2,
        agent_id="agent-2",
        usage=common_pb2.Usage(
            model="claude-sonnet-4-5", input_tokens=600, output_tokens=350, cost_micros=7_515
        ),
    )
    assert main(["task", "get", waiting_id, *conn]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [re.sub(" +", " ", line) for line in lines if line.startswith("waiting:")] == [
        "waiting: waiting for budget tenant:acme: 0.12 of 10.00 USD left, 0.40 needed"
    ]
    assert not any(line.startswith("usage:") for line in lines)

    assert main(["task", "get", done_id, *conn]) == 0
    lines = capsys.readouterr().out.splitlines()
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in lines)}
    assert "waiting" not in fields
    assert fields["max_cost"] == "2.00 USD"
    assert fields["usage"] == (
        "claude-sonnet-4-5 input=1200 output=350 cache_write=100 (1h=40) cache_read=800 "
        "cost=0.009315 USD"
    )
    assert fields["attempt 1"] == (
        "claude-sonnet-4-5 input=600 output=0 cost=0.0018 USD on agent-1"
    )
    assert fields["attempt 2"] == (
        "claude-sonnet-4-5 input=600 output=350 cost=0.007515 USD on agent-2"
    )


HOSTILE = "ok\x1b]0;pwned\x07\x1b[2J\u202egnp.exe\x00\rfake prompt$ \x9b31m"
RAW = ["\x1b", "\x07", "\u202e", "\x00", "\r", "\x9b"]


def _clean(text: str) -> None:
    for char in RAW:
        assert char not in text, f"{char!r} reached the terminal"


def test_output_and_errors_are_neutralised_on_a_terminal(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    """Model output is untrusted: no escape sequence, bidi override, NUL or CR reaches the
    terminal in plain or table mode, and --json keeps the exact text."""
    fake.kind_scripts["ai"] = [
        Step(S.TASK_STATE_RUNNING),
        Step(S.TASK_STATE_SUCCEEDED, output=f"line one\n{HOSTILE}\n".encode()),
    ]
    fake.kind_scripts["bad"] = [Step(S.TASK_STATE_FAILED, error=f"it broke: {HOSTILE}")]
    assert main(["submit", "ai", "--wait", *conn]) == 0
    out = capsys.readouterr().out
    _clean(out)
    assert out == (
        "line one\nok\\x1b]0;pwned\\x07\\x1b[2J\\u202egnp.exe\\x00\\rfake prompt$ \\x9b31m\n"
    )

    assert main(["submit", "bad", "--wait", *conn]) == 1
    captured = capsys.readouterr()
    _clean(captured.err)
    assert captured.err.startswith("muster: task t-0002 FAILED: it broke: ok\\x1b]0;pwned")
    assert captured.err.count("\n") == 1

    fake.tasks["t-0002"].waiting_reason = HOSTILE  # shown only while queued
    fake.tasks["t-0002"].state = S.TASK_STATE_QUEUED
    fake.tasks["t-0002"].agent_id = HOSTILE
    for command in (
        ["task", "get", "t-0001"],
        ["task", "get", "t-0002"],
        ["task", "list"],
        ["submit", "bad", "--wait"],
    ):
        main([*command, *conn])
        captured = capsys.readouterr()
        _clean(captured.out + captured.err)
    assert main(["task", "get", "t-0002", *conn]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^waiting: +ok\\x1b\]0;pwned", out, re.MULTILINE)

    # Multi-line output stays multi-line but cannot forge a field: later lines are indented.
    assert main(["task", "get", "t-0001", *conn]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"output: +line one", lines[-2])
    indent = lines[-2].index("line one")
    assert lines[-1] == " " * indent + neutralize(HOSTILE)

    assert main(["task", "get", "t-0001", "--json", *conn]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == f"line one\n{HOSTILE}\n"


def test_watch_lines_are_neutralised(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.kind_scripts["bad"] = [Step(S.TASK_STATE_FAILED, error=f"x\n{HOSTILE}")]
    assert main(["submit", "bad", *conn]) == 0
    fake.tasks["t-0001"].waiting_reason = "waiting for budget global\x1b[2J"
    capsys.readouterr()
    assert main(["task", "watch", "t-0001", *conn]) == 1
    out = capsys.readouterr().out
    _clean(out)
    lines = out.splitlines()
    assert len(lines) == 2
    assert 'waiting="waiting for budget global\\x1b[2J"' in lines[0]
    assert 'error="x\\nok\\x1b]0;pwned' in lines[1]


def test_agent_and_cert_commands(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["agents", "list", "--pool", "gpu", *conn]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:4] == ["build-01", "gpu", "enabled", "yes"]
    assert fake.requests[-1].pool == "gpu"

    assert main(["agents", "get", "build-02", *conn]) == 0
    out = capsys.readouterr().out
    assert "spiffe://example.org/agent/build-02" in out
    assert "0abc" in out

    assert main(["agents", "get", "build-02", "--json", *conn]) == 0
    assert json.loads(capsys.readouterr().out)["certificates"][0]["serial"] == "0abc"

    assert main(["agents", "disable", "build-02", *conn]) == 0
    assert fake.requests[-1].enabled is False
    assert main(["agents", "enable", "build-02", *conn]) == 0
    assert fake.requests[-1].enabled is True
    assert capsys.readouterr().out.splitlines() == ["build-02 disabled", "build-02 enabled"]

    assert main(["agents", "revoke", "build-02", "--reason", "stolen", *conn]) == 0
    assert capsys.readouterr().out.splitlines() == ["0abc", "0def"]
    assert fake.requests[-1].reason == "stolen"

    assert main(["cert", "revoke", "0abc", *conn]) == 0
    assert fake.requests[-1].serial == "0abc"


def test_audit_query(conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]) -> None:
    before = datetime.now(UTC)
    args = ["audit", "query", "--actor", "admin", "--action", "token.create", "--since", "-1h"]
    assert main([*args, "--limit", "5", *conn]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split() == ["2026-01-01T00:00:00Z", "admin", "token.create", "bt-1", "ok", "-"]
    sent: admin_pb2.QueryAuditRequest = fake.requests[0]
    assert (sent.actor, sent.action, sent.limit) == ("admin", "token.create", 5)
    since = sent.since.ToDatetime(tzinfo=UTC)
    assert before - timedelta(hours=1, seconds=5) < since <= before - timedelta(minutes=59)

    assert main(["audit", "query", "--since", "30m", "--until=-1m", *conn]) == 0
    sent = fake.requests[-1]
    assert sent.since.ToDatetime(tzinfo=UTC) < sent.until.ToDatetime(tzinfo=UTC) < before
    capsys.readouterr()

    assert main(["audit", "query", "--since", "2026-01-01T00:00:00Z", "--json", *conn]) == 0
    events = json.loads(capsys.readouterr().out)
    assert events[0]["details"] == '{"pool": "gpu"}'
    assert fake.requests[-1].since.ToDatetime(tzinfo=UTC) == datetime(2026, 1, 1, tzinfo=UTC)
