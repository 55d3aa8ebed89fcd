"""The systemd units in deploy/systemd: `systemd-analyze verify` accepts them (with the
install path pointed at this checkout's `muster`), they are hardened, secrets reach the
daemons only as credentials, and the stop timeout covers each daemon's drain."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from muster.server.config import ServerConfig

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
INSTALLED = "/opt/muster/bin/muster"
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "RestrictSUIDSGID": "yes",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
}
AGENT_DRAIN = 30.0


def service(name: str) -> dict[str, list[str]]:
    """The [Service] section, every value of a repeated key kept in order."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / name).read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#") and section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("name", ["muster-server.service", "muster-agent.service"])
def test_systemd_analyze_verify_accepts_the_unit(name: str, tmp_path: Path) -> None:
    muster = Path(sys.executable).with_name("muster")
    assert muster.exists(), muster
    text = (UNITS / name).read_text()
    assert INSTALLED in text
    unit = tmp_path / name
    unit.write_text(text.replace(INSTALLED, str(muster)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


@pytest.mark.parametrize("name", ["muster-server.service", "muster-agent.service"])
def test_units_are_hardened_and_restart(name: str) -> None:
    unit = service(name)
    for key, value in HARDENING.items():
        assert unit.get(key) == [value], key
    assert unit["StateDirectory"]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["Restart"][0] in {"on-failure", "always"}


def test_agent_secrets_are_credentials_never_arguments_or_environment() -> None:
    unit = service("muster-agent.service")
    credentials = dict(c.split(":", 1) for c in unit["LoadCredential"])
    assert set(credentials) == {"bootstrap-token", "key-passphrase"}
    command = unit["ExecStart"][0]
    assert "--token-file %d/bootstrap-token" in command
    assert "--key-passphrase-file %d/key-passphrase" in command
    assert "--token " not in command
    assert not any("TOKEN" in e or "PASSPHRASE" in e for e in unit.get("Environment", []))


def test_server_fanout_secret_is_a_credential() -> None:
    unit = service("muster-server.service")
    assert unit["LoadCredential"] == ["fanout-secret:/etc/muster/fanout-secret"]
    assert "MUSTER_FANOUT_SECRET_FILE=%d/fanout-secret" in unit["Environment"]


def stop_timeout(name: str) -> float:
    return float(service(name)["TimeoutStopSec"][0])


def test_stop_timeouts_cover_the_drains() -> None:
    grace = ServerConfig().shutdown_grace
    assert timedelta(seconds=stop_timeout("muster-server.service")) > grace * 2
    command = service("muster-agent.service")["ExecStart"][0]
    assert f"--drain-timeout {AGENT_DRAIN:g}" in command
    assert stop_timeout("muster-agent.service") > AGENT_DRAIN + 10
