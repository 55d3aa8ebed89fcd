"""Signed tasks: Ed25519 keys, the envelope, the task id it binds, the server's Submit
checks and the agent's verification (the contract is TaskSignature in
``proto/muster/v1/common.proto``).

Shared by the SDK (signs), the server (checks that an envelope is well formed, never
trusting it) and the agent (verifies against the keys it trusts). Ed25519 comes from
``cryptography``, imported when first needed: the SDK installed alone submits unsigned
tasks without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from muster.errors import ConfigError
from muster.v1 import agent_pb2, common_pb2, task_pb2

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
except ImportError:  # the SDK installed alone: unsigned tasks need none of this
    HAVE_CRYPTOGRAPHY = False
else:
    HAVE_CRYPTOGRAPHY = True

CONTEXT = b"muster.v1.TaskStatement\n"
"""What every signature covers before the statement's bytes (24 ASCII bytes)."""
TASK_ID_PREFIX = "t_"
TASK_ID_DIGEST_BYTES = 12
DEFAULT_VALIDITY = timedelta(hours=24)
"""How long a signature holds unless the signer says otherwise."""
MAX_VALIDITY = timedelta(days=30)
"""The furthest not_after the server accepts, from the time of Submit."""
NONCE_BYTES = 32
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
CLAUDE_CODE = "claude-code"
"""The kind whose payload's ``allowed_tools`` a statement lists."""

MISSING = common_pb2.REFUSAL_REASON_SIGNATURE_MISSING
INVALID = common_pb2.REFUSAL_REASON_SIGNATURE_INVALID
EXPIRED = common_pb2.REFUSAL_REASON_SIGNATURE_EXPIRED
MISMATCH = common_pb2.REFUSAL_REASON_SIGNATURE_MISMATCH
UNTRUSTED = common_pb2.REFUSAL_REASON_SIGNER_UNTRUSTED

_B64URL = re.compile(r"\A[A-Za-z0-9_-]*\Z")
_KEY_ID = re.compile(r"\A[A-Za-z0-9_-]{43}\Z")


# Keys ------------------------------------------------------------------------------


def _require_cryptography() -> None:
    if not HAVE_CRYPTOGRAPHY:
        raise ConfigError(
            "signing or verifying tasks needs the 'cryptography' package: pip install cryptography"
        )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    """Base64url without padding, strictly (no padding, no other characters)."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url without padding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as err:
        raise ValueError("not base64url without padding") from err


def key_id(public_key: bytes) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of a raw Ed25519 public key:
    the hash of ``{"crv":"Ed25519","kty":"OKP","x":"<base64url key>"}``."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes")
    members = f'{{"crv":"Ed25519","kty":"OKP","x":"{_b64url(public_key)}"}}'
    return _b64url(hashlib.sha256(members.encode("ascii")).digest())


def raw_public_key(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a key's public half."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def jwk(public_key: bytes) -> dict[str, str]:
    """A raw Ed25519 public key as a JWK (RFC 8037), its thumbprint as ``kid``."""
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64url(public_key),
        "kid": key_id(public_key),
        "alg": "EdDSA",
        "use": "sig",
    }


def jwks(public_keys: Iterable[bytes]) -> dict[str, list[dict[str, str]]]:
    """A JWK Set of raw Ed25519 public keys: what ``--trusted-submitters`` reads."""
    return {"keys": [jwk(key) for key in public_keys]}


def generate_key() -> Ed25519PrivateKey:
    _require_cryptography()
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: keep the file 0600."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(public_key: bytes) -> bytes:
    """A raw Ed25519 public key as SubjectPublicKeyInfo PEM."""
    _require_cryptography()
    return Ed25519PublicKey.from_public_bytes(public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An unencrypted PEM (PKCS#8) Ed25519 private key; ConfigError naming the file."""
    _require_cryptography()
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read signing key {path}: {err.strerror}") from err
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        # The message of a failed parse never holds key material, but say it in our words.
        raise ConfigError(
            f"signing key {path} is not an unencrypted PEM private key (muster key generate "
            "makes one)"
        ) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an Ed25519 key")
    return key


