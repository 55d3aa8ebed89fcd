"""The budget gate: an AI attempt is sent to an agent only once its worst case is reserved
on every budget that applies, and the reservation lives exactly as long as the attempt.

At dispatch (after the claim, before the Assignment) one atomic call reserves the
attempt's worst case on the global, tenant and pool budgets that have a limit and on the
task's own cap: all or none, so no budget is ever exceeded however many replicas claim
at once. A result settles the reservation to the cost the server computed; an attempt
that ends otherwise releases it; the reaper settles or releases what a dead replica left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from muster.money import format_usd
from muster.server.ai.budgets import BudgetRule
from muster.server.audit import AuditRecord
from muster.server.metrics import MusterMetrics
from muster.server.quotas import Quotas, QuotaStoreUnavailable
from muster.server.quotas.base import BudgetHold
from muster.server.storage import budgets as budget_store
from muster.server.storage import taskstore as task_store
from muster.server.storage import usage as usage_store
from muster.server.storage.database import Database
from muster.server.storage.taskstore import Claimed, HoldBack
from muster.server.storage.types import utcnow
from muster.states import HELD, State

log = logging.getLogger(__name__)

BUDGET_RETRY = timedelta(seconds=2)
"""How long a task that did not fit waits before it is considered again."""
STORE_RETRY = timedelta(seconds=1)
"""How long AI work waits when the quota store is unreachable (budgets fail closed)."""
TASK_CAP_KEEP = timedelta(days=35)
"""How long a task's own cap is remembered after its last reservation (timeouts are at
most 30 days)."""
WAITING_FOR_BUDGET = "waiting for budget"
WAITING_FOR_STORE = "waiting for the quota store"
WAITING_FOR_PROVIDER = "waiting for the provider"


def backoff_key(pool: str, model: str) -> str:
    """The quota-store key that holds back a model in a pool after its provider said 429."""
    return f"provider-backoff:{pool}:{model}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The gate's answer for one claimed attempt: send it, hold it back, or end the task."""

    ceiling: int = 0
    """Micro-dollars reserved for the attempt (sent as its ceiling); 0 if not budgeted."""
    hold: HoldBack | None = None
    fail: str | None = None
    """The task's own cap is used up: it ends FAILED with this error."""
    audit: AuditRecord | None = None
    """A new reason to wait, audited once per task rather than once per claim."""


