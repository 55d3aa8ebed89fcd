"""Reconnect backoff: capped, exponential, fully jittered."""

from __future__ import annotations

import pytest

from muster.agent.backoff import Backoff


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


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_after_a_drain_retries_stay_steady_then_grow() -> None:
    clock = FakeClock()
    backoff = Backoff(0.2, 30.0, rand=lambda low, high: high, clock=clock)
    for _ in range(8):
        backoff.next_delay()
    backoff.reset(steady=True)
    # A replica restarting: the fleet keeps retrying within one jittered second...
    for _ in range(38):  # 15 s
        assert backoff.next_delay() == pytest.approx(1.0)
        clock.now += 0.4
    # ...and once it has been gone for longer, the window grows to the cap as before.
    assert not backoff.steady
    delays = [backoff.next_delay() for _ in range(12)]
    assert delays[:3] == pytest.approx([0.2, 0.4, 0.8])
    assert delays[-1] == 30.0


def test_steady_delays_are_jittered_and_never_beyond_the_cap() -> None:
    backoff = Backoff(0.05, 0.2)
    backoff.reset(steady=True)
    delays = [backoff.next_delay() for _ in range(50)]
    assert all(0.0 <= d <= 0.2 for d in delays)
    assert len(set(delays)) > 1


def test_a_plain_reset_is_not_steady() -> None:
    backoff = Backoff(0.2, 30.0, rand=lambda low, high: high)
    backoff.reset()
    assert [backoff.next_delay() for _ in range(3)] == pytest.approx([0.2, 0.4, 0.8])
