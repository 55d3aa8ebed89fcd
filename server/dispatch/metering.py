"""What an attempt cost: the server prices the tokens an agent reports with its own table
(money is never taken from an agent) and counts them in the AI metrics."""

from __future__ import annotations

import logging

from muster.ai import PROVIDERS
from muster.server.ai.prices import PriceTable, TokenUsage
from muster.server.metrics import MusterMetrics
from muster.server.storage.usage import AttemptCost
from muster.v1 import common_pb2

log = logging.getLogger(__name__)

MAX_REPORTED_TOKENS = 10**12
"""Token counts above this are not a real attempt's: clamp rather than overflow a column."""


class Metering:
    def __init__(self, prices: PriceTable, metrics: MusterMetrics) -> None:
        self.prices = prices
        self._metrics = metrics

    @staticmethod
    def reports_usage(usage: common_pb2.Usage) -> bool:
        """Whether a Result's usage says anything (an agent running no AI reports none)."""
        return bool(
            usage.input_tokens
            or usage.output_tokens
            or usage.cache_creation_input_tokens
            or usage.cache_read_input_tokens
            or usage.reported_cost_micros
        )

    def cost(
        self, kind: str, task_model: str | None, usage: common_pb2.Usage
    ) -> AttemptCost | None:
        """The attempt's usage priced by the server; None when it reported none. Unpriced
        usage (a price removed since Submit) costs 0 and is logged."""
        tokens = TokenUsage(
            input_tokens=_clamp(usage.input_tokens),
            output_tokens=_clamp(usage.output_tokens),
            cache_creation_tokens=_clamp(usage.cache_creation_input_tokens),
            cache_creation_1h_tokens=_clamp(usage.cache_creation_1h_input_tokens),
            cache_read_tokens=_clamp(usage.cache_read_input_tokens),
        )
        reported = _clamp(usage.reported_cost_micros)
        if tokens == TokenUsage() and not reported:
            return None
        model = usage.model[:100] or task_model or ""
        # Priced as the model the task named (Submit checked it has a price): the provider
        # bills that model, and an agent cannot make work cheaper by naming another.
        price = self.prices.price(PROVIDERS.get(kind, ""), task_model or model)
        if price is None:
            log.warning("no price for %s model %r: its usage is recorded at 0", kind, model)
            cost = 0
        else:
            cost = price.cost_micros(tokens)
        return AttemptCost(
            model=model,
            input_tokens=tokens.input_tokens,
            output_tokens=tokens.output_tokens,
            cache_creation_tokens=tokens.cache_creation_tokens,
            cache_creation_1h_tokens=tokens.cache_creation_1h_tokens,
            cache_read_tokens=tokens.cache_read_tokens,
            cost_micros=cost,
            reported_cost_micros=reported,
        )

    def count(self, kind: str, cost: AttemptCost) -> None:
        """Add a recorded attempt's tokens and cost to the AI metrics."""
        tokens = self._metrics.llm_tokens
        for type_, value in (
            ("input", cost.input_tokens),
            ("output", cost.output_tokens),
            ("cache_creation", cost.cache_creation_tokens),
            ("cache_read", cost.cache_read_tokens),
        ):
            if value:
                tokens.labels(kind, cost.model, type_).inc(value)
        if cost.cost_micros:
            self._metrics.llm_cost_usd.labels(kind, cost.model).inc(cost.cost_micros / 1_000_000)


def _clamp(value: int) -> int:
    return max(0, min(int(value), MAX_REPORTED_TOKENS))
