"""Human durations (``30s``, ``10m``, ``1h30m``, ``7d``) and relative times (``-1h``).

One parser for every CLI flag and setting that takes a duration, so they all agree.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str) -> timedelta:
    """``"10m"`` -> 10 minutes; units ms, s, m, h, d, w, combinable (``1h30m``).

    A bare number is seconds. Raises ValueError, naming the accepted forms.
    """
    value = text.strip().lower()
    if not value:
        raise ValueError("empty duration (use e.g. 30s, 10m, 1h, 7d)")
    try:
        seconds = float(value)
    except ValueError:
        pos, seconds = 0, 0.0
        for match in _PART.finditer(value):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(value) or pos == 0:
            raise ValueError(
                f"invalid duration {text[:40]!r} (use e.g. 30s, 10m, 1h, 7d or 1h30m)"
            ) from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"invalid duration {text[:40]!r}: must be a finite, non-negative time")
    return timedelta(seconds=seconds)


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """An aware datetime from ISO 8601 or a duration relative to now (``-1h`` = an hour ago).

    A naive ISO time is taken as local time, as a person typing it would mean.
    """
    value = text.strip()
    if value[:1] in "-+" and value[1:2].isdigit():
        base = now if now is not None else datetime.now(UTC)
        delta = parse_duration(value[1:])
        return base - delta if value[0] == "-" else base + delta
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"invalid time {text[:40]!r} (use ISO 8601 like 2024-05-01T12:00:00Z, or -1h)"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.astimezone()
