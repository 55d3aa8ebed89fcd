"""Signed tasks, the shared code (muster/signing.py): keys and key ids, the envelope, the
server's Submit checks, the agent's verification, trust files; and vectors that pin the
context string and the task-id derivation, so an implementation in another language can
check itself against them."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from muster import signing
from muster.errors import ConfigError
from muster.signing import (
    EXPIRED,
    INVALID,
    MISMATCH,
    MISSING,
    UNTRUSTED,
    EnvelopeError,
    TaskSigner,
    TrustedSubmitters,
    check_submitted,
    verify_assignment,
)
from muster.v1 import agent_pb2, common_pb2, task_pb2

NOW = datetime(2029, 6, 1, 12, 0, tzinfo=UTC)

# RFC 8037, appendix A.1 and A.3: an Ed25519 key and its RFC 7638 thumbprint.
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_KID = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"

# A statement (any valid encoding), signed with the RFC 8037 key, and the id it binds.
# Statement: kind "echo", payload b'{"msg":"hi"}', pool "default", selector gpu=yes,
# max_cost_micros 500000, output_schema '{"type":"object"}', not_after
# 2030-01-01T00:00:00Z, nonce 00 01 ... 0f.
VECTOR_STATEMENT = bytes.fromhex(
    "0a046563686f1220d95808527f6e74a7a4cc2d3dfc056424bea5dce3940f31f158d06ad5098fbdd8"
    "1a0764656661756c74220a0a03677075120379657328a0c21e3a20a2c799262a3ce3c19ef5cdd983"
    "bf3d12b43ab3c426227091b909dcb7054738c042060880b1ef86074a10000102030405060708090a"
    "0b0c0d0e0f"
)
VECTOR_SIGNATURE = bytes.fromhex(
    "f5ee3761d69c03409e77e6779be3c0d28bf67d0ef8a0aff426b4cb01bc9bed90"
    "0d1bc3b3e04d614f3ee6ef640b277943ab93aad7cece4fc66a0093b1d90b3e0e"
)
VECTOR_TASK_ID = "t_01bcabedbfc99b42d52fe690"


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


RFC_KEY = Ed25519PrivateKey.from_private_bytes(unb64(RFC8037_D))
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def request(**fields: object) -> task_pb2.SubmitRequest:
    base: dict[str, object] = {
        "kind": "echo",
        "payload": b'{"msg":"hi"}',
        "pool": "gpu",
        "selector": {"zone": "a"},
        "max_cost_usd": 0.25,
        "output_schema": '{"type":"object"}',
    }
    return task_pb2.SubmitRequest(**(base | fields))  # type: ignore[arg-type]


def signed(req: task_pb2.SubmitRequest, key: Ed25519PrivateKey = KEY, **kw: object) -> None:
    req.signature.CopyFrom(TaskSigner(key).sign(req, now=NOW, **kw))  # type: ignore[arg-type]


def envelope(statement: common_pb2.TaskStatement, key: Ed25519PrivateKey = KEY) -> bytes:
    """A TaskSignature over a statement built by hand (not from a request)."""
    data = statement.SerializeToString()
    raw = signing.raw_public_key(key)
    return common_pb2.TaskSignature(
        statement=data,
        signature=key.sign(signing.CONTEXT + data),
        key_id=signing.key_id(raw),
        public_key=raw,
    ).SerializeToString()


# Vectors


def test_the_context_string_and_key_id_are_pinned() -> None:
    assert signing.CONTEXT == b"muster.v1.TaskStatement\n"
    assert len(signing.CONTEXT) == 24
    assert signing.raw_public_key(RFC_KEY) == unb64(RFC8037_X)
    assert signing.key_id(unb64(RFC8037_X)) == RFC8037_KID
    assert TaskSigner(RFC_KEY).key_id == RFC8037_KID


def test_the_signature_and_task_id_vector() -> None:
    message = signing.CONTEXT + VECTOR_STATEMENT
    assert RFC_KEY.sign(message) == VECTOR_SIGNATURE  # Ed25519 is deterministic
    RFC_KEY.public_key().verify(VECTOR_SIGNATURE, message)
    digest = hashlib.sha256(message).digest()
    assert "t_" + digest[:12].hex() == VECTOR_TASK_ID
    assert signing.task_id_for(VECTOR_STATEMENT) == VECTOR_TASK_ID
    # The vector's statement is what the SDK signs for that request.
    req = task_pb2.SubmitRequest(
        kind="echo",
        payload=b'{"msg":"hi"}',
        selector={"gpu": "yes"},
        max_cost_usd=0.5,
        output_schema='{"type":"object"}',
    )
    env = TaskSigner(RFC_KEY).sign(
        req, not_after=datetime(2030, 1, 1, tzinfo=UTC), nonce=bytes(range(16))
    )
    assert common_pb2.TaskStatement.FromString(
        env.statement
    ) == common_pb2.TaskStatement.FromString(VECTOR_STATEMENT)
    assert env.signature == RFC_KEY.sign(signing.CONTEXT + env.statement)


# Signing and the statement


def test_a_signature_covers_the_request_and_binds_the_task_id() -> None:
    req = request(pool="", kind="claude-code", payload=b'{"allowed_tools":["Read","Grep"]}')
    env = TaskSigner(KEY, valid_for=timedelta(hours=2)).sign(req, now=NOW)
    statement = common_pb2.TaskStatement.FromString(env.statement)
    assert statement.kind == "claude-code"
    assert statement.payload_sha256 == hashlib.sha256(req.payload).digest()
    assert statement.pool == "default"
    assert dict(statement.selector) == {"zone": "a"}
    assert statement.max_cost_micros == 250_000
    assert list(statement.allowed_tools) == ["Read", "Grep"]
    assert statement.output_schema_sha256 == hashlib.sha256(b'{"type":"object"}').digest()
    assert statement.not_after.ToDatetime(tzinfo=UTC) == NOW + timedelta(hours=2)
    assert len(statement.nonce) == 32
    assert env.key_id == signing.key_id(env.public_key)
    req.signature.CopyFrom(env)
    assert check_submitted(req, NOW) == signing.task_id_for(env.statement)


def test_each_signing_is_another_task_and_the_schema_digest_is_empty_without_one() -> None:
    req = request(output_schema="")
    signer = TaskSigner(KEY)
    first, second = signer.sign(req, now=NOW), signer.sign(req, now=NOW)
    assert signing.task_id_for(first.statement) != signing.task_id_for(second.statement)
    assert common_pb2.TaskStatement.FromString(first.statement).output_schema_sha256 == b""
    assert signing.allowed_tools("echo", b'{"allowed_tools":["Bash"]}') == []
    assert signing.allowed_tools("claude-code", b"not json") == []


def test_a_signer_refuses_a_validity_out_of_range_and_a_naive_time() -> None:
    for valid_for in (timedelta(0), timedelta(days=31)):
        with pytest.raises(ConfigError):
            TaskSigner(KEY, valid_for=valid_for)
    with pytest.raises(ConfigError):
        TaskSigner(KEY).sign(request(), not_after=datetime(2030, 1, 1))


# The server's checks at Submit


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "sleep"}, "kind"),
        ({"payload": b'{"msg":"bye"}'}, "payload_sha256"),
        ({"pool": "cpu"}, "pool"),
        ({"selector": {"zone": "b"}}, "selector"),
        ({"selector": {}}, "selector"),
        ({"max_cost_usd": 0.26}, "max_cost_micros"),
        ({"max_cost_usd": 0.0}, "max_cost_micros"),
        ({"output_schema": '{"type":"array"}'}, "output_schema_sha256"),
        ({"output_schema": ""}, "output_schema_sha256"),
    ],
)
def test_submit_refuses_a_request_that_differs_from_its_statement(
    change: dict[str, object], field: str
) -> None:
    req = request()
    signed(req)
    altered = request(**change)
    altered.signature.CopyFrom(req.signature)
    with pytest.raises(EnvelopeError, match=rf"^signature\.statement\.{field}: "):
        check_submitted(altered, NOW)


def test_submit_checks_allowed_tools_against_the_payload() -> None:
    req = request(kind="claude-code", payload=b'{"allowed_tools":["Read"]}', selector={})
    statement = signing.statement_for(req)
    statement.allowed_tools[:] = ["Read", "Bash"]
    statement.not_after.FromDatetime(NOW + timedelta(hours=1))
    statement.nonce = os.urandom(16)
    req.signature.ParseFromString(envelope(statement))
    with pytest.raises(EnvelopeError, match=r"^signature\.statement\.allowed_tools: "):
        check_submitted(req, NOW)


def statement_with(**fields: object) -> common_pb2.TaskStatement:
    statement = signing.statement_for(request())
    statement.not_after.FromDatetime(NOW + timedelta(hours=1))
    statement.nonce = os.urandom(16)
    for name, value in fields.items():
        if name == "not_after":
            if value is None:
                statement.ClearField("not_after")
            else:
                assert isinstance(value, datetime)
                statement.not_after.FromDatetime(value)
        else:
            setattr(statement, name, value)
    return statement


@pytest.mark.parametrize(
    ("statement", "field"),
    [
        (statement_with(not_after=None), "statement.not_after"),
        (statement_with(not_after=NOW), "statement.not_after"),
        (statement_with(not_after=NOW + timedelta(days=30, seconds=1)), "statement.not_after"),
        (statement_with(nonce=b"x" * 15), "statement.nonce"),
        (statement_with(nonce=b"x" * 65), "statement.nonce"),
    ],
)
def test_submit_refuses_bad_times_and_nonces(
    statement: common_pb2.TaskStatement, field: str
) -> None:
    req = request()
    req.signature.ParseFromString(envelope(statement))
    with pytest.raises(EnvelopeError, match=rf"^signature\.{field}: "):
        check_submitted(req, NOW)


def test_submit_accepts_the_edges_of_the_window() -> None:
    for statement in (
        statement_with(not_after=NOW + timedelta(days=30)),
        statement_with(nonce=b"n" * 16),
        statement_with(nonce=b"n" * 64),
    ):
        req = request()
        req.signature.ParseFromString(envelope(statement))
        assert check_submitted(req, NOW).startswith("t_")


def test_submit_refuses_a_malformed_envelope() -> None:
    good = request()
    signed(good)
    raw_other = signing.raw_public_key(OTHER)
    cases: list[tuple[common_pb2.TaskSignature, str]] = []

    def variant(**fields: object) -> common_pb2.TaskSignature:
        env = common_pb2.TaskSignature()
        env.CopyFrom(good.signature)
        for name, value in fields.items():
            setattr(env, name, value)
        return env

    cases = [
        (variant(statement=b"\xff\xff\xff"), r"signature\.statement: not a serialized"),
        (variant(signature=good.signature.signature[:63]), r"signature\.signature: must be 64"),
        (variant(public_key=b"\x01" * 31), r"signature\.public_key: must be the 32-byte"),
        (variant(key_id=signing.key_id(raw_other)), r"signature\.key_id: not the RFC 7638"),
        # Another key's envelope claiming to be this one: the signature does not verify.
        (
            variant(public_key=raw_other, key_id=signing.key_id(raw_other)),
            r"signature\.signature: does not verify",
        ),
        (
            variant(signature=bytes(64)),
            r"signature\.signature: does not verify",
        ),
    ]
    for env, message in cases:
        req = request()
        req.signature.CopyFrom(env)
        with pytest.raises(EnvelopeError, match=rf"^{message}"):
            check_submitted(req, NOW)


# The agent's verification


def assignment_of(
    req: task_pb2.SubmitRequest, *, ceiling: int = 0, **changes: object
) -> agent_pb2.Assignment:
    assignment = agent_pb2.Assignment(
        task_id=signing.task_id_for(req.signature.statement) if req.HasField("signature") else "t",
        attempt=1,
        kind=req.kind,
        payload=req.payload,
        max_cost_micros=ceiling,
        output_schema=req.output_schema,
    )
    if req.HasField("signature"):
        assignment.signature.CopyFrom(req.signature)
    for name, value in changes.items():
        setattr(assignment, name, value)
    return assignment


TRUSTED = TrustedSubmitters([signing.raw_public_key(KEY)])
WHERE = {"pool": "gpu", "labels": {"zone": "a", "disk": "ssd"}}


def verify(assignment: agent_pb2.Assignment, **kw: object) -> signing.Refusal | None:
    args: dict[str, object] = {**WHERE, "now": NOW, **kw}
    return verify_assignment(assignment, TRUSTED, **args)  # type: ignore[arg-type]


def test_a_signed_assignment_as_signed_verifies() -> None:
    req = request()
    signed(req)
    assert verify(assignment_of(req)) is None
    assert verify(assignment_of(req, ceiling=250_000)) is None
    assert verify(assignment_of(req), now=NOW + timedelta(hours=24)) is None


@pytest.mark.parametrize(
    "change",
    [
        {"task_id": "t_000000000000000000000000"},
        {"kind": "sleep"},
        {"payload": b'{"msg":"bye"}'},
        {"payload": b""},
        {"output_schema": '{"type":"array"}'},
        {"output_schema": ""},
        {"max_cost_micros": 250_001},
    ],
)
def test_an_altered_assignment_is_a_mismatch(change: dict[str, object]) -> None:
    req = request()
    signed(req)
    refusal = verify(assignment_of(req, **change))
    assert refusal is not None and refusal.reason == MISMATCH, refusal
    assert refusal.name == "SIGNATURE_MISMATCH"
    assert refusal.message.startswith("the task differs from what was signed: ")


def test_an_agent_outside_the_signed_pool_or_selector_refuses() -> None:
    req = request()
    signed(req)
    for where in (
        {"pool": "cpu", "labels": {"zone": "a"}},
        {"pool": "gpu", "labels": {"zone": "b"}},
        {"pool": "gpu", "labels": {}},
    ):
        refusal = verify(assignment_of(req), **where)
        assert refusal is not None and refusal.reason == MISMATCH, (where, refusal)


def test_missing_untrusted_invalid_and_expired() -> None:
    unsigned = verify(assignment_of(request()))
    assert unsigned is not None and unsigned.reason == MISSING
    assert "requires a signed task" in unsigned.message

    req = request()
    signed(req, OTHER)
    untrusted = verify(assignment_of(req))
    assert untrusted is not None and untrusted.reason == UNTRUSTED
    assert signing.key_id(signing.raw_public_key(OTHER)) in untrusted.message

    # Another key's envelope relabelled with the trusted key's id: it does not verify.
    forged = assignment_of(req)
    forged.signature.key_id = signing.key_id(signing.raw_public_key(KEY))
    invalid = verify(forged)
    assert invalid is not None and invalid.reason == INVALID

    # A trusted key that signed bytes that are no TaskStatement.
    garbage = b"\xff\xff\xff"
    odd = assignment_of(request())
    odd.signature.CopyFrom(
        common_pb2.TaskSignature(
            statement=garbage,
            signature=KEY.sign(signing.CONTEXT + garbage),
            key_id=forged.signature.key_id,
        )
    )
    unparsed = verify(odd)
    assert unparsed is not None and unparsed.reason == INVALID
    assert unparsed.message == "the signed statement does not parse"

    req = request()
    signed(req)
    expired = verify(assignment_of(req), now=NOW + timedelta(hours=24, microseconds=1))
    assert expired is not None and expired.reason == EXPIRED
    assert "2029-06-02T12:00:00+00:00" in expired.message


def test_the_checks_run_in_the_contracts_order() -> None:
    """An untrusted signer is reported before an invalid signature, that before expiry,
    expiry before a mismatch."""
    req = request()
    signed(req, OTHER)
    tampered_untrusted = assignment_of(req, payload=b"x")
    tampered_untrusted.signature.signature = bytes(64)
    refusal = verify(tampered_untrusted, now=NOW + timedelta(days=2))
    assert refusal is not None and refusal.reason == UNTRUSTED

    req = request()
    signed(req)
    bad = assignment_of(req, payload=b"x")
    bad.signature.signature = bytes(64)
    refusal = verify(bad, now=NOW + timedelta(days=2))
    assert refusal is not None and refusal.reason == INVALID
    refusal = verify(assignment_of(req, payload=b"x"), now=NOW + timedelta(days=2))
    assert refusal is not None and refusal.reason == EXPIRED


# Trust files and key files


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_trust_files_jwks_and_pem(tmp_path: Path) -> None:
    raws = [signing.raw_public_key(KEY), signing.raw_public_key(OTHER)]
    jwks_file = write(tmp_path, "trusted.json", json.dumps(signing.jwks(raws)))
    pem_file = write(tmp_path, "trusted.pem", b"".join(signing.public_key_pem(r) for r in raws))
    minimal = write(
        tmp_path,
        "minimal.json",
        json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X}]}),
    )
    for path in (jwks_file, pem_file):
        trusted = TrustedSubmitters.load(path)
        assert set(trusted) == {signing.key_id(r) for r in raws}
    assert set(TrustedSubmitters.load(minimal)) == {RFC8037_KID}
    jwk = signing.jwk(raws[0])
    assert jwk | {"kid": ""} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": base64.urlsafe_b64encode(raws[0]).rstrip(b"=").decode(),
        "kid": "",
        "alg": "EdDSA",
        "use": "sig",
    }


def bad_jwk(**fields: object) -> str:
    return json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": RFC8037_X} | fields]})


EC_KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"keys": []}', 'needs a non-empty "keys" list'),
        ("[]", 'needs a non-empty "keys" list'),
        ('{"keys": ["x"]}', r"keys\[0\] is not an object"),
        (bad_jwk(kty="EC"), "is not an Ed25519 key"),
        (bad_jwk(crv="X25519"), "is not an Ed25519 key"),
        (bad_jwk(x="abc"), '"x" must be a 32-byte key'),
        (bad_jwk(x=RFC8037_X + "="), '"x" must be a 32-byte key'),
        (bad_jwk(kid="my-key"), "is not the key's RFC 7638 thumbprint"),
        (bad_jwk(d=RFC8037_D), r"holds a private key \('d'\)"),
        ("", "holds no PEM public key"),
        ("hello", "holds no PEM public key"),
        (
            EC_KEY.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode(),
            "public key 1 is not an Ed25519 key",
        ),
        (
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            "public key 1 is not valid PEM",
        ),
        (signing.private_key_pem(KEY).decode(), "holds a private key"),
    ],
)
def test_bad_trust_files_are_config_errors(tmp_path: Path, content: str, message: str) -> None:
    path = write(tmp_path, "trusted", content)
    with pytest.raises(ConfigError, match=message) as caught:
        TrustedSubmitters.load(path)
    assert str(path) in str(caught.value)


def test_a_missing_trust_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read trusted submitters"):
        TrustedSubmitters.load(tmp_path / "absent.json")


def test_private_keys_load_and_bad_ones_are_config_errors(tmp_path: Path) -> None:
    good = write(tmp_path, "key", signing.private_key_pem(KEY))
    assert TaskSigner.load(good).key_id == signing.key_id(signing.raw_public_key(KEY))
    encrypted = KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    ec_pem = EC_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for name, data, message in (
        ("encrypted", encrypted, "not an unencrypted PEM private key"),
        ("garbage", b"hello", "not an unencrypted PEM private key"),
        ("ec", ec_pem, "is not an Ed25519 key"),
    ):
        with pytest.raises(ConfigError, match=message):
            signing.load_private_key(write(tmp_path, name, data))
    with pytest.raises(ConfigError, match="cannot read signing key"):
        signing.load_private_key(tmp_path / "absent")


def test_a_stored_envelopes_key_id() -> None:
    req = request()
    signed(req)
    assert signing.signer_key_id(req.signature.SerializeToString()) == req.signature.key_id
    assert signing.signer_key_id(None) == ""
    assert signing.signer_key_id(b"\xff\xff") == ""
