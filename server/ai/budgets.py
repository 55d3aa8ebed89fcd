"""Budget rules: a limit in micro-dollars on one scope, per UTC calendar period.

A rule names the quota-store key its spend is counted under. The key carries the period
(``budget:tenant:acme:2026-12``), so a new month or day starts from zero without any
reset job, and the last period's key simply expires (see ``BudgetHold.expires_at``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from muster.server.quotas.base import BudgetHold
from muster.server.services.validation import NAME

__all__ = ["PERIODS", "SCOPE_KINDS", "BudgetRule", "check_scope"]

PERIODS = ("day", "month", "none")
"""UTC calendar day, UTC calendar month, or one budget forever."""

SCOPE_KINDS = ("global", "tenant", "pool", "task")
"""``global``, ``tenant:<name>``, ``pool:<name>``, ``task:<task_id>``."""

_TASK_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def check_scope(scope: str) -> str:
    """``scope`` if it is a valid budget scope; a ValueError saying what is expected
    otherwise."""
    expected = "expected global, tenant:<name>, pool:<name> or task:<task_id>"
    if scope == "global":
        return scope
    kind, sep, name = scope.partition(":")
    if not sep:
        raise ValueError(f"budget scope {scope[:70]!r} is not valid: {expected}")
    if kind in ("tenant", "pool"):
        if not NAME.fullmatch(name):
            raise ValueError(
                f"budget scope {scope[:70]!r}: {kind} name {name[:63]!r} is not valid "
                "(1-63 lower-case letters, digits, '.', '_', '-', starting with a letter "
                "or digit)"
            )
        return scope
    if kind == "task":
        if not _TASK_ID.fullmatch(name):
            raise ValueError(f"budget scope {scope[:70]!r}: {name[:63]!r} is not a task id")
        return scope
    raise ValueError(f"budget scope {scope[:70]!r} has an unknown kind {kind[:20]!r}: {expected}")


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """At most ``limit_micros`` spent (settled plus reserved) on ``scope`` per ``period``."""

    scope: str
    limit_micros: int
    period: str = "month"

    def __post_init__(self) -> None:
        check_scope(self.scope)
        if (
            not isinstance(self.limit_micros, int)
            or isinstance(self.limit_micros, bool)
            or self.limit_micros < 0
        ):
            raise ValueError(
                f"budget limit must be a non-negative number of micro-dollars, "
                f"not {self.limit_micros!r}"
            )
        if self.period not in PERIODS:
            raise ValueError(
                f"budget period {self.period[:20]!r} is not valid: expected {', '.join(PERIODS)}"
            )

    def window(self, now: datetime) -> tuple[datetime | None, datetime | None]:
        """The UTC period containing ``now``: (start, end), end exclusive; (None, None)
        for ``none``. A naive ``now`` is taken as UTC."""
        now = _utc(now)
        if self.period == "day":
            start = now.replace(hour=0, minute=0, second=0, microsecond=0)
            return start, start + timedelta(days=1)
        if self.period == "month":
            start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            if start.month == 12:
                return start, start.replace(year=start.year + 1, month=1)
            return start, start.replace(month=start.month + 1)
        return None, None

    def key(self, now: datetime) -> str:
        """The quota-store key of the period containing ``now``:
        ``budget:<scope>:YYYY-MM-DD`` (day), ``budget:<scope>:YYYY-MM`` (month) or
        ``budget:<scope>:all`` (none)."""
        start, _ = self.window(now)
        if start is None:
            return f"budget:{self.scope}:all"
        if self.period == "day":
            return f"budget:{self.scope}:{start:%Y-%m-%d}"
        return f"budget:{self.scope}:{start:%Y-%m}"

    def hold(self, now: datetime) -> BudgetHold:
        """What :meth:`~server.quotas.base.QuotaStore.reserve_budgets` needs for this
        rule at ``now``: the period's key, the limit and the period's end."""
        _, end = self.window(now)
        return BudgetHold(
            self.key(now), self.limit_micros, None if end is None else end.timestamp()
        )


def _utc(now: datetime) -> datetime:
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
