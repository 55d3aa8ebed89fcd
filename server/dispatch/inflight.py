"""In-flight limits per tenant and per pool, as concurrency leases in the quota store.

An attempt takes a slot of its tenant (the task owner) and of its pool when it is
claimed, and gives both back when it ends. Slots are leases that expire unless renewed,
so a replica that dies mid-task cannot hold them forever. With the store unreachable,
nothing is admitted: concurrency limits fail closed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from server.quotas import Quotas, QuotaStoreUnavailable
from server.storage.tasks import Held

log = logging.getLogger(__name__)


class InflightLimits:
    def __init__(self, quotas: Quotas) -> None:
        self._quotas = quotas

    async def admit(self, owner: str, pool: str, holder: str) -> bool:
        """Take a tenant slot and a pool slot for ``holder``; False (holding none) if
        either is full or the store is unreachable."""
        quotas = self._quotas
        try:
            if not (await quotas.acquire_inflight(owner, holder)).allowed:
                return False
            if not (await quotas.acquire_inflight(pool, holder, scope="pool")).allowed:
                await quotas.release_inflight(owner, holder)
                return False
        except QuotaStoreUnavailable:
            await quotas.release_inflight(owner, holder)
            return False
        return True

    async def release(self, owner: str, pool: str, holder: str) -> None:
        await self._quotas.release_inflight(owner, holder)
        await self._quotas.release_inflight(pool, holder, scope="pool")

    async def renew(self, held: Iterable[Held]) -> None:
        """Keep the slots of attempts still running; retake one that expired meanwhile."""
        quotas = self._quotas
        for attempt in held:
            try:
                if not await quotas.renew_inflight(attempt.owner, attempt.holder):
                    await quotas.acquire_inflight(attempt.owner, attempt.holder)
                if not await quotas.renew_inflight(attempt.pool, attempt.holder, scope="pool"):
                    await quotas.acquire_inflight(attempt.pool, attempt.holder, scope="pool")
            except QuotaStoreUnavailable:
                log.warning("cannot renew in-flight slots: the quota store is unreachable")
                return
