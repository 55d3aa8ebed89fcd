"""Token secrets: how they look, how they are minted, and how they are checked.

A token is ``<prefix>_<token_id>.<secret>``. The id is public (it names the row); the
secret is 256 random bits, of which only the SHA-256 is stored. A slow hash would add
nothing against a 256-bit secret, and a constant-time comparison keeps timing flat.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal

TokenKind = Literal["mbt", "mat"]
BOOTSTRAP: TokenKind = "mbt"
"""Prefix of bootstrap (enrollment) tokens."""
API: TokenKind = "mat"
"""Prefix of API (client) tokens."""

_FORMAT = re.compile(r"^(mbt|mat)_([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True)
class MintedToken:
    token_id: str
    secret: str
    """The whole token string to hand out, shown once."""
    secret_hash: str


@dataclass(frozen=True, slots=True, repr=False)
class PresentedToken:
    """A token string as a caller presented it, split; repr never shows the secret."""

    kind: TokenKind
    token_id: str
    _secret: str

    def matches(self, secret_hash: str) -> bool:
        return hmac.compare_digest(_hash(self._secret), secret_hash)

    def __repr__(self) -> str:
        return f"PresentedToken({self.kind}_{self.token_id}.***)"


def mint(kind: TokenKind) -> MintedToken:
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return MintedToken(token_id, f"{kind}_{token_id}.{secret}", _hash(secret))


def parse(value: str, kind: TokenKind) -> PresentedToken | None:
    """Split a presented token; None when it is not a well-formed token of this kind."""
    match = _FORMAT.match(value.strip())
    if not match or match.group(1) != kind:
        return None
    return PresentedToken(kind, match.group(2), match.group(3))


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