class BudgetGate:
    def __init__(
        self,
        db: Database,
        quotas: Quotas,
        metrics: MusterMetrics,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = db
        self._quotas = quotas
        self._metrics = metrics
        self._clock = clock

    async def rules(self) -> list[BudgetRule]:
        """The budgets operators set, read afresh: a new or lowered limit holds from the
        next claim on, on every replica (a cache would let work slip past a new budget)."""
        async with self._db.transaction() as session:
            rows = await budget_store.list_budgets(session)
        return [budget_store.rule(row) for row in rows]

    async def admit(self, task: Claimed, rules: Sequence[BudgetRule]) -> Verdict:
        """Reserve ``task``'s worst case on every budget of ``rules`` that applies (read
        with :meth:`rules` once per claim), or say why not."""
        if task.reserve_micros <= 0:
            return Verdict()
        now = self._clock()
        holder = task_store.attempt_key(task.task_id, task.attempt)
        rules = self._applicable(rules, task)
        holds = [_hold(rule, now) for rule in rules]
        try:
            if task.model:
                waits = await self._quotas.held_off([backoff_key(task.pool, task.model)])
                if waits:
                    seconds = max(waits.values())
                    reason = (
                        f"{WAITING_FOR_PROVIDER}: {task.model} is rate limited in pool "
                        f"{task.pool} for {seconds:.0f}s more (retry-after)"
                    )
                    return self._wait(task, now + timedelta(seconds=seconds), reason)
            if not holds:  # no budget applies: nothing to hold, the ceiling still goes out
                return Verdict(ceiling=task.reserve_micros)
            verdict = await self._quotas.reserve_budget(holder, task.reserve_micros, holds)
        except QuotaStoreUnavailable:
            reason = f"{WAITING_FOR_STORE}: AI dispatch stops while the quota store is unreachable"
            return self._wait(task, now + STORE_RETRY, reason)
        if verdict.allowed:
            return Verdict(ceiling=task.reserve_micros)
        refused = verdict.refused
        rule = next((r for r, h in zip(rules, holds, strict=True) if h == refused), None)
        if rule is None:  # the store named a scope we did not send: a bug, refuse safely
            log.error("budget store refused an unknown scope %r", refused)
            return self._wait(task, now + BUDGET_RETRY, f"{WAITING_FOR_BUDGET}: refused")
        left = format_usd(max(0, rule.limit_micros - verdict.used))
        limit, need = format_usd(rule.limit_micros), format_usd(task.reserve_micros)
        if rule.scope.startswith("task:"):
            return Verdict(
                fail=(
                    f"the task's spend cap is used up: {left} of {limit} USD left, "
                    f"{need} needed for another attempt"
                )
            )
        reason = f"{WAITING_FOR_BUDGET} {rule.scope}: {left} of {limit} USD left, {need} needed"
        return self._wait(task, now + BUDGET_RETRY, reason, scope=rule.scope)

    def _wait(
        self, task: Claimed, until: datetime, reason: str, *, scope: str | None = None
    ) -> Verdict:
        hold = HoldBack(task.task_id, task.attempt, until, reason)
        category = f"{WAITING_FOR_BUDGET} {scope}:" if scope else reason.partition(":")[0]
        if task.waiting_reason.startswith(category):
            return Verdict(hold=hold)
        audit = AuditRecord(
            actor="server",
            action="task.budget_wait" if scope else "task.wait",
            target=task.task_id,
            outcome="denied",
            details={"attempt": task.attempt, "reason": reason},
        )
        return Verdict(hold=hold, audit=audit)

    @staticmethod
    def _applicable(rules: Sequence[BudgetRule], task: Claimed) -> list[BudgetRule]:
        scopes = {"global", f"tenant:{task.owner}", f"pool:{task.pool}"}
        applicable = [rule for rule in rules if rule.scope in scopes]
        if task.max_cost_micros:
            applicable.append(BudgetRule(f"task:{task.task_id}", task.max_cost_micros, "none"))
        return applicable

    async def hold_off(self, pool: str, model: str, seconds: float) -> None:
        """A provider said 429 for ``model``: dispatch no more of it in ``pool`` for a while,
        rather than burn attempts against the same refusal."""
        try:
            await self._quotas.hold_off(backoff_key(pool, model), seconds)
        except QuotaStoreUnavailable:
            log.warning(
                "cannot hold %s back in pool %s: the quota store is unreachable", model, pool
            )

    async def settle(self, holder: str, cost_micros: int) -> None:
        """Replace ``holder``'s reservation by what it cost. If the store is unreachable the
        reservation stays held until the reaper settles it (it counts against the budget
        meanwhile: failing closed)."""
        try:
            await self._quotas.settle_budget(holder, cost_micros)
        except QuotaStoreUnavailable:
            log.warning("cannot settle budget of %s now; the reaper will", holder)

    async def release(self, holder: str) -> None:
        """Drop ``holder``'s reservation unspent (or leave it to the reaper, as above)."""
        try:
            await self._quotas.release_budget(holder)
        except QuotaStoreUnavailable:
            log.warning("cannot release budget of %s now; the reaper will", holder)

    async def reconcile(self, older_than: timedelta) -> int:
        """Settle or release reservations whose attempt has ended without it (a replica
        died, or the store was down at the time): settled at the recorded cost when the
        attempt reported usage, else released. Returns how many it closed."""
        try:
            stale = await self._quotas.stale_reservations(older_than.total_seconds())
        except QuotaStoreUnavailable:
            return 0
        attempts: list[tuple[str, int]] = []
        for name in stale:
            task_id, _, number = name.rpartition(":")
            if task_id and number.isdigit():
                attempts.append((task_id, int(number)))
        if not attempts:
            return 0
        async with self._db.transaction() as session:
            live = await self._db.tasks.held_attempts(session, attempts)
            costs = await usage_store.cost_of(session, attempts)
        closed = 0
        for ref in attempts:
            if ref in live:
                continue
            holder = task_store.attempt_key(*ref)
            if ref in costs:
                await self.settle(holder, costs[ref])
            else:
                await self.release(holder)
            closed += 1
        return closed

    async def restore(self) -> None:
        """Rebuild an in-process store's budgets after a start: each budget's spend in its
        current period and each live task's cap from the recorded usage, and the holds of
        the attempts agents still hold. Redis keeps all of this across restarts; the
        embedded store would otherwise forget every budget at each restart."""
        now = self._clock()
        rules = await self.rules()
        async with self._db.transaction() as session:
            spent: list[tuple[BudgetRule, int]] = []
            for rule in rules:
                start, _ = rule.window(now)
                kind, _, name = rule.scope.partition(":")
                total = await usage_store.spent_since(
                    session,
                    start,
                    owner=name if kind == "tenant" else None,
                    pool=name if kind == "pool" else None,
                )
                spent.append((rule, total))
            live = (State.QUEUED, *HELD)
            for task_id, cap, total in await usage_store.capped_tasks_spent(session, live):
                spent.append((BudgetRule(f"task:{task_id}", cap, "none"), total))
            held = await self._db.tasks.held_with_reservations(session)
        for rule, total in spent:
            if total:
                holder = f"restored:{rule.key(now)}"
                await self._quotas.reserve_budget(holder, 0, [_hold(rule, now)])
                await self._quotas.settle_budget(holder, total)
        for task in held:
            holder = task_store.attempt_key(task.task_id, task.attempt)
            holds = [_hold(rule, now) for rule in self._applicable(rules, task)]
            verdict = await self._quotas.reserve_budget(holder, task.reserve_micros, holds)
            if not verdict.allowed:
                log.warning("restoring the hold of %s went over a budget", holder)
        if spent or held:
            log.info("budgets restored: %d spends, %d holds", len(spent), len(held))

    async def refresh_gauges(self) -> None:
        """``muster_budget_remaining_usd`` and ``muster_budget_limit_usd`` for every budget
        with a limit."""
        now = self._clock()
        remaining: dict[str, float] = {}
        limits: dict[str, float] = {}
        try:
            for rule in await self.rules():
                used = await self._quotas.budget_usage(rule.key(now))
                remaining[rule.scope] = max(0, rule.limit_micros - used.total) / 1_000_000
                limits[rule.scope] = rule.limit_micros / 1_000_000
        except QuotaStoreUnavailable:
            return
        self._metrics.budget_remaining_usd.update(remaining)
        self._metrics.budget_limit_usd.update(limits)


def _hold(rule: BudgetRule, now: datetime) -> BudgetHold:
    _, end = rule.window(now)
    if end is None and rule.scope.startswith("task:"):
        # A task's cap has no period, but its key must not outlive the task: each
        # reservation keeps it for TASK_CAP_KEEP more (longer than any task may wait).
        end = now + TASK_CAP_KEEP
    return BudgetHold(rule.key(now), rule.limit_micros, end.timestamp() if end else None)
