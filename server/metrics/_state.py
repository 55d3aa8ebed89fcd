"""A gauge whose series are a snapshot of state, replaced as a whole or computed at scrape.

Why not ``prometheus_client.Gauge``: per-pool state (queue depth, oldest age) comes
and goes with the pools; a snapshot must drop the series of a pool that vanished, and
``Gauge.set_function`` only works on one fixed series.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["StateGauge", "StateValues"]

_log = logging.getLogger(__name__)

StateValues = Mapping[str, float] | Mapping[tuple[str, ...], float]
"""Series values keyed by label value (one label) or by a tuple of label values."""


class StateGauge(Collector):
    """A labeled gauge fed either by :meth:`update` (a pushed snapshot) or by
    :meth:`set_function` (a callback run at every scrape; it must be quick and sync)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None,
    ) -> None:
        if not labelnames:
            raise ValueError("StateGauge needs at least one label; use Gauge otherwise")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._function: Callable[[], StateValues] | None = None
        if registry is not None:
            registry.register(self)

    def update(self, values: StateValues) -> None:
        """Replace every series with ``values``; series not in ``values`` disappear."""
        # Build first, then swap the reference: a scrape never sees half an update.
        self._values = {self._key(k): float(v) for k, v in values.items()}

    def set(self, labels: str | tuple[str, ...], value: float) -> None:
        """Set one series, keeping the others."""
        self._values = {**self._values, self._key(labels): float(value)}

    def inc(self, labels: str | tuple[str, ...], amount: float = 1.0) -> None:
        """Add ``amount`` to one series (created at 0), keeping the others."""
        key = self._key(labels)
        self._values = {**self._values, key: self._values.get(key, 0.0) + amount}

    def dec(self, labels: str | tuple[str, ...], amount: float = 1.0) -> None:
        """Subtract ``amount`` from one series."""
        self.inc(labels, -amount)

    def set_function(self, function: Callable[[], StateValues] | None) -> None:
        """Compute the series at scrape time with ``function`` (None: back to snapshots)."""
        self._function = function

    def values(self) -> dict[tuple[str, ...], float]:
        """The series as a scrape would see them now."""
        function = self._function
        if function is None:
            return dict(self._values)
        return {self._key(k): float(v) for k, v in function().items()}

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        try:
            values = self.values()
        except Exception:
            # A broken callback must not take the whole /metrics page down with it.
            _log.exception("computing %s failed; exporting no series", self.name)
            values = {}
        for labels, value in sorted(values.items()):
            family.add_metric(list(labels), value)
        yield family

    def _key(self, labels: str | tuple[str, ...]) -> tuple[str, ...]:
        key = (labels,) if isinstance(labels, str) else tuple(labels)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {key!r}")
        return key
