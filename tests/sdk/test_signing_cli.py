"""``muster key generate``, ``muster key public``, ``muster submit --sign-key`` and the
signer shown by ``muster task get``, through ``main([...])`` against the SDK's fake
server (which records requests; the real server's checks are in tests/server)."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from muster.cli import main
from muster.signing import TaskSigner, TrustedSubmitters, check_submitted, task_id_for
from muster.v1 import common_pb2

from .fakes import State, seed


@pytest.fixture
def conn(address: str, token_file: Path, ca_file: Path, fake: State) -> list[str]:
    return ["--addr", address, "--token-file", str(token_file), "--ca-file", str(ca_file)]


def key_id_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("key id:")).split()[-1]


def test_key_generate_writes_a_private_and_a_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private = tmp_path / "submitter.key"
    assert main(["key", "generate", "--out", str(private)]) == 0
    out = capsys.readouterr().out
    kid = key_id_line(out)
    public = tmp_path / "submitter.key.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert TaskSigner.load(private).key_id == kid
    assert set(TrustedSubmitters.load(public)) == {kid}
    assert f"--trusted-submitters {public}" in out and f"--sign-key {private}" in out

    # Never over an existing key.
    before = private.read_bytes()
    assert main(["key", "generate", "--out", str(private)]) == 1
    assert "exists already" in capsys.readouterr().err
    assert private.read_bytes() == before


def test_key_generate_and_public_print_a_jwks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["key", "generate", "--out", str(tmp_path / "a"), "--jwks"]) == 0
    captured = capsys.readouterr()
    first = key_id_line(captured.err)
    assert [k["kid"] for k in json.loads(captured.out)["keys"]] == [first]
    assert main(["key", "generate", "--out", str(tmp_path / "b")]) == 0
    second = key_id_line(capsys.readouterr().out)

    # Private keys, public PEM and a JWK Set all give their public keys, once each.
    files = [str(tmp_path / name) for name in ("a", "b.pub", "a.pub")]
    assert main(["key", "public", *files, "--jwks"]) == 0
    trust = tmp_path / "trusted.json"
    trust.write_text(capsys.readouterr().out)
    assert list(TrustedSubmitters.load(trust)) == [first, second]
    assert main(["key", "public", str(trust)]) == 0
    pem = tmp_path / "trusted.pem"
    pem.write_text(capsys.readouterr().out)
    assert list(TrustedSubmitters.load(pem)) == [first, second]

    (tmp_path / "junk").write_text("not a key")
    assert main(["key", "public", str(tmp_path / "junk")]) == 1
    assert "holds no PEM public key" in capsys.readouterr().err


def test_submit_sign_key_signs_what_it_sends(
    conn: list[str], fake: State, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k"
    assert main(["key", "generate", "--out", str(key)]) == 0
    kid = key_id_line(capsys.readouterr().out)
    args = ["submit", "echo", "--payload", '{"x": 1}', "--pool", "gpu", "--selector", "a=b"]
    assert main([*args, "--sign-key", str(key), "--sign-valid-for", "2h", *conn]) == 0
    sent = fake.requests[-1]
    assert sent.signature.key_id == kid
    now = datetime.now(UTC)
    assert check_submitted(sent, now) == task_id_for(sent.signature.statement)
    not_after = common_pb2.TaskStatement.FromString(sent.signature.statement).not_after
    assert (
        timedelta(hours=1, minutes=59)
        < not_after.ToDatetime(tzinfo=UTC) - now
        <= timedelta(hours=2)
    )

    assert main([*args, *conn]) == 0
    assert not fake.requests[-1].HasField("signature")
    assert main([*args, "--sign-valid-for", "2h", *conn]) == 1
    assert "--sign-valid-for needs --sign-key" in capsys.readouterr().err
    assert main([*args, "--sign-key", str(key), "--sign-valid-for", "31d", *conn]) == 1
    assert "at most 30 days" in capsys.readouterr().err
    assert main([*args, "--sign-key", str(tmp_path / "absent"), *conn]) == 1
    assert "cannot read signing key" in capsys.readouterr().err


def test_task_get_shows_the_signer(
    conn: list[str], fake: State, capsys: pytest.CaptureFixture[str]
) -> None:
    signed_id, unsigned_id = seed(fake, 2)
    fake.tasks[signed_id].signature.key_id = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert main(["task", "get", signed_id, *conn]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(None, 1)[1] for line in lines if line.startswith("signature:")] == [
        "signed by kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    ]
    assert main(["task", "get", unsigned_id, *conn]) == 0
    assert "signature:" not in capsys.readouterr().out
    assert main(["task", "get", signed_id, "--json", *conn]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["signed_by"] == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
