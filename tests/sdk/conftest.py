"""Fixtures: one TLS test server for the SDK suite, a fresh scripted state per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from muster.config import ClientConfig
from tests.testca import TestCA

from .fakes import TOKEN, ServerThread, State


@pytest.fixture(scope="session")
def test_ca() -> TestCA:
    return TestCA.new("sdk.test")


@pytest.fixture(scope="session")
def ca_file(test_ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls") / "bundle.pem"
    path.write_bytes(test_ca.bundle_pem)
    return path


@pytest.fixture(scope="session")
def server_thread(test_ca: TestCA) -> Iterator[ServerThread]:
    chain_pem, key_pem = test_ca.server_credentials(hostnames=["localhost"], ips=["127.0.0.1"])
    server = ServerThread(chain_pem, key_pem)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake(server_thread: ServerThread) -> State:
    """The doubles' state, emptied for this test."""
    return server_thread.reset()


@pytest.fixture
def address(server_thread: ServerThread) -> str:
    return f"127.0.0.1:{server_thread.port}"


@pytest.fixture
def config(address: str, ca_file: Path, fake: State) -> ClientConfig:
    return ClientConfig(address=address, token=TOKEN, ca_file=ca_file, timeout=5.0)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MUSTER_* from the developer's shell and no .env/.muster from the checkout."""
    import os

    for name in list(os.environ):
        if name.startswith("MUSTER_"):
            monkeypatch.delenv(name)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir
