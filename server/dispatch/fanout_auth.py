"""Signed fan-out messages: only a replica holding the shared key can announce anything.

Whoever can publish on the Redis channel could otherwise close any agent's stream or
interrupt any attempt. Each published message is sealed as::

    m1.<HMAC-SHA256 hex>.<JSON body>

The tag covers the channel name and the body; the body carries the sender's origin (one
per process start), a sequence number that grows with every message it sends, and the
time it was sealed. A receiver drops, and counts, a message that

- is not in this form (``unsigned``) or whose tag does not verify (``bad_tag``;
  compared in constant time),
- was sealed more than :data:`REPLAY_WINDOW` seconds away from its own clock (``stale``),
- is not newer than the last one it accepted from that origin (``replayed``).

So a captured message can be replayed at most within the window, and only if this
replica never saw it (it missed the original; the replay then delivers it once, late).
Replicas' clocks must agree within the window; a dropped message costs latency only,
since the database poll is the backstop.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

VERSION = b"m1"
REPLAY_WINDOW = 30.0
"""Seconds a sealed message stays acceptable (either side of the receiver's clock)."""
REASONS = ("unsigned", "bad_tag", "stale", "replayed")
"""Why a message was dropped: the label values of ``muster_fanout_rejected_total``."""


class Rejected(Exception):
    """A message that must be dropped; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Opened:
    origin: str
    messages: list[dict[str, Any]]


class Sealer:
    """Seals what this replica publishes and opens what it receives, under one key."""

    def __init__(
        self,
        key: bytes,
        *,
        channel: str,
        origin: str,
        window: float = REPLAY_WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not key:
            raise ValueError("a fan-out key is required")
        self._key = key
        self._channel = channel.encode()
        self._origin = origin
        self._window = window
        self._clock = clock
        self._sequence = 0
        self._last_seen: dict[str, tuple[int, float]] = {}
        """Per origin: the highest sequence accepted, and when (this clock)."""
        self._next_prune = 0.0

    def __repr__(self) -> str:
        return f"Sealer(channel={self._channel.decode()!r}, origin={self._origin!r})"

    def seal(self, messages: list[dict[str, Any]]) -> bytes:
        self._sequence += 1
        body = json.dumps(
            {"o": self._origin, "s": self._sequence, "ts": self._clock(), "m": messages},
            separators=(",", ":"),
        ).encode()
        return VERSION + b"." + self._tag(body) + b"." + body

    def open(self, data: bytes | str) -> Opened:
        """The verified message; :class:`Rejected` if it must be dropped."""
        if isinstance(data, str):
            data = data.encode()
        parts = data.split(b".", 2)
        if len(parts) != 3 or parts[0] != VERSION:
            raise Rejected("unsigned")
        _, tag, body = parts
        if not hmac.compare_digest(self._tag(body), tag):
            raise Rejected("bad_tag")
        try:
            envelope = json.loads(body)
            origin, sequence, sealed = envelope["o"], envelope["s"], envelope["ts"]
            messages = envelope["m"]
        except (ValueError, TypeError, KeyError):
            raise Rejected("unsigned") from None  # only a replica with the key could send it
        if not (
            isinstance(origin, str)
            and isinstance(sequence, int)
            and isinstance(sealed, int | float)
            and isinstance(messages, list)
        ):
            raise Rejected("unsigned")
        now = self._clock()
        if abs(now - sealed) > self._window:
            raise Rejected("stale")
        last = self._last_seen.get(origin)
        if last is not None and sequence <= last[0]:
            raise Rejected("replayed")
        self._last_seen[origin] = (sequence, now)
        self._prune(now)
        return Opened(origin, messages)

    def _tag(self, body: bytes) -> bytes:
        mac = hmac.new(self._key, self._channel + b"\n" + body, hashlib.sha256)
        return mac.hexdigest().encode()

    def _prune(self, now: float) -> None:
        """Forget origins silent for two windows: their old messages are stale by now."""
        if now < self._next_prune:
            return
        self._next_prune = now + self._window
        horizon = now - 2 * self._window
        for origin in [o for o, (_, seen) in self._last_seen.items() if seen < horizon]:
            del self._last_seen[origin]
