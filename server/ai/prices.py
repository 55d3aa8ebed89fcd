"""Model prices and the cost of an attempt, computed by the server from reported tokens.

Prices are USD per million tokens, which is also micro-dollars per token: the cost of
``n`` tokens at price ``p`` is ``n * p`` micro-dollars. Sums are exact (each price is
read back as the decimal written in the file, then added as a fraction) and rounded up
once, to a whole micro-dollar, so no float drift ever lets a budget pass a cent early.

The shipped table (``prices.json``, beside this module) says when and where it was
taken. An operator's override file has the same shape and is merged over it per
provider and model: a model it names replaces the shipped entry of that model, every
other shipped model stays, so adding one model takes one entry. ``taken_on`` and
``source`` are optional in an override and, when given, replace the shipped ones::

    {"taken_on": "2027-01-15", "source": "our contract, schedule B",
     "providers": {"anthropic": {"claude-next": {"input": 4, "output": 20,
         "cache_write_5m": 5, "cache_write_1h": 8, "cache_read": 0.4}}}}

Every entry names all five prices; unknown keys are refused, so a typo cannot leave a
price at zero. Errors are :class:`muster.errors.ConfigError` naming the file and field.
"""

from __future__ import annotations

import datetime
import importlib.resources
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

from muster.errors import ConfigError

__all__ = ["PRICE_FIELDS", "ModelPrice", "PriceTable", "TokenUsage"]

PRICE_FIELDS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
"""The five prices of a model, in the order of :class:`ModelPrice`."""

MAX_PRICE = 1_000_000
"""Highest price accepted (USD per million tokens): far above any real one, and low
enough that no sane token count overflows a budget counter."""

_VERSIONED = re.compile(r"^(?P<base>.+)-(?:\d{8}|latest)$")
"""Anthropic model ids carry a snapshot date (``claude-sonnet-4-5-20250929``) or
``-latest``; both cost what the undated alias costs."""


