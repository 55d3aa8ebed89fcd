"""ClientConfig: precedence of overrides, environment, .env and the dev defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from muster.config import DEFAULT_ADDRESS, ClientConfig
from muster.errors import ConfigError

SECRET = "mst_super_secret_value_42"
PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _dev_dir(root: Path, token: str = SECRET) -> Path:
    """What ``muster dev`` leaves behind: ``<root>/admin.token`` and ``<root>/ca/bundle.pem``."""
    (root / "ca").mkdir(parents=True)
    (root / "admin.token").write_text(token + "\n")
    (root / "ca" / "bundle.pem").write_bytes(PEM)
    return root


def test_dev_defaults_from_dot_muster(tmp_path: Path) -> None:
    _dev_dir(tmp_path / ".muster")
    config = ClientConfig.from_env(environ={}, cwd=tmp_path)
    assert config.address == DEFAULT_ADDRESS
    assert config.token == SECRET
    assert config.ca_file == tmp_path / ".muster" / "ca" / "bundle.pem"
    assert config.timeout == 30.0


def test_process_env_and_cwd_are_the_defaults(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dev_dir(isolated_env / ".muster")
    monkeypatch.setenv("MUSTER_ADDR", "ctl.example:9443")
    config = ClientConfig.from_env()
    assert config.address == "ctl.example:9443"
    assert config.token == SECRET
    assert config.ca_file == isolated_env / ".muster" / "ca" / "bundle.pem"


def test_data_dir_moves_the_defaults(tmp_path: Path) -> None:
    _dev_dir(tmp_path / "state", token="mst_from_data_dir")
    _dev_dir(tmp_path / ".muster", token="mst_ignored")
    config = ClientConfig.from_env(environ={"MUSTER_DATA_DIR": "state"}, cwd=tmp_path)
    assert config.token == "mst_from_data_dir"
    assert config.ca_file == tmp_path / "state" / "ca" / "bundle.pem"


def test_without_a_ca_bundle_the_system_roots_are_used(tmp_path: Path) -> None:
    config = ClientConfig.from_env(environ={"MUSTER_TOKEN": SECRET}, cwd=tmp_path)
    assert config.ca_file is None
    assert config.read_ca_bundle() is None


def test_env_variables(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text(f"  {SECRET}\n")
    (tmp_path / "ca.pem").write_bytes(PEM)
    env = {
        "MUSTER_ADDR": "[::1]:8443",
        "MUSTER_TOKEN_FILE": "tok",
        "MUSTER_CA_FILE": str(tmp_path / "ca.pem"),
        "MUSTER_TIMEOUT": "2.5",
        "MUSTER_SERVER_NAME": "muster.internal",
    }
    config = ClientConfig.from_env(environ=env, cwd=tmp_path)
    assert config.address == "[::1]:8443"
    assert config.token == SECRET
    assert config.ca_file == tmp_path / "ca.pem"
    assert config.read_ca_bundle() == PEM
    assert config.timeout == 2.5
    assert config.server_name == "muster.internal"


def test_dotenv_is_read_but_never_overrides_the_environment(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"MUSTER_ADDR=from-dotenv:1111\nMUSTER_TOKEN={SECRET}\nMUSTER_TIMEOUT=7\n"
    )
    config = ClientConfig.from_env(environ={"MUSTER_ADDR": "from-env:2222"}, cwd=tmp_path)
    assert config.address == "from-env:2222"
    assert config.token == SECRET
    assert config.timeout == 7.0


def test_overrides_beat_the_environment(tmp_path: Path) -> None:
    (tmp_path / "flag-token").write_text("mst_from_flag")
    env = {"MUSTER_ADDR": "env:1", "MUSTER_TOKEN": "mst_from_env"}
    config = ClientConfig.from_env(
        address="flag:2", token_file="flag-token", timeout=1.0, environ=env, cwd=tmp_path
    )
    assert (config.address, config.token, config.timeout) == ("flag:2", "mst_from_flag", 1.0)


def test_missing_token_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        ClientConfig.from_env(environ={}, cwd=tmp_path)
    message = str(info.value)
    assert "MUSTER_TOKEN" in message
    assert "MUSTER_TOKEN_FILE" in message
    assert "--token-file" in message


def test_both_token_variables_is_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text(SECRET)
    env = {"MUSTER_TOKEN": SECRET, "MUSTER_TOKEN_FILE": "tok"}
    with pytest.raises(ConfigError, match="set only one"):
        ClientConfig.from_env(environ=env, cwd=tmp_path)


def test_unreadable_token_file_names_the_file_and_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        ClientConfig.from_env(environ={"MUSTER_TOKEN_FILE": "nope"}, cwd=tmp_path)
    assert "nope" in str(info.value)
    assert "MUSTER_TOKEN_FILE" in str(info.value)


@pytest.mark.parametrize(
    "address",
    ["localhost", "https://host:7443", "host:0", "host:99999", "host:port", ":7443", "::1:80"],
)
def test_invalid_address_names_muster_addr(tmp_path: Path, address: str) -> None:
    with pytest.raises(ConfigError, match="MUSTER_ADDR"):
        ClientConfig.from_env(
            environ={"MUSTER_ADDR": address, "MUSTER_TOKEN": SECRET}, cwd=tmp_path
        )


def test_missing_ca_file_names_muster_ca_file(tmp_path: Path) -> None:
    env = {"MUSTER_TOKEN": SECRET, "MUSTER_CA_FILE": "missing.pem"}
    with pytest.raises(ConfigError, match="MUSTER_CA_FILE"):
        ClientConfig.from_env(environ=env, cwd=tmp_path)


def test_ca_file_without_a_certificate_is_rejected_when_read(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    config = ClientConfig(address=DEFAULT_ADDRESS, token=SECRET, ca_file=tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match="no PEM certificate"):
        config.read_ca_bundle()


@pytest.mark.parametrize("timeout", ["soon", "0", "-1", "nan"])
def test_bad_timeout_names_muster_timeout(tmp_path: Path, timeout: str) -> None:
    with pytest.raises(ConfigError, match="MUSTER_TIMEOUT"):
        ClientConfig.from_env(
            environ={"MUSTER_TOKEN": SECRET, "MUSTER_TIMEOUT": timeout}, cwd=tmp_path
        )


def test_repr_and_str_redact_the_token() -> None:
    config = ClientConfig(address=DEFAULT_ADDRESS, token=SECRET)
    for text in (repr(config), str(config), f"{config}"):
        assert SECRET not in text
        assert "token='***'" in text


@pytest.mark.parametrize("bad", ["mst secret with spaces", "mst\nnewline", "", "mst_é"])
def test_invalid_token_is_rejected_without_echoing_it(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        ClientConfig(address=DEFAULT_ADDRESS, token=bad)
    assert "MUSTER_TOKEN" in str(info.value)
    if bad:
        assert bad not in str(info.value)
