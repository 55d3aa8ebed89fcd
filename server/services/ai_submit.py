"""What Submit checks for AI kinds before a task is stored: the payload against its
kind's schema, the model against the price table and the pool's allow-list, the worst
case of one attempt against the task's cap and every budget's whole limit, and the
tenant's AI request and token rates. A task that passes has its worst case recorded;
dispatch reserves exactly that."""

from __future__ import annotations

import time
from dataclasses import dataclass

from muster.ai import PROVIDERS, PayloadError, PayloadLimits, parse_ai_payload
from muster.money import format_usd
from muster.server.ai.prices import PriceTable
from muster.server.config import ServerConfig
from muster.server.dispatch.budgets import BudgetGate
from muster.server.quotas import QuotaDecision, Quotas
from muster.server.services.errors import failed_precondition, invalid
from muster.server.storage import budgets as budget_store
from muster.server.storage.database import Database

POOL_SETTINGS_TTL = 1.0
"""Seconds a pool's model allow-list is cached: a change applies within this."""
BYTES_PER_TOKEN_ESTIMATE = 4
"""For the tokens-per-minute rate only (budgets use the safe bound of one token per byte)."""


@dataclass(frozen=True, slots=True)
class AiTask:
    """What Submit stores about an AI task."""

    model: str
    reserve_micros: int
    """One attempt's worst case: reserved at dispatch."""
    rate_tokens: int
    """Tokens the task counts for in the tenant's tokens-per-minute limit."""


class AiAdmission:
    def __init__(
        self,
        db: Database,
        quotas: Quotas,
        prices: PriceTable,
        config: ServerConfig,
        budgets: BudgetGate,
    ) -> None:
        self._db = db
        self._quotas = quotas
        self.prices = prices
        self._budgets = budgets
        self._limits = PayloadLimits(
            max_bytes=config.max_payload_bytes,
            max_messages=config.ai_max_messages,
            max_tokens_cap=config.ai_max_tokens,
        )
        self._claude_code_default = round(config.claude_code_max_cost_usd * 1_000_000)
        self._allowed: dict[str, tuple[float, list[str]]] = {}

    async def check(
        self, *, kind: str, payload: bytes, pool: str, tenant: str, max_cost_micros: int | None
    ) -> AiTask:
        """Validate an AI task; raises a ServiceError that names the field and the rule."""
        try:
            request = parse_ai_payload(kind, payload, self._limits)
        except PayloadError as err:
            raise invalid(str(err)) from None
        provider = PROVIDERS[kind]
        price = self.prices.price(provider, request.model)
        if price is None:
            known = ", ".join(m for m in self.prices.models(provider) if m != "*")
            raise invalid(
                f"payload.model: no price for {provider} model {request.model!r} (priced: "
                f"{known or 'none'}); an operator can add it with the server's prices_file"
            )
        allowed = await self._allowed_models(pool)
        if allowed and request.model not in allowed:
            raise invalid(
                f"payload.model: {request.model!r} is not allowed in pool {pool!r} "
                f"(allowed: {', '.join(allowed)})"
            )
        if kind == "claude-code":
            worst = max_cost_micros or self._claude_code_default
        else:
            worst = price.worst_case_micros(request.input_bytes, request.max_tokens)
            if max_cost_micros is not None and max_cost_micros < worst:
                raise invalid(
                    f"max_cost_usd: {format_usd(max_cost_micros)} USD is below one attempt's "
                    f"worst case of {format_usd(worst)} USD (up to {request.input_bytes} input "
                    f"tokens and max_tokens {request.max_tokens} of {request.model}); raise it "
                    "or lower max_tokens"
                )
        scopes = ("global", f"tenant:{tenant}", f"pool:{pool}")
        for rule in await self._budgets.rules():
            if rule.scope in scopes and rule.limit_micros < worst:
                raise failed_precondition(
                    f"budget {rule.scope} allows {format_usd(rule.limit_micros)} USD per "
                    f"{rule.period}, but one attempt of this task may cost up to "
                    f"{format_usd(worst)} USD; it could never run"
                )
        tokens = request.input_bytes // BYTES_PER_TOKEN_ESTIMATE + request.max_tokens
        return AiTask(request.model, worst, max(1, tokens))

    async def check_rates(self, tenant: str, task: AiTask) -> QuotaDecision:
        """The tenant's AI requests- and tokens-per-minute limits, spending one request."""
        return await self._quotas.check_ai_submission(tenant, task.rate_tokens)

    async def _allowed_models(self, pool: str) -> list[str]:
        cached = self._allowed.get(pool)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        async with self._db.transaction() as session:
            row = await budget_store.pool_settings(session, pool)
        allowed = list(row.allowed_models) if row is not None else []
        if len(self._allowed) > 10_000:
            self._allowed.clear()
        self._allowed[pool] = (time.monotonic() + POOL_SETTINGS_TTL, allowed)
        return allowed