def _is_price(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value <= MAX_PRICE  # False for NaN; infinities and huge ints are too big


def _exact(value: float) -> Fraction:
    """The decimal a price was written as: ``repr`` gives the shortest decimal that
    reads back as the same float, so 0.3 is 3/10 here, not 0.29999999999999998889..."""
    return Fraction(repr(float(value)))


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens of one attempt, as the provider counts them.

    ``cache_creation_tokens`` are all tokens written to the prompt cache (both TTLs,
    like Anthropic's ``cache_creation_input_tokens``); ``cache_creation_1h_tokens`` is
    the part of them written with the 1-hour TTL. ``input_tokens`` excludes both cache
    kinds, as in Anthropic's ``usage``.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_tokens: int = 0
    cache_creation_1h_tokens: int = 0
    cache_read_tokens: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{f.name} must be a non-negative integer, not {value!r}")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's prices in USD per million tokens (= micro-dollars per token)."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float

    def __post_init__(self) -> None:
        for name in PRICE_FIELDS:
            value = getattr(self, name)
            if not _is_price(value):
                raise ValueError(f"{name} must be a number from 0 to {MAX_PRICE:,}, not {value!r}")

    def cost_micros(self, u: TokenUsage) -> int:
        """What ``u`` costs, in micro-dollars, rounded up.

        1-hour cache writes are priced as such even if a report claims more of them than
        cache writes in all: the 5-minute part is then zero, never negative.
        """
        five_minute = max(0, u.cache_creation_tokens - u.cache_creation_1h_tokens)
        total = (
            u.input_tokens * _exact(self.input)
            + u.output_tokens * _exact(self.output)
            + five_minute * _exact(self.cache_write_5m)
            + u.cache_creation_1h_tokens * _exact(self.cache_write_1h)
            + u.cache_read_tokens * _exact(self.cache_read)
        )
        return math.ceil(total)

    def worst_case_micros(self, input_tokens: int, max_tokens: int) -> int:
        """The most an attempt can cost: every input token at the dearest input-side
        price (plain input or a cache write, whichever is higher) and ``max_tokens``
        of output. This is what dispatch reserves."""
        for name, value in (("input_tokens", input_tokens), ("max_tokens", max_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
        dearest_input = max(
            _exact(self.input), _exact(self.cache_write_5m), _exact(self.cache_write_1h)
        )
        return math.ceil(input_tokens * dearest_input + max_tokens * _exact(self.output))


class PriceTable:
    """Prices per provider and model; :meth:`load` reads the shipped table (and an
    override merged over it, see the module docstring)."""

    __slots__ = ("_prices", "source", "taken_on")

    def __init__(
        self,
        prices: dict[str, dict[str, ModelPrice]],
        *,
        taken_on: datetime.date,
        source: str,
    ) -> None:
        self._prices = {provider: dict(models) for provider, models in prices.items()}
        self.taken_on = taken_on
        """The date the prices were read."""
        self.source = source
        """Where they came from."""

    def __repr__(self) -> str:
        counts = ", ".join(f"{p}: {len(m)}" for p, m in sorted(self._prices.items()))
        return f"PriceTable(taken_on={self.taken_on.isoformat()}, {counts})"

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        """The shipped prices, with ``override`` (a file of the same shape) merged over
        them per provider and model. A missing, unreadable or invalid file is a
        ConfigError naming the file and the field."""
        shipped = importlib.resources.files("muster.server.ai").joinpath("prices.json")
        base = _parse(shipped.read_text(encoding="utf-8"), "prices.json (shipped)", full=True)
        taken_on, source, prices = base
        assert taken_on is not None and source is not None  # full=True requires them
        if override is not None:
            where = str(override)
            try:
                text = override.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ConfigError(f"price file {where}: cannot read it: {err}") from None
            o_taken_on, o_source, o_prices = _parse(text, where, full=False)
            taken_on = o_taken_on or taken_on
            source = o_source or source
            for provider, models in o_prices.items():
                prices.setdefault(provider, {}).update(models)
        return cls(prices, taken_on=taken_on, source=source)

    def price(self, provider: str, model: str) -> ModelPrice | None:
        """The price of ``model``: its own entry, else that of its undated alias
        (``claude-sonnet-4-5-20250929`` -> ``claude-sonnet-4-5``, likewise ``-latest``),
        else the provider's ``"*"`` entry; None if the model has no price (refuse it)."""
        models = self._prices.get(provider)
        if models is None:
            return None
        found = models.get(model)
        if found is None and (versioned := _VERSIONED.match(model)):
            found = models.get(versioned["base"])
        return found if found is not None else models.get("*")

    def models(self, provider: str) -> list[str]:
        """The model names priced for ``provider``, sorted (``"*"`` included if any)."""
        return sorted(self._prices.get(provider, {}))

    def providers(self) -> list[str]:
        """The providers with a price list, sorted."""
        return sorted(self._prices)


def _parse(
    text: str, where: str, *, full: bool
) -> tuple[datetime.date | None, str | None, dict[str, dict[str, ModelPrice]]]:
    def fail(field: str, message: str) -> ConfigError:
        return ConfigError(f"price file {where}: {field}: {message}")

    try:
        doc = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"price file {where}: not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise fail("(top level)", "must be an object")
    unknown = sorted(set(doc) - {"taken_on", "source", "providers"})
    if unknown:
        raise fail(unknown[0], "unknown key (expected taken_on, source, providers)")

    taken_on: datetime.date | None = None
    if "taken_on" in doc or full:
        raw = doc.get("taken_on")
        if not isinstance(raw, str):
            raise fail("taken_on", "required: the date the prices were read, YYYY-MM-DD")
        try:
            taken_on = datetime.date.fromisoformat(raw)
        except ValueError:
            raise fail("taken_on", f"{raw[:40]!r} is not a date (YYYY-MM-DD)") from None
    source: str | None = None
    if "source" in doc or full:
        source = doc.get("source")
        if not isinstance(source, str) or not source.strip():
            raise fail("source", "required: where the prices came from (non-empty text)")

    providers = doc.get("providers")
    if not isinstance(providers, dict):
        raise fail("providers", "required: an object of provider -> model -> prices")
    prices: dict[str, dict[str, ModelPrice]] = {}
    for provider, models in providers.items():
        if not provider:
            raise fail("providers", "a provider name must not be empty")
        if not isinstance(models, dict):
            raise fail(f"providers.{provider}", "must be an object of model -> prices")
        prices[provider] = {}
        for model, entry in models.items():
            path = f"providers.{provider}.{model}"
            if not model:
                raise fail(f"providers.{provider}", "a model name must not be empty")
            prices[provider][model] = _model_price(entry, path, fail)
    return taken_on, source, prices


def _model_price(entry: Any, path: str, fail: Callable[[str, str], ConfigError]) -> ModelPrice:
    if not isinstance(entry, dict):
        raise fail(path, f"must be an object with {', '.join(PRICE_FIELDS)}")
    unknown = sorted(set(entry) - set(PRICE_FIELDS))
    if unknown:
        raise fail(f"{path}.{unknown[0]}", f"unknown price (expected {', '.join(PRICE_FIELDS)})")
    values: list[float] = []
    for name in PRICE_FIELDS:
        if name not in entry:
            raise fail(f"{path}.{name}", "missing (USD per million tokens; 0 if free)")
        value = entry[name]
        if not _is_price(value):
            raise fail(
                f"{path}.{name}",
                f"must be a number from 0 to {MAX_PRICE:,}, not {str(value)[:40]}",
            )
        values.append(float(value))
    return ModelPrice(*values)
