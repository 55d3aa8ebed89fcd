"""Prices: the shipped table, exact cost arithmetic and the operator's override file."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from muster.errors import ConfigError
from muster.server.ai.prices import PRICE_FIELDS, ModelPrice, PriceTable, TokenUsage

SONNET = ModelPrice(input=3, output=15, cache_write_5m=3.75, cache_write_1h=6, cache_read=0.3)
HAIKU_35 = ModelPrice(input=0.8, output=4, cache_write_5m=1, cache_write_1h=1.6, cache_read=0.08)


def _write(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc), encoding="utf-8")
    return path


# --- the shipped table ---------------------------------------------------------------


def test_shipped_table_says_when_and_where() -> None:
    table = PriceTable.load()
    assert table.taken_on == datetime.date(2026, 12, 6)
    assert "platform.claude.com" in table.source
    assert table.providers() == ["anthropic", "ollama"]


@pytest.mark.parametrize(
    ("model", "inp", "out"),
    [
        ("claude-opus-4-5", 5, 25),
        ("claude-opus-4-1", 15, 75),
        ("claude-opus-4", 15, 75),
        ("claude-sonnet-4-5", 3, 15),
        ("claude-sonnet-4", 3, 15),
        ("claude-haiku-4-5", 1, 5),
        ("claude-3-5-haiku", 0.8, 4),
    ],
)
def test_shipped_anthropic_prices_follow_the_cache_multipliers(
    model: str, inp: float, out: float
) -> None:
    price = PriceTable.load().price("anthropic", model)
    assert price is not None
    assert (price.input, price.output) == (inp, out)
    # Anthropic's published multipliers: 5 min write 1.25x, 1 h write 2x, read 0.1x.
    assert price.cache_write_5m == pytest.approx(inp * 1.25)
    assert price.cache_write_1h == pytest.approx(inp * 2)
    assert price.cache_read == pytest.approx(inp * 0.1)


def test_dated_and_latest_ids_cost_what_their_alias_costs() -> None:
    table = PriceTable.load()
    assert table.price("anthropic", "claude-sonnet-4-5-20250929") == table.price(
        "anthropic", "claude-sonnet-4-5"
    )
    assert table.price("anthropic", "claude-opus-4-20250514") == table.price(
        "anthropic", "claude-opus-4"
    )
    assert table.price("anthropic", "claude-3-5-haiku-latest") == table.price(
        "anthropic", "claude-3-5-haiku"
    )


def test_unknown_models_and_providers_have_no_price() -> None:
    table = PriceTable.load()
    assert table.price("anthropic", "claude-unknown-9") is None
    assert table.price("anthropic", "claude-sonnet-4-5-2025") is None  # not a date suffix
    assert table.price("gemini", "anything") is None
    assert table.models("gemini") == []


def test_ollama_is_free_for_any_model() -> None:
    table = PriceTable.load()
    price = table.price("ollama", "llama3.1:8b")
    assert price is not None
    assert price.cost_micros(TokenUsage(10**9, 10**9, 10**6, 10**5, 10**6)) == 0
    assert table.models("ollama") == ["*"]


# --- arithmetic ------------------------------------------------------------------------


def test_cost_is_tokens_times_price_in_micro_dollars() -> None:
    # 1000 input at $3/MTok = 3000 micro-dollars; 200 output at $15/MTok = 3000.
    assert SONNET.cost_micros(TokenUsage(input_tokens=1000, output_tokens=200)) == 6000


def test_cache_tiers_are_priced_apart() -> None:
    usage = TokenUsage(
        input_tokens=10,
        output_tokens=20,
        cache_creation_tokens=1000,  # all TTLs: 600 at 5 min, 400 at 1 h
        cache_creation_1h_tokens=400,
        cache_read_tokens=5000,
    )
    expected = 10 * 3 + 20 * 15 + 600 * 3.75 + 400 * 6 + 5000 * 0.3
    assert SONNET.cost_micros(usage) == expected == 6480


def test_cost_rounds_up_once_and_exactly() -> None:
    # 1 cache read at $0.30/MTok is 0.3 micro-dollars: rounds up to 1.
    assert SONNET.cost_micros(TokenUsage(cache_read_tokens=1)) == 1
    assert SONNET.cost_micros(TokenUsage(cache_read_tokens=10)) == 3
    # 6 one-hour writes at $1.60 and 5 reads at $0.08 are exactly 10 micro-dollars;
    # in floats the sum is 10.000000000000002, which would round up to 11.
    assert 6 * 1.6 + 5 * 0.08 > 10
    usage = TokenUsage(cache_creation_tokens=6, cache_creation_1h_tokens=6, cache_read_tokens=5)
    assert HAIKU_35.cost_micros(usage) == 10
    # Rounding happens on the sum, not per term: 0.3 + 0.3 + 0.3 + 0.1 ... stays exact.
    assert SONNET.cost_micros(TokenUsage(input_tokens=1, cache_read_tokens=1)) == 4  # 3.3
    assert HAIKU_35.cost_micros(TokenUsage(cache_read_tokens=25)) == 2
    assert HAIKU_35.cost_micros(TokenUsage(cache_read_tokens=26)) == 3  # 2.08


def test_cost_of_nothing_is_zero() -> None:
    assert SONNET.cost_micros(TokenUsage()) == 0


def test_large_usage_stays_exact() -> None:
    usage = TokenUsage(input_tokens=10**12 + 1, cache_read_tokens=10**12 + 7)
    # 3 * (10**12 + 1) + 0.3 * (10**12 + 7) = 3.3e12 + 3 + 2.1 -> ceil 3_300_000_000_006
    assert SONNET.cost_micros(usage) == 3_300_000_000_006


def test_one_hour_writes_never_make_the_five_minute_part_negative() -> None:
    usage = TokenUsage(cache_creation_tokens=100, cache_creation_1h_tokens=300)
    assert SONNET.cost_micros(usage) == 300 * 6


def test_worst_case_uses_the_dearest_input_price_and_full_output() -> None:
    # Sonnet: the 1 h cache write ($6) is the dearest way to send input.
    assert SONNET.worst_case_micros(1000, 500) == 1000 * 6 + 500 * 15
    assert SONNET.worst_case_micros(0, 0) == 0
    odd = ModelPrice(input=0.1, output=0.3, cache_write_5m=0.1, cache_write_1h=0.1, cache_read=0)
    assert odd.worst_case_micros(1, 1) == 1  # 0.4 -> 1
    assert odd.worst_case_micros(3, 9) == 3  # 0.3 + 2.7 = 3 exactly
    # The worst case bounds any real cost of that many tokens.
    for split in range(0, 1001, 100):
        usage = TokenUsage(
            input_tokens=1000 - split,
            output_tokens=500,
            cache_creation_tokens=split,
            cache_creation_1h_tokens=split // 2,
        )
        assert SONNET.cost_micros(usage) <= SONNET.worst_case_micros(1000, 500)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_token_counts_must_be_non_negative_integers(bad: Any) -> None:
    with pytest.raises(ValueError, match="output_tokens must be a non-negative integer"):
        TokenUsage(output_tokens=bad)
    with pytest.raises(ValueError, match="max_tokens"):
        SONNET.worst_case_micros(1, bad)


@pytest.mark.parametrize("bad", [-0.01, float("nan"), float("inf"), 10**7])
def test_prices_must_be_sane_numbers(bad: float) -> None:
    with pytest.raises(ValueError, match="cache_read must be a number from 0"):
        ModelPrice(input=1, output=1, cache_write_5m=1, cache_write_1h=1, cache_read=bad)


# --- the override file -----------------------------------------------------------------

NEXT = {"input": 4, "output": 20, "cache_write_5m": 5, "cache_write_1h": 8, "cache_read": 0.4}


def test_override_adds_one_model_and_keeps_the_rest(tmp_path: Path) -> None:
    path = _write(tmp_path, {"providers": {"anthropic": {"claude-next": NEXT}}})
    table = PriceTable.load(path)
    assert table.price("anthropic", "claude-next") == ModelPrice(**NEXT)
    assert table.price("anthropic", "claude-sonnet-4-5") == SONNET
    assert table.price("ollama", "llama3") is not None
    # No date or source given: the shipped ones stand.
    assert table.taken_on == PriceTable.load().taken_on
    assert table.source == PriceTable.load().source


def test_override_replaces_a_shipped_model_and_adds_providers(tmp_path: Path) -> None:
    cheaper = dict(NEXT, input=2.5)
    path = _write(
        tmp_path,
        {
            "taken_on": "2027-01-15",
            "source": "our contract",
            "providers": {
                "anthropic": {"claude-sonnet-4-5": cheaper},
                "gemini": {"gemini-pro": NEXT},
            },
        },
    )
    table = PriceTable.load(path)
    assert table.price("anthropic", "claude-sonnet-4-5") == ModelPrice(**cheaper)
    assert table.price("anthropic", "claude-sonnet-4-5-20250929") == ModelPrice(**cheaper)
    assert table.price("anthropic", "claude-opus-4-5") is not None
    assert table.price("gemini", "gemini-pro") == ModelPrice(**NEXT)
    assert table.taken_on == datetime.date(2027, 1, 15)
    assert table.source == "our contract"


def test_override_star_prices_any_unlisted_model(tmp_path: Path) -> None:
    path = _write(tmp_path, {"providers": {"anthropic": {"*": NEXT}}})
    table = PriceTable.load(path)
    assert table.price("anthropic", "claude-whatever") == ModelPrice(**NEXT)
    assert table.price("anthropic", "claude-haiku-4-5") != ModelPrice(**NEXT)


@pytest.mark.parametrize(
    ("doc", "field", "message"),
    [
        ("{not json", None, "not valid JSON"),
        ([], "(top level)", "must be an object"),
        ({"providers": {}, "prices": {}}, "prices", "unknown key"),
        ({}, "providers", "required"),
        ({"providers": []}, "providers", "required"),
        ({"providers": {"anthropic": []}}, "providers.anthropic", "must be an object"),
        ({"providers": {"anthropic": {"m": 3}}}, "providers.anthropic.m", "must be an object"),
        (
            {"providers": {"anthropic": {"m": {k: v for k, v in NEXT.items() if k != "output"}}}},
            "providers.anthropic.m.output",
            "missing",
        ),
        (
            {"providers": {"anthropic": {"m": dict(NEXT, cache_read_1h=1)}}},
            "providers.anthropic.m.cache_read_1h",
            "unknown price",
        ),
        (
            {"providers": {"anthropic": {"m": dict(NEXT, input=-1)}}},
            "providers.anthropic.m.input",
            "must be a number from 0",
        ),
        (
            {"providers": {"anthropic": {"m": dict(NEXT, input="3")}}},
            "providers.anthropic.m.input",
            "must be a number from 0",
        ),
        (
            {"providers": {"anthropic": {"m": dict(NEXT, output=True)}}},
            "providers.anthropic.m.output",
            "must be a number from 0",
        ),
        (
            {"providers": {"anthropic": {"m": dict(NEXT, output=10**400)}}},
            "providers.anthropic.m.output",
            "must be a number from 0",
        ),
        (
            '{"providers": {"anthropic": {"m": {"input": NaN}}}}',
            "providers.anthropic.m.input",
            "must be a number from 0",
        ),
        ({"taken_on": "last tuesday", "providers": {}}, "taken_on", "is not a date"),
        ({"taken_on": 20270115, "providers": {}}, "taken_on", "required"),
        ({"source": "", "providers": {}}, "source", "required"),
    ],
)
def test_a_bad_override_names_the_file_and_the_field(
    tmp_path: Path, doc: Any, field: str | None, message: str
) -> None:
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as err:
        PriceTable.load(path)
    text = str(err.value)
    assert text.startswith(f"price file {path}: ")
    if field is not None:
        assert f": {field}: " in text
    assert message in text


def test_a_missing_override_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"price file .*nope\.json: cannot read it"):
        PriceTable.load(tmp_path / "nope.json")


def test_every_price_field_is_named_in_order() -> None:
    assert PRICE_FIELDS == ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
