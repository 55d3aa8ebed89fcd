"""``muster agent`` flags, config validation and the token sources."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from muster.agent.cli import config_from_args, register
from muster.agent.config import AgentConfig, parse_labels, read_token
from muster.errors import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="muster")
    register(parser.add_subparsers())
    return parser.parse_args(["agent", *argv])


def test_every_flag_has_help() -> None:
    parser = argparse.ArgumentParser(prog="muster")
    sub = parser.add_subparsers()
    register(sub)
    agent_parser = sub.choices["agent"]
    for action in agent_parser._actions:
        assert action.help, action.option_strings


def test_flags_become_a_validated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MUSTER_BOOTSTRAP_TOKEN", raising=False)
    args = parse(
        "--server", "h:1", "--token", "tok", "--label", "a=1", "--label", "b=x=y",
        "--executors", "echo, sleep", "--concurrency", "8", "--state-dir", str(tmp_path),
    )  # fmt: skip
    config = config_from_args(args)
    assert config.labels == {"a": "1", "b": "x=y"}
    assert config.executors == ("echo", "sleep")
    assert config.concurrency == 8
    assert config.token == "tok"
    assert "tok" not in repr(config)
    assert callable(args.func)


def test_state_dir_defaults_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUSTER_AGENT_STATE_DIR", str(tmp_path / "s"))
    assert config_from_args(parse()).state_dir == tmp_path / "s"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "0"], "--concurrency"),
        (["--label", "novalue"], "key=value"),
        (["--label", "a=1", "--label", "a=2"], "twice"),
        (["--name", "Bad Name"], "agent id"),
        (["--executors", ","], "--executors"),
        (["--drain-timeout", "-1"], "--drain-timeout"),
        (["--server", ""], "--server"),
    ],
)
def test_bad_flags_are_one_clear_config_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_args(parse(*argv))


def test_token_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSTER_BOOTSTRAP_TOKEN", "from-env")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert read_token(None, token_file) == "from-file"
    assert read_token("from-flag", None) == "from-flag"
    assert read_token(None, None) == "from-env"
    with pytest.raises(ConfigError, match="not both"):
        read_token("a", token_file)
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(None, tmp_path / "missing")


def test_ca_file_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MUSTER_CA_FILE", raising=False)
    with pytest.raises(ConfigError, match="--ca-file"):
        AgentConfig().resolved_ca_file()
    default = tmp_path / ".muster" / "ca" / "bundle.pem"
    default.parent.mkdir(parents=True)
    default.write_text("x")
    assert AgentConfig().resolved_ca_file().resolve() == default
    monkeypatch.setenv("MUSTER_CA_FILE", str(tmp_path / "env.pem"))
    with pytest.raises(ConfigError, match="does not exist"):
        AgentConfig().resolved_ca_file()


def test_parse_labels() -> None:
    assert parse_labels([]) == {}
    assert parse_labels(["k=", " z =1"]) == {"k": "", "z": "1"}


def test_ai_executor_flags_and_their_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "MUSTER_ANTHROPIC_BASE_URL",
        "MUSTER_ANTHROPIC_KEY_FILE",
        "MUSTER_CLAUDE_BIN",
        "MUSTER_OLLAMA_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    defaults = config_from_args(parse())
    assert (defaults.anthropic_base_url, defaults.anthropic_key_file) == (None, None)
    assert (defaults.claude_bin, defaults.ollama_url) == ("claude", None)
    args = parse(
        "--anthropic-base-url", "http://127.0.0.1:8080",
        "--anthropic-key-file", str(tmp_path / "key"),
        "--claude-bin", "/opt/claude/bin/claude",
        "--ollama-url", "http://gpu-1:11434",
    )  # fmt: skip
    flags = config_from_args(args)
    settings = flags.executor_settings()
    assert settings.anthropic_base_url == "http://127.0.0.1:8080"
    assert settings.anthropic_key_file == tmp_path / "key"
    assert settings.claude_bin == "/opt/claude/bin/claude"
    assert settings.ollama_endpoint() == "http://gpu-1:11434"
    monkeypatch.setenv("MUSTER_ANTHROPIC_BASE_URL", "https://proxy.internal")
    monkeypatch.setenv("MUSTER_ANTHROPIC_KEY_FILE", str(tmp_path / "env-key"))
    monkeypatch.setenv("MUSTER_CLAUDE_BIN", "claude-beta")
    monkeypatch.setenv("MUSTER_OLLAMA_URL", "http://ollama:11434")
    env = config_from_args(parse())
    assert env.anthropic_base_url == "https://proxy.internal"
    assert env.anthropic_key_file == tmp_path / "env-key"
    assert (env.claude_bin, env.ollama_url) == ("claude-beta", "http://ollama:11434")
    assert config_from_args(parse("--claude-bin", "mine")).claude_bin == "mine"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--anthropic-base-url", "api.anthropic.com"], "--anthropic-base-url"),
        (["--ollama-url", "ftp://x"], "--ollama-url"),
        (["--claude-bin", " "], "--claude-bin"),
    ],
)
def test_bad_ai_flags(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_args(parse(*argv))
