"""Client configuration: where the api listener is, how to trust it, and which token to send.

Built from ``MUSTER_*`` environment variables (and a ``.env`` file in the working
directory) so the README's dev flow (``muster dev`` then ``muster submit``) needs no
setup: the dev server writes ``.muster/admin.token`` and ``.muster/ca/bundle.pem``.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from muster.errors import ConfigError

DEFAULT_ADDRESS = "127.0.0.1:7443"
DEFAULT_TIMEOUT = 30.0
DEFAULT_DATA_DIR = ".muster"
TOKEN_FILE_NAME = "admin.token"  # noqa: S105 (a file name, not a secret)
CA_BUNDLE_NAME = "ca/bundle.pem"

ENV_ADDR = "MUSTER_ADDR"
ENV_TOKEN = "MUSTER_TOKEN"  # noqa: S105 (variable names, not secrets)
ENV_TOKEN_FILE = "MUSTER_TOKEN_FILE"  # noqa: S105
ENV_CA_FILE = "MUSTER_CA_FILE"
ENV_DATA_DIR = "MUSTER_DATA_DIR"
ENV_TIMEOUT = "MUSTER_TIMEOUT"
ENV_SERVER_NAME = "MUSTER_SERVER_NAME"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Validated settings for a client; construct directly or with :meth:`from_env`."""

    address: str
    """``host:port`` (or ``[v6]:port``) of the server's api listener."""

    token: str
    """The API token secret, sent as ``authorization: Bearer <token>``; never printed."""

    ca_file: Path | None = None
    """PEM bundle that anchors trust in the server certificate; None uses the system roots."""

    timeout: float = DEFAULT_TIMEOUT
    """Seconds each unary call may take; streams (watch) are not bounded by it."""

    server_name: str | None = None
    """TLS name to verify instead of the address's host (when connecting through a tunnel)."""

    def __post_init__(self) -> None:
        _check_address(self.address)
        _check_token(self.token)
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ConfigError(
                f"CA file {str(self.ca_file)!r} does not exist or is not a file: "
                f"set {ENV_CA_FILE} (or --ca-file) to the server's CA bundle"
            )
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(f"timeout must be a positive number of seconds (set {ENV_TIMEOUT})")
        if self.server_name is not None and not self.server_name:
            raise ConfigError(f"server name must not be empty (unset {ENV_SERVER_NAME})")

    def __repr__(self) -> str:
        return (
            f"ClientConfig(address={self.address!r}, token='***', ca_file={self.ca_file!r}, "
            f"timeout={self.timeout!r}, server_name={self.server_name!r})"
        )

    __str__ = __repr__

    def read_ca_bundle(self) -> bytes | None:
        """The CA bundle's bytes, or None for the system roots; ConfigError if unreadable."""
        if self.ca_file is None:
            return None
        try:
            data = self.ca_file.read_bytes()
        except OSError as err:
            raise ConfigError(
                f"cannot read CA file {str(self.ca_file)!r}: {err.strerror} "
                f"(set {ENV_CA_FILE} or --ca-file)"
            ) from err
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise ConfigError(
                f"CA file {str(self.ca_file)!r} holds no PEM certificate "
                f"(set {ENV_CA_FILE} or --ca-file)"
            )
        return data

    @classmethod
    def from_env(
        cls,
        *,
        address: str | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        timeout: float | None = None,
        server_name: str | None = None,
        environ: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> ClientConfig:
        """Build from explicit overrides, then the environment, then ``.env``, then defaults.

        ``environ`` and ``cwd`` default to the process's; tests pass their own.
        Real environment variables win over ``.env`` entries.
        """
        base = Path.cwd() if cwd is None else Path(cwd)
        env = _merged_env(base, os.environ if environ is None else environ)
        data_dir = _resolve(base, env.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR)

        resolved_address = address or env.get(ENV_ADDR) or DEFAULT_ADDRESS
        resolved_token = _resolve_token(base, env, data_dir, token, token_file)
        resolved_ca = _resolve_ca(base, env, data_dir, ca_file)
        resolved_timeout = timeout if timeout is not None else _parse_timeout(env.get(ENV_TIMEOUT))
        return cls(
            address=resolved_address,
            token=resolved_token,
            ca_file=resolved_ca,
            timeout=resolved_timeout,
            server_name=server_name or env.get(ENV_SERVER_NAME) or None,
        )


def _merged_env(base: Path, environ: Mapping[str, str]) -> dict[str, str]:
    """``.env`` entries under the real environment: a file never overrides what is set."""
    merged: dict[str, str] = {}
    dotenv = base / ".env"
    if dotenv.is_file():
        merged.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
    merged.update(environ)
    return merged


def _resolve(base: Path, value: str | os.PathLike[str]) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _resolve_token(
    base: Path,
    env: Mapping[str, str],
    data_dir: Path,
    token: str | None,
    token_file: str | os.PathLike[str] | None,
) -> str:
    if token is not None:
        return token.strip()
    if token_file is not None:
        return _read_token_file(_resolve(base, token_file), "--token-file")
    env_token = env.get(ENV_TOKEN, "")
    env_file = env.get(ENV_TOKEN_FILE, "")
    if env_token and env_file:
        raise ConfigError(f"both {ENV_TOKEN} and {ENV_TOKEN_FILE} are set: set only one")
    if env_token:
        return env_token.strip()
    if env_file:
        return _read_token_file(_resolve(base, env_file), ENV_TOKEN_FILE)
    default = data_dir / TOKEN_FILE_NAME
    if default.is_file():
        return _read_token_file(default, ENV_TOKEN_FILE)
    raise ConfigError(
        f"no API token: set {ENV_TOKEN} or {ENV_TOKEN_FILE} (or pass --token-file); "
        f"{str(default)!r} does not exist"
    )


def _read_token_file(path: Path, setting: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(
            f"cannot read token file {str(path)!r}: {reason} (check {setting})"
        ) from err


def _resolve_ca(
    base: Path,
    env: Mapping[str, str],
    data_dir: Path,
    ca_file: str | os.PathLike[str] | None,
) -> Path | None:
    if ca_file is not None:
        return _resolve(base, ca_file)
    if env.get(ENV_CA_FILE):
        return _resolve(base, env[ENV_CA_FILE])
    default = data_dir / CA_BUNDLE_NAME
    return default if default.is_file() else None


def _parse_timeout(raw: str | None) -> float:
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT
    try:
        return float(raw)
    except ValueError as err:
        raise ConfigError(f"{ENV_TIMEOUT} must be a number of seconds, got {raw[:40]!r}") from err


def _check_address(address: str) -> None:
    hint = f"set {ENV_ADDR} (or --addr) to host:port, e.g. {DEFAULT_ADDRESS}"
    if "://" in address:
        raise ConfigError(f"address {address[:100]!r} must not have a scheme: {hint}")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"invalid address {address[:100]!r}: {hint}")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]"))
        except ValueError as err:
            raise ConfigError(f"invalid IPv6 address in {address[:100]!r}: {hint}") from err
    elif ":" in host or any(c.isspace() for c in host):
        raise ConfigError(f"invalid host in {address[:100]!r} (bracket IPv6 hosts): {hint}")


def _check_token(token: str) -> None:
    # Never echo the token: the message names the setting, not the value.
    hint = f"set {ENV_TOKEN} or {ENV_TOKEN_FILE} (or pass --token-file)"
    if not token:
        raise ConfigError(f"the API token is empty: {hint}")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ConfigError(f"the API token has characters not allowed in a header: {hint}")
