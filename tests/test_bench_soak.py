"""The soak scenario's slope: what it reports against issue 10's 0.5 MiB per 10 minutes."""

from __future__ import annotations

import math

from bench.scenarios.soak import slope_per_10_minutes

MIB = 2**20


def test_a_steady_climb_is_reported_per_10_minutes() -> None:
    # 3 MiB per 10 minutes, sampled every 5 s for 20 minutes, with sawtooth noise.
    samples = [
        (t * 5.0, int(100 * MIB + t * 5.0 * 3 * MIB / 600 + (t % 3) * 4096)) for t in range(240)
    ]
    assert math.isclose(slope_per_10_minutes(samples), 3.0, rel_tol=0.01)


def test_a_flat_series_is_flat_and_too_few_samples_say_nothing() -> None:
    assert slope_per_10_minutes([(float(t), 100 * MIB) for t in range(10)]) == 0.0
    assert math.isnan(slope_per_10_minutes([(0.0, MIB), (5.0, 2 * MIB)]))
