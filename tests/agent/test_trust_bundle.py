"""The agent's trust bundle under CA rotation: pushed on the stream, in Welcome and in
Renew; stored atomically with its version, never downgraded, garbage ignored; used to
verify the server from the next connection on (real mTLS on loopback)."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from muster.agent.state import StateDir
from muster.v1 import agent_pb2
from tests.agent.peer import ListenerTLS, PeerStream, ScriptedAgentService, serve
from tests.testca import TestCA


@pytest.fixture
def new_ca() -> TestCA:
    """The root a rotation moves to (same trust domain, unrelated keys)."""
    return TestCA.new("example.org")


@pytest.fixture
def listener(ca: TestCA) -> ListenerTLS:
    chain, key = ca.server_credentials()
    return ListenerTLS(chain, key, client_roots_pem=ca.bundle_pem)


@pytest.fixture
async def peer(
    ca: TestCA, listener: ListenerTLS
) -> AsyncIterator[tuple[ScriptedAgentService, str]]:
    """The scripted peer of conftest, on a listener whose certificate a test can change."""
    service = ScriptedAgentService(ca)
    async with serve(service, listener) as port:
        yield service, f"127.0.0.1:{port}"


def bundle(roots_pem: bytes, version: int) -> agent_pb2.TrustBundle:
    return agent_pb2.TrustBundle(roots_pem=roots_pem, version=version)


async def handled(stream: PeerStream, task_id: str) -> None:
    """Until the agent has handled everything sent before: it reads the stream in order,
    so once it accepts this echo task the earlier messages are behind it. The task runs
    and its Result is acknowledged, so that it is not resent on the next stream."""
    await stream.send(
        assignment=agent_pb2.Assignment(task_id=task_id, attempt=1, kind="echo", payload=b"x")
    )
    assert (await stream.expect("accepted", skip=("heartbeat", "credit"))).task_id == task_id
    result = await stream.expect("result", skip=("heartbeat", "credit"))
    assert (result.task_id, result.outcome) == (task_id, agent_pb2.OUTCOME_SUCCEEDED)
    await stream.ack(task_id)


async def reconnected(service: ScriptedAgentService, stream: PeerStream) -> PeerStream:
    """End ``stream`` as a restarting server would; the agent's next stream."""
    stream.end()
    return await service.next_stream()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_pushed_bundle_is_stored_and_verifies_the_next_server(
    run_agent: Any,
    service: ScriptedAgentService,
    state: StateDir,
    ca: TestCA,
    new_ca: TestCA,
    listener: ListenerTLS,
) -> None:
    both = ca.bundle_pem + new_ca.bundle_pem
    async with run_agent() as agent:
        first = await service.next_stream()
        await first.send(trust_bundle=bundle(both, 2))
        await handled(first, "t1")  # the open stream carries on as it was
        assert state.bundle_path.read_bytes() == both
        assert state.bundle_version() == 2
        assert agent.credentials.bundle_pem == both

        # The server now presents a certificate that only the new root verifies.
        listener.present(new_ca)
        second = await reconnected(service, first)
        await handled(second, "t2")
        assert second.peer_spiffe_id == first.peer_spiffe_id