def public_keys_from_pem(data: bytes, source: str) -> list[bytes]:
    """Every Ed25519 public key in PEM text (one or more ``PUBLIC KEY`` blocks), raw."""
    _require_cryptography()
    if b"PRIVATE KEY-----" in data:
        raise ConfigError(f"{source} holds a private key: list public keys only")
    blocks = re.findall(
        rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", data, flags=re.DOTALL
    )
    if not blocks:
        raise ConfigError(f"{source} holds no PEM public key (-----BEGIN PUBLIC KEY-----)")
    keys = []
    for number, block in enumerate(blocks, 1):
        try:
            key = serialization.load_pem_public_key(block)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{source}: public key {number} is not valid PEM") from err
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{source}: public key {number} is not an Ed25519 key")
        keys.append(raw_public_key(key))
    return keys


def public_keys_from_jwks(data: bytes, source: str) -> list[bytes]:
    """Every key of a JWK Set: each must be an OKP/Ed25519 public key; a ``kid``, if
    given, must be the key's RFC 7638 thumbprint (that is how agents look keys up)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{source} is not valid JSON") from err
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{source}: a JWK Set needs a non-empty "keys" list')
    keys = []
    for i, entry in enumerate(entries):
        where = f"{source}: keys[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not an object")
        if "d" in entry:
            raise ConfigError(f"{where} holds a private key ('d'): list public keys only")
        if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            raise ConfigError(
                f'{where} is not an Ed25519 key (needs "kty": "OKP", "crv": "Ed25519")'
            )
        x = entry.get("x")
        try:
            raw = _unb64url(x) if isinstance(x, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != PUBLIC_KEY_BYTES:
            raise ConfigError(f'{where}: "x" must be a 32-byte key in base64url')
        kid = entry.get("kid")
        if kid is not None and kid != key_id(raw):
            raise ConfigError(
                f"{where}: kid {_shown(kid)} is not the key's RFC 7638 thumbprint {key_id(raw)}"
            )
        keys.append(raw)
    return keys


def read_public_keys(path: Path, source: str = "") -> list[bytes]:
    """The raw Ed25519 public keys in a file: a JWK Set, or PEM with one or more
    ``PUBLIC KEY`` blocks; ConfigError naming the file otherwise."""
    source = source or str(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {source}: {err.strerror}") from err
    if data.lstrip().startswith((b"{", b"[")):
        return public_keys_from_jwks(data, source)
    return public_keys_from_pem(data, source)


class TrustedSubmitters(Mapping[str, "Ed25519PublicKey"]):
    """The submitter keys an agent trusts, by key id (their RFC 7638 thumbprints).

    Read from a local file only, never from the server: a JWK Set
    (``{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": ...}]}``) or PEM with one or more
    ``PUBLIC KEY`` blocks."""

    def __init__(self, public_keys: Iterable[bytes]) -> None:
        _require_cryptography()
        self._keys = {key_id(raw): Ed25519PublicKey.from_public_bytes(raw) for raw in public_keys}

    @classmethod
    def load(cls, path: Path) -> TrustedSubmitters:
        return cls(read_public_keys(path, f"trusted submitters {path}"))

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._keys[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


# The statement ---------------------------------------------------------------------


def allowed_tools(kind: str, payload: bytes) -> list[str]:
    """A claude-code payload's ``allowed_tools``, in payload order; empty for other kinds
    (and for a payload that is not the JSON object the server would accept anyway)."""
    if kind != CLAUDE_CODE:
        return []
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return []
    tools = doc.get("allowed_tools") if isinstance(doc, dict) else None
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        return []
    return tools


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _schema_digest(schema: str) -> bytes:
    return _digest(schema.encode("utf-8")) if schema else b""


def statement_for(request: task_pb2.SubmitRequest) -> common_pb2.TaskStatement:
    """What a signature over ``request`` covers, not_after and nonce aside."""
    return common_pb2.TaskStatement(
        kind=request.kind,
        payload_sha256=_digest(request.payload),
        pool=request.pool or "default",
        selector=dict(request.selector),
        max_cost_micros=round(request.max_cost_usd * 1_000_000),
        allowed_tools=allowed_tools(request.kind, request.payload),
        output_schema_sha256=_schema_digest(request.output_schema),
    )


def task_id_for(statement: bytes) -> str:
    """The id a signed task gets: ``t_`` and the first 12 bytes of
    SHA-256(context || statement) in lowercase hex."""
    return TASK_ID_PREFIX + _digest(CONTEXT + statement)[:TASK_ID_DIGEST_BYTES].hex()


def signer_key_id(envelope: bytes | None) -> str:
    """The key id of a stored envelope (a serialized TaskSignature); empty if none."""
    if not envelope:
        return ""
    try:
        return common_pb2.TaskSignature.FromString(envelope).key_id
    except DecodeError:
        return ""


class TaskSigner:
    """Signs SubmitRequests with one Ed25519 private key.

    ``valid_for``: how long a signature holds (agents refuse the task after it)."""

    def __init__(self, private_key: Ed25519PrivateKey, *, valid_for: timedelta = DEFAULT_VALIDITY):
        if not timedelta(0) < valid_for <= MAX_VALIDITY:
            raise ConfigError("a signature's validity must be positive and at most 30 days")
        self._key = private_key
        self.valid_for = valid_for
        self.public_key = raw_public_key(private_key)
        """The raw 32-byte public key."""
        self.key_id = key_id(self.public_key)

    @classmethod
    def load(cls, path: Path, *, valid_for: timedelta = DEFAULT_VALIDITY) -> TaskSigner:
        """A signer for the PEM private key in ``path`` (``muster key generate`` writes one)."""
        return cls(load_private_key(path), valid_for=valid_for)

    def __repr__(self) -> str:
        return f"TaskSigner(key_id={self.key_id!r})"

    def sign(
        self,
        request: task_pb2.SubmitRequest,
        *,
        not_after: datetime | None = None,
        now: datetime | None = None,
        nonce: bytes | None = None,
    ) -> common_pb2.TaskSignature:
        """The envelope for ``request``: valid until ``not_after`` (default: ``now`` plus
        ``valid_for``), with a fresh random nonce, so each signing makes another task
        (``nonce`` is for test vectors; reusing one makes the same task id)."""
        if not_after is None:
            not_after = (now or datetime.now(UTC)) + self.valid_for
        if not_after.tzinfo is None:
            raise ConfigError("not_after must be an aware datetime")
        statement = statement_for(request)
        statement.not_after.FromDatetime(not_after.astimezone(UTC))
        statement.nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
        data = statement.SerializeToString()
        return common_pb2.TaskSignature(
            statement=data,
            signature=self._key.sign(CONTEXT + data),
            key_id=self.key_id,
            public_key=self.public_key,
        )


# The server's checks at Submit ---------------------------------------------------------


class EnvelopeError(ValueError):
    """A SubmitRequest's signature does not hold; the message names the field."""


def check_submitted(request: task_pb2.SubmitRequest, now: datetime) -> str:
    """Check ``request.signature`` as the server does at Submit and return the task id it
    binds; EnvelopeError naming the field otherwise. The key it verifies with is the one
    the envelope carries: this proves the envelope well formed, not its signer trusted."""
    envelope = request.signature
    try:
        statement = common_pb2.TaskStatement.FromString(envelope.statement)
    except DecodeError:
        raise EnvelopeError("signature.statement: not a serialized TaskStatement") from None
    expected = statement_for(request)
    for field, what in (
        ("kind", "kind"),
        ("payload_sha256", "payload's SHA-256"),
        ("pool", "pool"),
        ("selector", "selector"),
        ("max_cost_micros", "max_cost_usd in micro-dollars"),
        ("output_schema_sha256", "output_schema's SHA-256"),
        ("allowed_tools", "payload's allowed_tools"),
    ):
        if getattr(statement, field) != getattr(expected, field):
            raise EnvelopeError(
                f"signature.statement.{field}: differs from the request's {what} (sign the "
                "request as it is sent)"
            )
    if not statement.HasField("not_after"):
        raise EnvelopeError("signature.statement.not_after: required")
    not_after = _instant(statement.not_after)
    if not_after is None:
        raise EnvelopeError("signature.statement.not_after: not a valid Timestamp")
    if not_after <= now:
        raise EnvelopeError("signature.statement.not_after: has passed")
    if not_after > now + MAX_VALIDITY:
        raise EnvelopeError("signature.statement.not_after: at most 30 days ahead")
    if not MIN_NONCE_BYTES <= len(statement.nonce) <= MAX_NONCE_BYTES:
        raise EnvelopeError(
            f"signature.statement.nonce: must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes"
        )
    if len(envelope.signature) != SIGNATURE_BYTES:
        raise EnvelopeError(f"signature.signature: must be {SIGNATURE_BYTES} bytes (Ed25519)")
    if len(envelope.public_key) != PUBLIC_KEY_BYTES:
        raise EnvelopeError(f"signature.public_key: must be the {PUBLIC_KEY_BYTES}-byte raw key")
    if envelope.key_id != key_id(envelope.public_key):
        raise EnvelopeError("signature.key_id: not the RFC 7638 thumbprint of public_key")
    _require_cryptography()
    try:
        public_key = Ed25519PublicKey.from_public_bytes(envelope.public_key)
    except ValueError:
        raise EnvelopeError("signature.public_key: not an Ed25519 public key") from None
    if not _verifies(public_key, envelope.signature, envelope.statement):
        raise EnvelopeError("signature.signature: does not verify with public_key")
    return task_id_for(envelope.statement)


def _instant(value: Any) -> datetime | None:
    """A Timestamp as an aware datetime; None outside what datetime can hold."""
    try:
        when: datetime = value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        return None
    return when


def _verifies(public_key: Ed25519PublicKey, signature: bytes, statement: bytes) -> bool:
    try:
        public_key.verify(signature, CONTEXT + statement)
    except InvalidSignature:
        return False
    return True


# The agent's verification ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an agent will not run an Assignment: the reason for Result.refusal, and the
    same in words for Result.error and the log (never the payload)."""

    reason: common_pb2.RefusalReason
    message: str

    @property
    def name(self) -> str:
        """``SIGNATURE_MISMATCH`` and so on."""
        return common_pb2.RefusalReason.Name(self.reason).removeprefix("REFUSAL_REASON_")


def verify_assignment(
    assignment: agent_pb2.Assignment,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    pool: str,
    labels: Mapping[str, str],
    now: datetime,
) -> Refusal | None:
    """Check an Assignment whose kind requires a signature, in the contract's order;
    None when it may run. ``pool`` and ``labels`` are the agent's own."""
    if not assignment.HasField("signature"):
        return Refusal(
            MISSING, f"kind {_shown(assignment.kind)} requires a signed task; this one is unsigned"
        )
    envelope = assignment.signature
    public_key = trusted.get(envelope.key_id)
    if public_key is None:
        return Refusal(
            UNTRUSTED,
            f"signed by key {_shown(envelope.key_id)}, which this agent does not trust",
        )
    if not _verifies(public_key, envelope.signature, envelope.statement):
        return Refusal(INVALID, f"the signature does not verify under key {envelope.key_id}")
    try:
        statement = common_pb2.TaskStatement.FromString(envelope.statement)
    except DecodeError:
        return Refusal(INVALID, "the signed statement does not parse")
    not_after = _instant(statement.not_after)
    if not_after is None or now > not_after:
        shown = not_after.isoformat() if not_after is not None else "an invalid time"
        return Refusal(EXPIRED, f"the signature expired at {shown}")
    differs = _difference(assignment, statement, pool, labels)
    if differs is not None:
        return Refusal(MISMATCH, f"the task differs from what was signed: {differs}")
    return None


def _difference(
    assignment: agent_pb2.Assignment,
    statement: common_pb2.TaskStatement,
    pool: str,
    labels: Mapping[str, str],
) -> str | None:
    """What in the Assignment (or where the agent is) the statement does not allow."""
    if assignment.task_id != task_id_for(assignment.signature.statement):
        return "the task id is not the one the signature binds"
    if assignment.kind != statement.kind:
        return "the kind"
    if _digest(assignment.payload) != statement.payload_sha256:
        return "the payload"
    if _schema_digest(assignment.output_schema) != statement.output_schema_sha256:
        return "the output schema"
    if statement.max_cost_micros and assignment.max_cost_micros > statement.max_cost_micros:
        return "the spend ceiling exceeds the signed cap"
    if pool != statement.pool:
        return f"it was signed for pool {_shown(statement.pool)}, this agent serves {_shown(pool)}"
    for key, value in statement.selector.items():
        if labels.get(key) != value:
            return f"this agent lacks the signed selector's label {_shown(key)}={_shown(value)}"
    return None


def _shown(value: str) -> str:
    """A value from the wire as a message may quote it: short, escapes visible."""
    return ascii(value[:64])
