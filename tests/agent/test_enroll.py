"""Enrollment against an EnrollmentService test double over real server-authenticated TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from muster.agent import keys
from muster.agent.config import AgentConfig
from muster.agent.daemon import Agent
from muster.agent.enroll import enroll
from muster.agent.executors import ExecutorRegistry
from muster.agent.state import StateDir
from muster.errors import AuthenticationError, ConfigError, ConflictError, UnavailableError
from muster.v1 import enrollment_pb2, enrollment_pb2_grpc
from tests.agent.conftest import seed_state
from tests.agent.peer import ScriptedAgentService
from tests.testca import TestCA

TOKEN = "mbt_s3cr3t-token-value"


def test_the_csr_is_signed_by_the_key_and_carries_only_it() -> None:
    key = keys.generate_key()
    csr = x509.load_pem_x509_csr(keys.build_csr(key))
    assert csr.is_signature_valid
    assert keys.public_key_der(csr.public_key()) == keys.public_key_der(key.public_key())
    assert len(csr.extensions) == 0


@dataclass
class FakeEnrollment(enrollment_pb2_grpc.EnrollmentServiceServicer):
    ca: TestCA
    endpoint: str
    fail_with: list[grpc.StatusCode] = field(default_factory=list)
    requests: list[enrollment_pb2.EnrollRequest] = field(default_factory=list)

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> enrollment_pb2.EnrollResponse:
        self.requests.append(request)
        if self.fail_with:
            await context.abort(self.fail_with.pop(0), f"token {request.token} is not valid")
        csr = x509.load_pem_x509_csr(request.csr_pem)
        assert csr.is_signature_valid
        agent_id = request.name or "generated-1"
        issued = self.ca.ca.issue_agent_certificate(csr.public_key(), agent_id)
        response = enrollment_pb2.EnrollResponse(
            agent_id=agent_id,
            spiffe_id=issued.spiffe_id,
            certificate_chain_pem=issued.chain_pem,
            trust_bundle_pem=self.ca.bundle_pem,
            agent_endpoint=self.endpoint,
            pool=request.pool or "default",
            labels={"zone": "a", **request.labels},
        )
        response.not_after.FromDatetime(issued.not_after)
        return response


@pytest.fixture
async def api(
    ca: TestCA, endpoint: str, tmp_path: Path
) -> AsyncIterator[tuple[FakeEnrollment, str, Path]]:
    service = FakeEnrollment(ca, endpoint)
    server = grpc.aio.server()
    enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server(service, server)
    chain, key = ca.server_credentials()
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, chain)]))
    await server.start()
    ca_file = tmp_path / "bundle.pem"
    ca_file.write_bytes(ca.bundle_pem)
    try:
        yield service, f"127.0.0.1:{port}", ca_file
    finally:
        await server.stop(grace=None)


def config(tmp_path: Path, api: tuple[FakeEnrollment, str, Path], **kw: Any) -> AgentConfig:
    _, address, ca_file = api
    values: dict[str, Any] = {
        "state_dir": tmp_path / "fresh",
        "server": address,
        "token": TOKEN,
        "ca_file": ca_file,
        "name": "build-01",
        "pool": "builds",
        "labels": {"gpu": "no"},
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
        "drain_timeout": 1.0,
    }
    values.update(kw)
    return AgentConfig(**values)


async def test_enroll_sends_token_and_csr_and_stores_the_identity(
    tmp_path: Path, api: tuple[FakeEnrollment, str, Path], endpoint: str
) -> None:
    cfg = config(tmp_path, api)
    state = StateDir(cfg.state_dir)
    identity = await enroll(cfg, state)
    [request] = api[0].requests
    assert request.token == TOKEN
    assert (request.name, request.pool, dict(request.labels)) == (
        "build-01",
        "builds",
        {"gpu": "no"},
    )
    assert identity.spiffe_id == "spiffe://example.org/agent/build-01"
    assert identity.agent_endpoint == endpoint
    assert identity.labels == {"zone": "a", "gpu": "no"}
    assert state.load_identity() == identity
    creds = state.load_credentials()  # the certificate is for the key we kept
    csr = x509.load_pem_x509_csr(request.csr_pem)
    assert keys.public_key_der(csr.public_key()) == creds.leaf.public_key_der
    assert state.key_path.stat().st_mode & 0o777 == 0o600
    assert state.path.stat().st_mode & 0o777 == 0o700
    assert TOKEN.encode() not in b"".join(
        p.read_bytes() for p in state.path.iterdir() if p.is_file()
    )


async def test_a_rejected_token_is_a_clear_error_that_does_not_echo_it(
    tmp_path: Path, api: tuple[FakeEnrollment, str, Path]
) -> None:
    api[0].fail_with = [grpc.StatusCode.UNAUTHENTICATED]
    cfg = config(tmp_path, api)
    with pytest.raises(AuthenticationError, match="bootstrap token") as info:
        await enroll(cfg, StateDir(cfg.state_dir))
    assert TOKEN not in str(info.value)
    assert not StateDir(cfg.state_dir).is_enrolled()


async def test_a_taken_agent_id_says_to_pick_another_name(
    tmp_path: Path, api: tuple[FakeEnrollment, str, Path]
) -> None:
    api[0].fail_with = [grpc.StatusCode.ALREADY_EXISTS]
    cfg = config(tmp_path, api)
    with pytest.raises(ConflictError, match="--name") as info:
        await enroll(cfg, StateDir(cfg.state_dir))
    assert TOKEN not in str(info.value)  # the double's details quote the token


async def test_a_retry_after_a_failure_sends_the_same_public_key(
    tmp_path: Path, api: tuple[FakeEnrollment, str, Path]
) -> None:
    api[0].fail_with = [grpc.StatusCode.UNAVAILABLE]
    cfg = config(tmp_path, api)
    with pytest.raises(UnavailableError) as info:
        await enroll(cfg, StateDir(cfg.state_dir))
    assert TOKEN not in str(info.value)
    await enroll(cfg, StateDir(cfg.state_dir))
    first, second = (x509.load_pem_x509_csr(r.csr_pem).public_key() for r in api[0].requests)
    assert keys.public_key_der(first) == keys.public_key_der(second)


async def test_enrollment_without_a_ca_bundle_says_how_to_give_one(
    tmp_path: Path, api: tuple[FakeEnrollment, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MUSTER_CA_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, api, ca_file=None)
    with pytest.raises(ConfigError, match="--ca-file"):
        await enroll(cfg, StateDir(cfg.state_dir))


async def test_enrollment_without_a_token_says_where_to_put_one(
    tmp_path: Path, api: tuple[FakeEnrollment, str, Path]
) -> None:
    cfg = config(tmp_path, api, token=None)
    with pytest.raises(ConfigError, match="MUSTER_BOOTSTRAP_TOKEN"):
        await enroll(cfg, StateDir(cfg.state_dir))


async def test_first_run_enrolls_then_connects_and_later_runs_need_no_token(
    tmp_path: Path,
    api: tuple[FakeEnrollment, str, Path],
    service: ScriptedAgentService,
    registry: ExecutorRegistry,
) -> None:
    cfg = config(tmp_path, api)
    agent = Agent(cfg, registry=registry)
    run = asyncio.create_task(agent.run())
    stream = await service.next_stream()
    assert stream.peer_spiffe_id == "spiffe://example.org/agent/build-01"
    assert dict(stream.hello.labels) == {"zone": "a", "gpu": "no"}
    agent.shutdown()
    await asyncio.wait_for(run, 5)

    again = Agent(config(tmp_path, api, token=None, server=None), registry=registry)
    run = asyncio.create_task(again.run())
    await service.next_stream()
    again.shutdown()
    await asyncio.wait_for(run, 5)
    assert len(api[0].requests) == 1


async def test_an_expired_certificate_says_a_new_token_is_needed(
    tmp_path: Path, ca: TestCA, registry: ExecutorRegistry
) -> None:
    state = seed_state(tmp_path / "state", ca, "127.0.0.1:1")
    expired = ca.mint_client(
        uris=["spiffe://example.org/agent/agent-1"],
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2),
        lifetime=dt.timedelta(hours=1),
    )
    state.key_path.write_bytes(expired.private_key_pem)
    state.chain_path.write_bytes(expired.chain_pem)
    agent = Agent(AgentConfig(state_dir=state.path), registry=registry)
    with pytest.raises(AuthenticationError, match=r"expired at .*new bootstrap token"):
        await agent.run()


async def test_an_expired_certificate_is_replaced_when_a_token_is_given(
    tmp_path: Path,
    ca: TestCA,
    api: tuple[FakeEnrollment, str, Path],
    service: ScriptedAgentService,
    registry: ExecutorRegistry,
) -> None:
    state = seed_state(tmp_path / "state", ca, "127.0.0.1:1")
    expired = ca.mint_client(
        uris=["spiffe://example.org/agent/agent-1"],
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2),
        lifetime=dt.timedelta(hours=1),
    )
    state.key_path.write_bytes(expired.private_key_pem)
    state.chain_path.write_bytes(expired.chain_pem)
    agent = Agent(config(tmp_path, api, state_dir=state.path, name=None), registry=registry)
    run = asyncio.create_task(agent.run())
    stream = await service.next_stream()
    assert stream.peer_spiffe_id == "spiffe://example.org/agent/agent-1"  # the same agent id
    assert api[0].requests[0].name == "agent-1"
    agent.shutdown()
    await asyncio.wait_for(run, 5)