async def test_without_the_new_bundle_the_next_server_is_not_trusted(
    run_agent: Any,
    service: ScriptedAgentService,
    new_ca: TestCA,
    listener: ListenerTLS,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The control for the test above: the same switch without a push loses the agent."""
    async with run_agent() as agent:
        first = await service.next_stream()
        listener.present(new_ca)
        first.end()
        await eventually(lambda: not agent.connected.is_set())
        with pytest.raises(TimeoutError):
            await service.next_stream(timeout=1.0)
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


async def test_a_lower_version_is_ignored(
    run_agent: Any,
    service: ScriptedAgentService,
    state: StateDir,
    ca: TestCA,
    new_ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="muster.agent.state")
    async with run_agent():
        first = await service.next_stream()
        await first.send(trust_bundle=bundle(ca.bundle_pem, 5))
        # A replica that has not caught up yet, with a bundle that would lose this server.
        await first.send(trust_bundle=bundle(new_ca.bundle_pem, 4))
        await handled(first, "t1")
        assert state.bundle_path.read_bytes() == ca.bundle_pem
        assert state.bundle_version() == 5
        assert "ignoring trust bundle version 4: version 5 is stored" in caplog.text
        await handled(await reconnected(service, first), "t2")


@pytest.mark.parametrize(
    "garbage",
    [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
    ids=["empty", "text", "bad-certificate"],
)
async def test_a_bundle_without_a_certificate_is_ignored_and_logged(
    run_agent: Any,
    service: ScriptedAgentService,
    state: StateDir,
    ca: TestCA,
    new_ca: TestCA,
    caplog: pytest.LogCaptureFixture,
    garbage: bytes,
) -> None:
    both = ca.bundle_pem + new_ca.bundle_pem
    async with run_agent():
        first = await service.next_stream()
        await first.send(trust_bundle=bundle(garbage, 2))
        await handled(first, "t1")
        assert state.bundle_path.read_bytes() == ca.bundle_pem
        assert state.bundle_version() == 0
        assert "ignoring trust bundle version 2: the trust bundle holds no readable PEM" in (
            caplog.text
        )
        # The garbage did not use the version up.
        await first.send(trust_bundle=bundle(both, 2))
        await handled(first, "t2")
        assert state.bundle_path.read_bytes() == both
        await handled(await reconnected(service, first), "t3")


async def test_welcome_brings_the_bundle_to_an_agent_that_was_offline(
    run_agent: Any,
    service: ScriptedAgentService,
    state: StateDir,
    ca: TestCA,
    new_ca: TestCA,
    listener: ListenerTLS,
) -> None:
    both = ca.bundle_pem + new_ca.bundle_pem
    service.trust_bundle = bundle(both, 2)
    async with run_agent() as agent:
        first = await service.next_stream()
        await eventually(agent.connected.is_set)  # set after Welcome was handled
        assert state.bundle_path.read_bytes() == both
        assert state.bundle_version() == 2
        listener.present(new_ca)
        await handled(await reconnected(service, first), "t1")


async def test_renew_response_brings_a_newer_bundle_but_never_an_older_one(
    run_agent: Any,
    service: ScriptedAgentService,
    state: StateDir,
    ca: TestCA,
    new_ca: TestCA,
) -> None:
    both = ca.bundle_pem + new_ca.bundle_pem
    service.renew_bundle = bundle(both, 3)
    async with run_agent() as agent:
        first = await service.next_stream()
        await first.send(renew=agent_pb2.Renew(reason="CA root rotated"))
        second = await service.next_stream()
        assert state.bundle_path.read_bytes() == both
        assert state.bundle_version() == 3
        assert agent.credentials.bundle_pem == both

        service.renew_bundle = bundle(new_ca.bundle_pem, 2)
        await second.send(renew=agent_pb2.Renew(reason="again"))
        await service.next_stream()
        assert len(service.renewals) == 2
        assert state.bundle_path.read_bytes() == both
        assert state.bundle_version() == 3


async def test_a_server_that_never_sends_a_bundle_keeps_working(
    run_agent: Any, service: ScriptedAgentService, state: StateDir, ca: TestCA
) -> None:
    """Servers before CA rotation: no bundle in Welcome, an unversioned one in Renew
    (stored as before, while the agent's bundle has no version either)."""
    async with run_agent():
        first = await service.next_stream()
        await first.send(renew=agent_pb2.Renew(reason="rotate"))
        second = await service.next_stream()
        await handled(second, "t1")
        assert state.bundle_path.read_bytes() == ca.bundle_pem
        assert not state.bundle_version_path.exists()
        await handled(await reconnected(service, second), "t2")


def test_an_unversioned_bundle_never_replaces_a_versioned_one(
    tmp_path: Path, ca: TestCA, new_ca: TestCA
) -> None:
    state = StateDir(tmp_path)
    state.ensure()
    assert state.save_trust_bundle(ca.bundle_pem, 0) == ca.bundle_pem
    assert state.save_trust_bundle(new_ca.bundle_pem, 1) == new_ca.bundle_pem
    assert state.save_trust_bundle(ca.bundle_pem, 0) is None  # an old replica's Renew
    assert state.save_trust_bundle(ca.bundle_pem, 1) is None  # the same version again
    assert state.bundle_path.read_bytes() == new_ca.bundle_pem


# Crash safety ---------------------------------------------------------------

_CRASH_AT = r"""
import os, signal, sys
from pathlib import Path
from muster.agent.state import StateDir

state_dir, new_file, version, crash_at = sys.argv[1:]
state, roots = StateDir(Path(state_dir)), Path(new_file).read_bytes()
seen = 0

def crash(event, args):
    # Each file operation in the state dir is a point to die at, just before it happens.
    global seen
    if event in ("open", "os.rename", "os.remove") and str(args[0]).startswith(state_dir):
        seen += 1
        if seen == int(crash_at):
            os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(crash)
state.save_trust_bundle(roots, int(version))
"""


@pytest.mark.slow
def test_a_crash_while_storing_leaves_the_old_bundle_or_the_new_one(
    tmp_path: Path, ca: TestCA, new_ca: TestCA
) -> None:
    """SIGKILL the storing process just before each of its file operations in turn: the
    bundle is always whole (old or new), never older than its recorded version (which
    would make the agent ignore the new one for good), and offering the new version
    again completes the change."""
    old, new = ca.bundle_pem, ca.bundle_pem + new_ca.bundle_pem
    new_file = tmp_path / "new.pem"
    new_file.write_bytes(new)
    crash_at = 1
    while True:
        state = StateDir(tmp_path / f"state-{crash_at}")
        state.ensure()
        assert state.save_trust_bundle(old, 1) == old
        child = subprocess.run(
            [sys.executable, "-c", _CRASH_AT, str(state.path), str(new_file), "2", str(crash_at)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        stored, version = state.bundle_path.read_bytes(), state.bundle_version()
        if child.returncode == 0:
            assert (stored, version) == (new, 2)
            break
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        assert stored in (old, new), f"crash point {crash_at}: a partial bundle"
        assert (stored, version) in ((old, 1), (new, 1), (new, 2)), f"crash point {crash_at}"
        StateDir(state.path).save_trust_bundle(new, 2)  # the next Welcome or push
        assert (state.bundle_path.read_bytes(), state.bundle_version()) == (new, 2)
        crash_at += 1
    assert crash_at >= 4, "the store did fewer file operations than it should"
