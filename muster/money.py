"""Money as Muster counts it: whole micro-dollars (USD * 10^6), shared by the server's
messages and the CLI so both print an amount the same way."""

from __future__ import annotations

MICROS_PER_USD = 1_000_000
"""Money is kept in whole micro-dollars (USD * 10^6); USD floats are for display only."""


def usd(micros: int) -> float:
    """Micro-dollars as US dollars."""
    return micros / MICROS_PER_USD


def format_usd(micros: int) -> str:
    """Micro-dollars as dollars, exactly: at least two decimals, at most six
    (``12.50``, ``0.00711``), so a small budget's figures stay readable."""
    sign = "-" if micros < 0 else ""
    dollars, rest = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{dollars}.{f'{rest:06d}'.rstrip('0').ljust(2, '0')}"
