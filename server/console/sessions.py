"""Console sessions: server-side, in this process's memory, named by a random id.

The browser holds only the id (256 random bits, in the cookie); the store keeps its
SHA-256, so the table alone (a memory dump, a debugger) does not let anyone sign in.
Nothing about the API token is kept but its public id, to end the session with the
token. A session ends at sign-out, ``IDLE`` after its last request, ``ttl`` after
sign-in, or when the process stops (signing in again is the remedy).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import timedelta

from muster.server.clock import Clock, SystemClock
from muster.server.principals import Principal

IDLE = timedelta(minutes=30)
"""A session with no request for this long is over."""
MAX_SESSIONS = 10_000
"""Sessions kept at most; past it, the oldest is dropped (its user signs in again)."""
PRUNE_EVERY = 100
"""Expired sessions are swept every this many sign-ins (and when the store is full)."""


@dataclass(slots=True)
class Session:
    principal: Principal
    started: float
    """When it was signed in (the clock's monotonic seconds)."""
    seen: float
    """Its last request."""
    id_hash: str = field(repr=False)


class SessionStore:
    def __init__(
        self, ttl: timedelta, *, clock: Clock | None = None, limit: int = MAX_SESSIONS
    ) -> None:
        self._ttl = ttl.total_seconds()
        self._idle = IDLE.total_seconds()
        self._clock = clock or SystemClock()
        self._limit = limit
        self._sessions: dict[str, Session] = {}
        """By id hash, in the order they were created (oldest first)."""
        self._created = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, principal: Principal) -> str:
        """A new session for ``principal``; returns the id for the cookie (only there)."""
        self._created += 1
        if self._created % PRUNE_EVERY == 0 or len(self._sessions) >= self._limit:
            self._prune()
        while len(self._sessions) >= self._limit:
            del self._sessions[next(iter(self._sessions))]  # the oldest
        session_id = secrets.token_urlsafe(32)
        now = self._clock.monotonic()
        key = _hash(session_id)
        self._sessions[key] = Session(principal, now, now, key)
        return session_id

    def get(self, session_id: str) -> Session | None:
        """The live session of a cookie's id (and it counts as a request), else None."""
        if not session_id or len(session_id) > 100:
            return None
        key = _hash(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        now = self._clock.monotonic()
        if self._expired(session, now):
            del self._sessions[key]
            return None
        session.seen = now
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(_hash(session_id), None)

    def end_token(self, token_id: str) -> None:
        """End every session signed in with this API token."""
        for key in [k for k, s in self._sessions.items() if s.principal.token_id == token_id]:
            del self._sessions[key]

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.started >= self._ttl or now - session.seen >= self._idle

    def _prune(self) -> None:
        now = self._clock.monotonic()
        for key in [k for k, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[key]


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()
