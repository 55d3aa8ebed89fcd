"""This replica's side of cluster-wide presence (storage/presence.py): it records the
streams it welcomes and ends, and keeps their rows alive in one pass per interval.

Connects and disconnects go through group commit (a fleet reconnecting after a restart
shares transactions and statements); the refresh is a few statements per replica per
interval, whatever the number of agents or heartbeats.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta

from muster.server.storage import presence as presence_store
from muster.server.storage.database import Database
from muster.server.storage.types import utcnow

TTL_INTERVALS = 3
"""A row outlives its last refresh by this many refresh intervals: two missed passes (a
slow database, a long pause) do not make agents look gone; a killed replica's do."""


def instance_id(replica: str) -> str:
    """Names one server process: replicas may share a ``replica_id``, processes never."""
    return f"{replica[:60]}:{os.getpid()}:{secrets.token_hex(4)}"


class Presence:
    """Records this replica's streams in ``agent_sessions``.

    ``clock`` is where every timestamp comes from, for writers and readers alike; tests
    move it to expire a dead replica's rows without waiting.
    """

    def __init__(
        self,
        db: Database,
        *,
        replica: str,
        refresh_every: timedelta,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = db
        self.replica = replica[:100]
        self.instance = instance_id(replica)
        self.refresh_every = refresh_every
        self.ttl = refresh_every * TTL_INTERVALS
        self.clock = clock

    def now(self) -> datetime:
        return self.clock()

    async def connected(
        self,
        *,
        session_id: str,
        agent_id: str,
        capabilities: list[str],
        max_concurrency: int,
        cert_serial: str,
        cert_not_after: datetime | None,
    ) -> None:
        now = self.clock()
        await self._db.group.run_many(
            "presence.connect",
            presence_store.connect_many,
            presence_store.Connected(
                session_id=session_id,
                agent_id=agent_id,
                replica=self.replica,
                instance=self.instance,
                capabilities=tuple(capabilities),
                max_concurrency=max_concurrency,
                cert_serial=cert_serial,
                cert_not_after=cert_not_after,
                now=now,
                expires_at=now + self.ttl,
            ),
        )

    async def disconnected(self, *, session_id: str, agent_id: str) -> None:
        await self._db.group.run_many(
            "presence.disconnect",
            presence_store.disconnect_many,
            presence_store.Disconnected(session_id, agent_id, self.clock()),
        )

    async def refresh(self) -> None:
        """Keep this replica's rows alive (call once per ``refresh_every``). Its own
        transaction, not group commit's: a replica pass, not hot-path work to share."""
        async with self._db.transaction() as session:
            await presence_store.refresh(
                await session.connection(), self.instance, self.clock(), self.ttl
            )
