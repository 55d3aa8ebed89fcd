"""The agent's signed-task policy: flags and environment, config errors, and a daemon
that refuses what it requires signed and does not hold, without starting the executor,
counting the refusal; kinds it does not require run signed or not."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from muster.agent.cli import config_from_args, register
from muster.agent.config import AgentConfig, parse_kinds
from muster.errors import ConfigError
from muster.signing import TaskSigner, jwks, task_id_for
from muster.v1 import agent_pb2, common_pb2, task_pb2
from tests.agent.conftest import LABELS, GateExecutor
from tests.agent.peer import ScriptedAgentService

SIGNER = TaskSigner(Ed25519PrivateKey.generate())
STRANGER = TaskSigner(Ed25519PrivateKey.generate())


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="muster")
    register(parser.add_subparsers())
    return parser.parse_args(["agent", *argv])


@pytest.fixture
def trust_file(tmp_path: Path) -> Path:
    path = tmp_path / "trusted.json"
    path.write_text(json.dumps(jwks([SIGNER.public_key])))
    return path


def test_flags_and_environment(
    trust_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MUSTER_TRUSTED_SUBMITTERS", raising=False)
    monkeypatch.delenv("MUSTER_REQUIRE_SIGNED", raising=False)
    assert config_from_args(parse()).require_signed == frozenset()
    flags = ["--trusted-submitters", str(trust_file), "--require-signed", "claude-code"]
    config = config_from_args(parse(*flags, "--require-signed", "echo,sleep"))
    assert config.trusted_submitters == trust_file
    assert config.require_signed == {"claude-code", "echo", "sleep"}
    loaded = config.load_trusted_submitters()
    assert loaded is not None and list(loaded) == [SIGNER.key_id]

    monkeypatch.setenv("MUSTER_TRUSTED_SUBMITTERS", str(trust_file))
    monkeypatch.setenv("MUSTER_REQUIRE_SIGNED", "*")
    env = config_from_args(parse())
    assert (env.trusted_submitters, env.require_signed) == (trust_file, {"*"})
    # A flag wins over the environment.
    assert config_from_args(parse("--require-signed", "echo")).require_signed == {"echo"}
    assert parse_kinds([" a , b", ",", "a"]) == {"a", "b"}


def test_requiring_signatures_without_a_trust_file_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MUSTER_TRUSTED_SUBMITTERS", raising=False)
    monkeypatch.delenv("MUSTER_REQUIRE_SIGNED", raising=False)
    with pytest.raises(ConfigError, match="--require-signed needs --trusted-submitters"):
        config_from_args(parse("--require-signed", "claude-code"))
    bad = tmp_path / "bad.pem"
    bad.write_text("nothing here")
    config = AgentConfig(trusted_submitters=bad, require_signed=frozenset({"echo"}))
    with pytest.raises(ConfigError, match="holds no PEM public key"):
        config.load_trusted_submitters()


def signed_assignment(
    task_id: str | None = None,
    kind: str = "echo",
    payload: bytes = b"hello",
    signer: TaskSigner | None = SIGNER,
    **fields: Any,
) -> agent_pb2.Assignment:
    """An Assignment as the server sends it: the envelope of a request as submitted."""
    assignment = agent_pb2.Assignment(task_id=task_id or "t", attempt=1, kind=kind, payload=payload)
    if signer is not None:
        request = task_pb2.SubmitRequest(kind=kind, payload=payload, selector={"zone": "a"})
        envelope = signer.sign(request)
        assignment.signature.CopyFrom(envelope)
        assignment.task_id = task_id or task_id_for(envelope.statement)
    for name, value in fields.items():
        setattr(assignment, name, value)
    return assignment


async def result_of(stream: Any, assignment: agent_pb2.Assignment) -> agent_pb2.Result:
    await stream.send(assignment=assignment)
    result: agent_pb2.Result = await stream.expect(
        "result", skip=("heartbeat", "accepted", "credit")
    )
    assert result.task_id == assignment.task_id
    await stream.ack(assignment.task_id)
    return result


async def test_a_daemon_refuses_what_it_requires_signed_and_does_not_hold(
    run_agent: Any, service: ScriptedAgentService, trust_file: Path, gate: GateExecutor
) -> None:
    assert dict(LABELS)["zone"] == "a"  # the signed selector admits this agent
    required = frozenset({"echo", "gate"})
    async with run_agent(trusted_submitters=trust_file, require_signed=required) as agent:
        stream = await service.next_stream()
        ok = await result_of(stream, signed_assignment())
        assert (ok.outcome, ok.output, ok.refusal) == (agent_pb2.OUTCOME_SUCCEEDED, b"hello", 0)

        cases = [
            (signed_assignment("t-unsigned", signer=None), "SIGNATURE_MISSING"),
            (signed_assignment(signer=STRANGER), "SIGNER_UNTRUSTED"),
            (signed_assignment(payload=b"hello", kind="echo"), None),  # altered below
            (signed_assignment(kind="gate", payload=b"x", signer=None), "SIGNATURE_MISSING"),
        ]
        altered = cases[2][0]
        altered.payload = b"hello, altered"
        cases[2] = (altered, "SIGNATURE_MISMATCH")
        for assignment, reason in cases:
            result = await result_of(stream, assignment)
            assert result.outcome == agent_pb2.OUTCOME_FAILED
            assert not result.retryable
            assert common_pb2.RefusalReason.Name(result.refusal) == f"REFUSAL_REASON_{reason}"
            assert result.error.startswith("refused by the agent: ")
            assert b"hello" not in result.error.encode()
        assert gate.started == []  # the executor never saw a refused attempt
        refusals = agent.runner.gate.refusals if agent.runner.gate else None
        assert refusals == {"SIGNATURE_MISSING": 2, "SIGNER_UNTRUSTED": 1, "SIGNATURE_MISMATCH": 1}

        # A kind it does not require runs signed or not.
        plain = await result_of(
            stream, signed_assignment("t-sleep", "sleep", b'{"seconds": 0}', signer=None)
        )
        assert plain.outcome == agent_pb2.OUTCOME_SUCCEEDED


async def test_without_required_kinds_nothing_is_checked(
    run_agent: Any, service: ScriptedAgentService, trust_file: Path
) -> None:
    async with run_agent(trusted_submitters=trust_file) as agent:
        stream = await service.next_stream()
        assert agent.runner.gate is None
        result = await result_of(stream, signed_assignment("t-any", signer=STRANGER))
        assert result.outcome == agent_pb2.OUTCOME_SUCCEEDED
