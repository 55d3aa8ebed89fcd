"""Reconnect backoff: capped, exponential, fully jittered."""

from __future__ import annotations

import pytest

from agent.backoff import Backoff


def test_the_window_doubles_up_to_the_cap() -> None:
    backoff = Backoff(0.2, 30.0, rand=lambda low, high: high)
    delays = [backoff.next_delay() for _ in range(12)]
    assert delays[:4] == pytest.approx([0.2, 0.4, 0.8, 1.6])
    assert max(delays) == 30.0
    assert delays[-1] == 30.0


def test_delays_are_jittered_within_bounds() -> None:
    backoff = Backoff(0.2, 30.0)
    for attempt in range(200):
        ceiling = backoff.ceiling()
        delay = backoff.next_delay()
        assert 0.0 <= delay <= ceiling <= 30.0
        assert ceiling == pytest.approx(min(30.0, 0.2 * 2 ** min(attempt, 64)))
    assert len({round(Backoff(0.2, 30.0).next_delay(), 6) for _ in range(20)}) > 1


def test_reset_starts_again_small() -> None:
    backoff = Backoff(0.2, 30.0, rand=lambda low, high: high)
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() == pytest.approx(0.2)


def test_max_delay_stays_near_the_cap() -> None:
    backoff = Backoff(0.2, 30.0)
    for _ in range(100):
        assert 15.0 <= backoff.max_delay() <= 30.0


def test_a_very_long_outage_does_not_overflow() -> None:
    backoff = Backoff(0.2, 30.0)
    for _ in range(5000):
        assert backoff.next_delay() <= 30.0


@pytest.mark.parametrize(("initial", "maximum"), [(0, 1), (-1, 1), (2, 1)])
def test_nonsense_bounds_are_refused(initial: float, maximum: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial, maximum)
