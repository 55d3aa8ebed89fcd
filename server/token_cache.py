"""A short-lived cache of API token rows, so authenticating a call needs no database
round trip on the hot path.

Only the stored row is cached (its hash, role, expiry); every call still checks the
presented secret against the hash. A deletion is seen at once on the replica that made
it and within ``ttl`` on the others.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

TTL_SECONDS = 5.0
MAX_ENTRIES = 10_000


@dataclass(frozen=True, slots=True)
class CachedToken:
    token_id: str
    name: str
    tenant: str
    role: str
    secret_hash: str
    expires_at: datetime | None
    deleted: bool


class ApiTokenCache:
    def __init__(
        self, *, ttl: float = TTL_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[str, tuple[float, CachedToken | None]] = {}

    async def get(
        self, token_id: str, load: Callable[[str], Awaitable[CachedToken | None]]
    ) -> CachedToken | None:
        """The row for ``token_id`` (None if unknown), loaded at most once per ``ttl``."""
        now = self._clock()
        hit = self._entries.get(token_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        row = await load(token_id)
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()  # unknown ids from a guessing client must not grow memory
        self._entries[token_id] = (now + self._ttl, row)
        return row

    def forget(self, token_id: str) -> None:
        self._entries.pop(token_id, None)
