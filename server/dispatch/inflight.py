"""In-flight limits per tenant and per pool, as concurrency leases in the quota store.

An attempt takes a slot of its tenant (the task owner) and of its pool when it is
claimed, and gives both back when it ends. Slots are leases that expire unless renewed,
so a replica that dies mid-task cannot hold them forever. With the store unreachable,
nothing is admitted: concurrency limits fail closed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from muster.server.drain import Drain
from muster.server.quotas import Quotas, QuotaStoreUnavailable
from muster.server.storage.taskstore import Held

log = logging.getLogger(__name__)

STORE_DOWN = "waiting for the quota store: dispatch stops while it is unreachable"


class InflightLimits:
    def __init__(self, quotas: Quotas) -> None:
        self._quotas = quotas
        self._releaser: Drain[tuple[str, str, str]] = Drain(
            self._release_all, name="inflight-release"
        )

    async def admit(self, owner: str, pool: str, holder: str) -> str | None:
        """Take a tenant slot and a pool slot for ``holder``: None when both are taken,
        else why not (holding none): a full tenant or pool, or an unreachable store."""
        return (await self.admit_many([(owner, pool, holder)]))[0]

    async def admit_many(self, attempts: Sequence[tuple[str, str, str]]) -> list[str | None]:
        """:meth:`admit` for each (owner, pool, holder), in that order, in one store call."""
        if not attempts:
            return []
        policy = self._quotas.policy
        try:
            # Both slots of an attempt in one decision: refused by either, it keeps neither.
            decisions = await self._quotas.acquire_inflight_slots_many(attempts)
        except QuotaStoreUnavailable:
            for attempt in attempts:
                self.release(*attempt)  # an answer lost on the way may have taken them
            return [STORE_DOWN] * len(attempts)
        answers: list[str | None] = []
        for (owner, pool, _), decision in zip(attempts, decisions, strict=True):
            if decision.allowed:
                answers.append(None)
            elif decision.subject == f"pool:{pool}":
                answers.append(
                    f"waiting for a slot: pool {pool} has {policy.inflight_per_pool} tasks "
                    "in flight"
                )
            else:
                answers.append(
                    f"waiting for a slot: tenant {owner} has {policy.inflight_per_tenant} "
                    "tasks in flight"
                )
        return answers

    def release(self, owner: str, pool: str, holder: str) -> None:
        """Give back ``holder``'s slots, without waiting: the releases of every attempt
        that ends meanwhile go to the store together, in one round trip. If that fails,
        the slots stay taken until their leases expire (fail closed)."""
        if not self._releaser.offer((owner, pool, holder)):
            log.warning("in-flight release of %s dropped: the releaser has stopped", holder)

    @property
    def releaser(self) -> Drain[tuple[str, str, str]]:
        """The single writer of the releases. Should it crash (an error other than the
        store being unreachable), later releases are dropped (their leases expire) and
        its error hook is told (the server's supervisor)."""
        return self._releaser

    async def _release_all(self, batch: list[tuple[str, str, str]]) -> None:
        # An unreachable store is handled there (the slots stay taken until their leases
        # expire); anything else it raises is a crash, for on_crash.
        await self._quotas.release_inflight_many(batch)

    async def close(self) -> None:
        """Send the releases still waiting."""
        await self._releaser.wait()

    async def renew(self, held: Iterable[Held]) -> None:
        """Keep the slots of attempts still running; retake one that expired meanwhile."""
        attempts = [(attempt.owner, attempt.pool, attempt.holder) for attempt in held]
        try:
            await self._quotas.renew_inflight_many(attempts)
        except QuotaStoreUnavailable:
            log.warning("cannot renew in-flight slots: the quota store is unreachable")
