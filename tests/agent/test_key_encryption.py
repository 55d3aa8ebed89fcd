"""The agent's private key encrypted at rest (``--key-passphrase-file``): the files on disk
are encrypted PKCS#8 through enrollment, renewal and re-enrollment, a plain key is
encrypted at start, and a missing or wrong passphrase is a clear error that leaks nothing.

The key files are checked with ``cryptography`` directly, not with the agent's own code."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from muster import AsyncAdminClient, AsyncClient, TaskState
from muster.agent import keys
from muster.agent.cli import config_from_args
from muster.agent.config import AgentConfig, read_key_passphrase
from muster.agent.daemon import Agent
from muster.agent.enroll import enroll
from muster.agent.executors import ExecutorRegistry
from muster.agent.state import StateDir
from muster.errors import ConfigError
from muster.files import write_atomic
from muster.server.app import ServerHandle
from tests.agent.conftest import AGENT_ID, seed_state
from tests.agent.test_cli import parse
from tests.agent.test_end_to_end import running
from tests.e2e import procs
from tests.e2e.test_processes import until_connected
from tests.testca import TestCA

pytestmark = pytest.mark.slow

ENCRYPTED = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n"
PLAIN = b"-----BEGIN PRIVATE KEY-----\n"


def passphrase_file(directory: Path, passphrase: str) -> Path:
    """A systemd-style credential: one file in a private directory, a trailing newline."""
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / "key-passphrase"
    write_atomic(path, passphrase.encode() + b"\n")
    return path


def encrypted_key(path: Path, passphrase: str) -> ec.EllipticCurvePrivateKey:
    """The key in ``path``, after checking it is encrypted PKCS#8 that only ``passphrase`` opens."""
    pem = path.read_bytes()
    assert pem.startswith(ENCRYPTED), pem[:40]
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(TypeError, match="encrypted"):
        serialization.load_pem_private_key(pem, password=None)
    # A wrong password is a ValueError: "Bad decrypt. Incorrect password?" mostly, but
    # about 1 in 400 wrong keys decrypt to padding that passes and then fail to parse.
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(pem, password=b"not-" + passphrase.encode())
    key = serialization.load_pem_private_key(pem, password=passphrase.encode())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def leaf_of(state: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((state / "agent.pem").read_bytes())[0]


def same_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    return keys.public_key_der(key.public_key()) == keys.public_key_der(cert.public_key())


async def until_stream_with(server: ServerHandle, admin: AsyncAdminClient, serial: str) -> None:
    """Until the server has audited a stream opened with the certificate ``serial``."""
    async with asyncio.timeout(30):
        while True:
            await server.flush_audit()
            events = await admin.query_audit(action="stream.connect", limit=100)
            if any(json.loads(e.details).get("serial") == serial for e in events):
                return
            await asyncio.sleep(0.1)


async def test_the_agent_process_keeps_its_key_encrypted_and_renews(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient, client: AsyncClient
) -> None:
    name = "sealed-01"
    secret = secrets.token_urlsafe(24)
    credential = passphrase_file(tmp_path / "credentials", secret)
    _, token = await admin.create_bootstrap_token("default")
    state, log = tmp_path / "state", tmp_path / "agent.log"
    agent = await procs.spawn(
        "agent",
        "--server", server.api_address,
        "--ca-file", str(server.config.ca_dir / "bundle.pem"),
        "--state-dir", str(state),
        "--name", name,
        "--executors", "echo",
        "--key-passphrase-file", str(credential),
        "--log-level", "debug",
        cwd=tmp_path,
        log=log,
        environ=procs.env(MUSTER_BOOTSTRAP_TOKEN=token),
    )  # fmt: skip
    try:
        await until_connected(admin, name)
        # What `ps` (and anyone reading /proc) sees names the file, never the passphrase.
        for seen in ("cmdline", "environ"):
            assert secret.encode() not in Path(f"/proc/{agent.pid}/{seen}").read_bytes()
        enrolled_key = encrypted_key(state / "agent.key", secret)
        enrolled_leaf = leaf_of(state)
        assert same_key(enrolled_key, enrolled_leaf)
        done = await client.wait((await client.submit("echo", b"sealed")).task_id, timeout=30)
        assert (done.state, done.agent_id, done.output) == (TaskState.SUCCEEDED, name, b"sealed")

        assert await admin.rotate_agents(name, reason="key hygiene") == 1
        async with asyncio.timeout(30):
            while leaf_of(state).serial_number == enrolled_leaf.serial_number:
                await asyncio.sleep(0.05)
        renewed_leaf = leaf_of(state)  # agent.pem is committed last: agent.key is new too
        renewed_key = encrypted_key(state / "agent.key", secret)
        assert same_key(renewed_key, renewed_leaf)
        assert not same_key(renewed_key, enrolled_leaf)
        assert not list(state.glob("*.next"))
        await until_stream_with(server, admin, format(renewed_leaf.serial_number, "x"))
        certs = (await admin.get_agent(name)).certificates
        assert [c.reason for c in certs if c.serial == format(renewed_leaf.serial_number, "x")] == [
            "renew"
        ]
        again = await client.wait((await client.submit("echo", b"renewed")).task_id, timeout=30)
        assert (again.state, again.output) == (TaskState.SUCCEEDED, b"renewed")
        assert await procs.stop(agent) == 0
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
    text = log.read_text(errors="replace")
    assert "switched to a stream with the renewed certificate" in text
    for leaked in (secret, token, "PRIVATE KEY"):
        assert leaked not in text


async def test_a_missing_or_wrong_passphrase_stops_the_process_with_a_clear_error(
    tmp_path: Path, server: ServerHandle, admin: AsyncAdminClient
) -> None:
    secret = secrets.token_urlsafe(24)
    wrong = secrets.token_urlsafe(24)
    _, token = await admin.create_bootstrap_token("default")
    state = tmp_path / "state"
    config = AgentConfig(
        state_dir=state,
        server=server.api_address,
        token=token,
        ca_file=server.config.ca_dir / "bundle.pem",
        name="locked-01",
        key_passphrase=secret.encode(),
    )
    await enroll(config, StateDir(state, key_passphrase=config.key_passphrase))
    sealed = (state / "agent.key").read_bytes()
    encrypted_key(state / "agent.key", secret)

    async def start(*extra: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "muster", "agent", "--state-dir", str(state), *extra,
            cwd=tmp_path, env=procs.env(), stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(30):
            _, stderr = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, stderr.decode()

    wrong_file = passphrase_file(tmp_path / "wrong", wrong)
    (none_code, none_err), (wrong_code, wrong_err) = await asyncio.gather(
        start(), start("--key-passphrase-file", str(wrong_file))
    )
    assert none_code == 1, none_err
    assert none_err.strip().splitlines()[-1] == (
        f"muster: error: {state / 'agent.key'} is encrypted: pass --key-passphrase-file"
    )
    assert wrong_code == 1, wrong_err
    last = wrong_err.strip().splitlines()[-1]
    assert last.startswith("muster: error: ") and "does not decrypt" in last
    assert "wrong passphrase" in last
    for stderr in (none_err, wrong_err):
        assert "Traceback" not in stderr
        for leaked in (secret, wrong):
            assert leaked not in stderr
    assert (state / "agent.key").read_bytes() == sealed  # nothing rewritten


async def test_a_plain_key_is_encrypted_at_start_and_then_needs_the_passphrase(
    tmp_path: Path,
    server: ServerHandle,
    admin: AsyncAdminClient,
    client: AsyncClient,
    registry: ExecutorRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, token = await admin.create_bootstrap_token("default")
    state = tmp_path / "state"
    values: dict[str, Any] = {
        "state_dir": state,
        "server": server.api_address,
        "token": token,
        "ca_file": server.config.ca_dir / "bundle.pem",
        "name": "migrant-01",
        "backoff_initial": 0.05,
        "backoff_max": 0.5,
        "drain_timeout": 5.0,
    }
    async with running(Agent(AgentConfig(**values), registry=registry)):
        pass
    plain = (state / "agent.key").read_bytes()
    assert plain.startswith(PLAIN)  # without the flag, nothing changed
    plain_key = serialization.load_pem_private_key(plain, password=None)
    assert isinstance(plain_key, ec.EllipticCurvePrivateKey)

    secret = secrets.token_urlsafe(24)
    sealed_config = AgentConfig(**{**values, "key_passphrase": secret.encode()})
    caplog.set_level(logging.INFO, logger="muster.agent.state")
    async with running(Agent(sealed_config, registry=registry)):
        sealed_key = encrypted_key(state / "agent.key", secret)
        assert keys.public_key_der(sealed_key.public_key()) == keys.public_key_der(
            plain_key.public_key()
        )
        done = await client.wait((await client.submit("echo", b"moved")).task_id, timeout=30)
        assert (done.state, done.agent_id) == (TaskState.SUCCEEDED, "migrant-01")
    assert f"encrypted {state / 'agent.key'} with the key passphrase" in caplog.text
    assert secret not in caplog.text
    sealed = (state / "agent.key").read_bytes()

    with pytest.raises(ConfigError, match=r"agent\.key is encrypted: pass --key-passphrase-file"):
        await Agent(AgentConfig(**values), registry=registry).run()
    wrong = AgentConfig(**{**values, "key_passphrase": b"not the passphrase"})
    with pytest.raises(ConfigError, match=r"does not decrypt .*\(wrong passphrase") as refused:
        await Agent(wrong, registry=registry).run()
    assert "not the passphrase" not in str(refused.value)
    assert (state / "agent.key").read_bytes() == sealed


def test_reenrollment_keys_are_encrypted_too_and_only_memory_holds_the_plain_key(
    tmp_path: Path,
) -> None:
    ca = TestCA.new("example.org")
    seeded = seed_state(tmp_path / "state", ca, "127.0.0.1:7444")
    secret = secrets.token_urlsafe(24)
    state = StateDir(seeded.path, key_passphrase=secret.encode())

    # An interrupted re-enrollment from before the passphrase left a plain key: reused
    # (same public key, so a retry gets the same certificate), and encrypted on the way.
    left = keys.generate_key()
    write_atomic(state.reenroll_key_path, keys.key_to_pem(left))
    key = state.reenrollment_key()
    assert keys.public_key_der(key.public_key()) == keys.public_key_der(left.public_key())
    sealed = encrypted_key(state.reenroll_key_path, secret)
    assert keys.public_key_der(sealed.public_key()) == keys.public_key_der(left.public_key())

    issued = ca.ca.issue_agent_certificate(key.public_key(), AGENT_ID)
    identity = state.load_identity()
    credentials = state.save_reenrollment(issued.chain_pem, ca.bundle_pem, identity)
    assert not state.reenroll_key_path.exists()
    assert not list(state.path.glob("*.next"))
    assert keys.cert_matches_key(issued.chain_pem, encrypted_key(state.key_path, secret))
    # gRPC's channel credentials get the plain PEM, from memory only.
    assert credentials.key_pem.startswith(PLAIN)
    assert state.load_credentials() == credentials
    on_disk = b"".join(p.read_bytes() for p in state.path.iterdir() if p.is_file())
    assert on_disk.count(b"PRIVATE KEY-----") == on_disk.count(b"ENCRYPTED PRIVATE KEY-----") == 2


# The passphrase's source: a file (a systemd credential fits), never argv or an env value.


def test_the_passphrase_comes_from_the_flag_or_the_file_the_env_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MUSTER_AGENT_KEY_PASSPHRASE_FILE", raising=False)
    flag = passphrase_file(tmp_path / "flag", "from the flag")
    named = passphrase_file(tmp_path / "credentials", "from the env")
    assert read_key_passphrase(None) is None
    config = config_from_args(
        parse("--state-dir", str(tmp_path), "--key-passphrase-file", str(flag))
    )
    assert config.key_passphrase == b"from the flag"
    assert "from the flag" not in repr(config)
    monkeypatch.setenv("MUSTER_AGENT_KEY_PASSPHRASE_FILE", str(named))
    assert config_from_args(parse("--state-dir", str(tmp_path))).key_passphrase == b"from the env"
    assert read_key_passphrase(flag) == b"from the flag"  # the flag wins


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"pass phrase\n", b"pass phrase"),
        (b"pass phrase\r\n", b"pass phrase"),
        (b"pass phrase", b"pass phrase"),
        (b"pass phrase\n\n", b"pass phrase\n"),  # one newline only: the rest is the secret's
        (b" spaced \n", b" spaced "),
    ],
)
def test_one_trailing_newline_is_not_part_of_the_passphrase(
    tmp_path: Path, content: bytes, expected: bytes
) -> None:
    path = tmp_path / "key-passphrase"
    path.write_bytes(content)
    assert read_key_passphrase(path) == expected


def test_an_empty_unreadable_or_oversized_passphrase_file_is_a_config_error(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    with pytest.raises(ConfigError, match=r"key passphrase file .*empty is empty"):
        read_key_passphrase(empty)
    with pytest.raises(ConfigError, match=r"cannot read the key passphrase file .*missing"):
        read_key_passphrase(tmp_path / "missing")
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * 1024)
    with pytest.raises(ConfigError, match="more than 1023 bytes") as too_long:
        read_key_passphrase(huge)
    assert "xxxx" not in str(too_long.value)
    with pytest.raises(ConfigError, match="key passphrase is empty"):
        AgentConfig(key_passphrase=b"")
