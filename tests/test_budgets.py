"""Budget rules: scopes, UTC calendar windows and the keys they count under."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from muster.server.ai.budgets import PERIODS, BudgetRule, check_scope
from muster.server.quotas.base import BudgetHold


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


@pytest.mark.parametrize(
    "scope",
    ["global", "tenant:acme", "pool:gpu-1", "pool:a.b_c", "task:t_0123456789abcdef01234567"],
)
def test_valid_scopes(scope: str) -> None:
    assert check_scope(scope) == scope


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ("", "expected global, tenant:<name>"),
        ("globals", "expected global, tenant:<name>"),
        ("tenant", "expected global, tenant:<name>"),
        ("tenant:", "tenant name '' is not valid"),
        ("tenant:Acme", "tenant name 'Acme' is not valid"),
        ("tenant:acme:x", "tenant name 'acme:x' is not valid"),
        ("pool:-gpu", "pool name '-gpu' is not valid"),
        ("pool:" + "a" * 64, "is not valid"),
        ("task:", "is not a task id"),
        ("task:a b", "is not a task id"),
        ("user:bob", "unknown kind 'user'"),
        ("global:x", "unknown kind 'global'"),
    ],
)
def test_invalid_scopes_say_why(scope: str, message: str) -> None:
    with pytest.raises(ValueError, match="budget scope") as err:
        check_scope(scope)
    assert message in str(err.value)


def test_rule_validation() -> None:
    assert PERIODS == ("day", "month", "none")
    assert BudgetRule("global", 0).period == "month"
    with pytest.raises(ValueError, match="budget period 'week' is not valid"):
        BudgetRule("global", 1, "week")
    with pytest.raises(ValueError, match="non-negative number of micro-dollars"):
        BudgetRule("global", -1)
    with pytest.raises(ValueError, match="non-negative number of micro-dollars"):
        BudgetRule("global", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="budget scope"):
        BudgetRule("tenant:", 1)


def test_month_windows_and_keys() -> None:
    rule = BudgetRule("tenant:acme", 10_000_000, "month")
    now = utc(2026, 12, 6, 2, 31)
    assert rule.window(now) == (utc(2026, 12, 1), utc(2027, 1, 1))
    assert rule.key(now) == "budget:tenant:acme:2026-12"
    # The last microsecond of the year is still December; midnight is January.
    assert rule.key(utc(2026, 12, 31, 23, 59, 59, 999_999)) == "budget:tenant:acme:2026-12"
    assert rule.key(utc(2027, 1, 1)) == "budget:tenant:acme:2027-01"
    assert rule.window(utc(2027, 1, 1)) == (utc(2027, 1, 1), utc(2027, 2, 1))
    # February of a leap year ends on the 29th.
    assert rule.window(utc(2028, 2, 29, 12)) == (utc(2028, 2, 1), utc(2028, 3, 1))


def test_day_windows_and_keys() -> None:
    rule = BudgetRule("global", 1, "day")
    assert rule.key(utc(2026, 12, 6, 0, 0)) == "budget:global:2026-12-06"
    assert rule.key(utc(2026, 12, 6, 23, 59, 59, 999_999)) == "budget:global:2026-12-06"
    assert rule.key(utc(2026, 12, 7)) == "budget:global:2026-12-07"
    assert rule.window(utc(2026, 12, 31, 18)) == (utc(2026, 12, 31), utc(2027, 1, 1))
    assert rule.key(utc(2026, 12, 31, 18)) == "budget:global:2026-12-31"


def test_none_is_one_budget_forever() -> None:
    rule = BudgetRule("task:t_1", 5, "none")
    assert rule.window(utc(2026, 1, 1)) == (None, None)
    assert rule.key(utc(2026, 1, 1)) == rule.key(utc(2099, 7, 1)) == "budget:task:t_1:all"
    assert rule.hold(utc(2026, 1, 1)) == BudgetHold("budget:task:t_1:all", 5, None)


def test_windows_are_utc_whatever_the_zone_of_now() -> None:
    rule = BudgetRule("pool:gpu", 1, "day")
    # 23:30 on the 6th in New York is 04:30 on the 7th in UTC.
    new_york = timezone(timedelta(hours=-5))
    assert rule.key(datetime(2026, 12, 6, 23, 30, tzinfo=new_york)) == "budget:pool:gpu:2026-12-07"
    # Naive times are taken as UTC.
    assert rule.key(datetime(2026, 12, 6, 23, 30)) == "budget:pool:gpu:2026-12-06"
    monthly = BudgetRule("pool:gpu", 1, "month")
    tokyo = timezone(timedelta(hours=9))
    assert monthly.key(datetime(2027, 1, 1, 8, tzinfo=tokyo)) == "budget:pool:gpu:2026-12"


def test_hold_carries_key_limit_and_period_end() -> None:
    now = utc(2026, 12, 6, 2, 31)
    hold = BudgetRule("tenant:acme", 7, "month").hold(now)
    assert hold == BudgetHold("budget:tenant:acme:2026-12", 7, utc(2027, 1, 1).timestamp())
    day = BudgetRule("global", 9, "day").hold(now)
    assert day.expires_at == utc(2026, 12, 7).timestamp()
