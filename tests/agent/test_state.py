"""The state dir: private key handling, enrollment commit, renewal swap and crash recovery."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from muster.agent import keys
from muster.agent.state import Identity, StateDir
from muster.errors import ConfigError
from muster.files import write_atomic
from tests.agent.conftest import AGENT_ID, seed_state
from tests.testca import TestCA


def test_enrollment_key_is_private_and_reused_until_enrollment_completes(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    assert state.path.stat().st_mode & 0o777 == 0o700
    first = state.enrollment_key()
    assert state.key_path.stat().st_mode & 0o777 == 0o600
    assert isinstance(first.curve, ec.SECP256R1)
    again = state.enrollment_key()  # e.g. the Enroll response was lost
    assert keys.public_key_der(again.public_key()) == keys.public_key_der(first.public_key())
    state.discard_key()
    fresh = state.enrollment_key()
    assert keys.public_key_der(fresh.public_key()) != keys.public_key_der(first.public_key())


def test_a_loose_existing_dir_is_tightened(tmp_path: Path) -> None:
    loose = tmp_path / "state"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    StateDir(loose).ensure()
    assert loose.stat().st_mode & 0o777 == 0o700


def test_enrolled_state_loads_back(tmp_path: Path) -> None:
    ca = TestCA.new("example.org")
    state = seed_state(tmp_path / "state", ca, "127.0.0.1:7444")
    assert state.is_enrolled()
    identity = state.load_identity()
    assert identity.agent_id == AGENT_ID
    assert identity.spiffe_id == f"spiffe://example.org/agent/{AGENT_ID}"
    assert identity.agent_endpoint == "127.0.0.1:7444"
    creds = state.load_credentials()
    assert creds.bundle_pem == ca.bundle_pem
    assert creds.leaf.uri_sans == (identity.spiffe_id,)
    assert "PRIVATE" not in repr(creds)


def test_a_certificate_for_another_key_is_refused(tmp_path: Path) -> None:
    ca = TestCA.new("example.org")
    state = seed_state(tmp_path / "state", ca, "127.0.0.1:7444")
    write_atomic(state.key_path, keys.key_to_pem(keys.generate_key()))
    with pytest.raises(ConfigError, match="not issued for"):
        state.load_credentials()


def test_missing_identity_says_to_enroll(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    state.ensure()
    with pytest.raises(ConfigError, match="enroll"):
        state.load_identity()


def test_renewal_swaps_key_and_certificate_together(tmp_path: Path) -> None:
    ca = TestCA.new("example.org")
    state = seed_state(tmp_path / "state", ca, "127.0.0.1:7444")
    new_key = keys.generate_key()
    issued = ca.ca.issue_agent_certificate(
        new_key.public_key(), AGENT_ID, lifetime=dt.timedelta(hours=2)
    )
    creds = state.save_renewal(new_key, issued.chain_pem, ca.bundle_pem)
    assert creds == state.load_credentials()
    assert keys.cert_matches_key(state.chain_path.read_bytes(), new_key)
    assert state.key_path.stat().st_mode & 0o777 == 0o600
    assert state.load_identity().not_after == issued.not_after.isoformat()
    assert not list(state.path.glob("*.next"))


def test_renewal_for_the_wrong_key_changes_nothing(tmp_path: Path) -> None:
    ca = TestCA.new("example.org")
    state = seed_state(tmp_path / "state", ca, "127.0.0.1:7444")
    before = state.load_credentials()
    other = ca.mint_agent(AGENT_ID)
    with pytest.raises(ConfigError):
        state.save_renewal(keys.generate_key(), other.chain_pem, ca.bundle_pem)
    assert state.load_credentials() == before


def _stage(state: StateDir, ca: TestCA) -> ec.EllipticCurvePrivateKey:
    new_key = keys.generate_key()
    issued = ca.ca.issue_agent_certificate(new_key.public_key(), AGENT_ID)
    write_atomic(state.key_path.with_name("agent.key.next"), keys.key_to_pem(new_key))
    write_atomic(state.bundle_path.with_name("bundle.pem.next"), ca.bundle_pem)
    write_atomic(state.chain_path.with_name("agent.pem.next"), issued.chain_pem)
    return new_key


def test_a_complete_but_uncommitted_renewal_is_rolled_forward(tmp_path: Path) -> None:
    ca = TestCA.new("example.org")
    state = seed_state(tmp_path / "state", ca, "127.0.0.1:7444")
    new_key = _stage(state, ca)
    # Crash after the key was renamed but before the certificate was.
    state.key_path.with_name("agent.key.next").replace(state.key_path)
    StateDir(state.path).ensure()
    creds = state.load_credentials()
    assert keys.cert_matches_key(creds.chain_pem, new_key)


def test_a_partial_renewal_is_dropped(tmp_path: Path) -> None:
    ca = TestCA.new("example.org")
    state = seed_state(tmp_path / "state", ca, "127.0.0.1:7444")
    before = state.load_credentials()
    _stage(state, ca)
    state.chain_path.with_name("agent.pem.next").unlink()  # crashed before the last file
    StateDir(state.path).ensure()
    assert state.load_credentials() == before
    assert not list(state.path.glob("*.next"))


def test_identity_json_round_trips() -> None:
    identity = Identity("a", "spiffe://td/agent/a", "h:1", "p", {"k": "v"}, "2030-01-01T00:00:00")
    assert Identity.from_json(identity.to_json()) == identity
