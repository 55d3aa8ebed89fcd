"""What a scenario hands back: figures measured per run, summarised as median and min-max."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): an observed value, not an interpolation."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Summary:
    median: float
    min: float
    max: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        good = [v for v in values if not math.isnan(v)]
        if not good:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(good), min(good), max(good), len(good))


@dataclass
class Figure:
    """One row of the report's table: Muster's value, the reference's, and their ratio per run."""

    scenario: str
    figure: str
    unit: str
    muster: list[float]
    reference_name: str = "-"
    reference: list[float] = field(default_factory=list)
    ratio_name: str = ""
    """What the ratio is, e.g. ``Muster / Celery``; empty when there is no ratio."""
    ratio: list[float] = field(default_factory=list)
    target: str = "report"
    met: bool | None = None
    """Whether the median meets ``target``; None for report-only figures and failures."""
    error: str = ""
    """Why there is no value (e.g. an API not available yet); the row says so."""
    key: str = ""
    """The row of the targets table (``bench/targets.py``) this figure answers, if any."""

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["muster_summary"] = asdict(Summary.of(self.muster))
        out["reference_summary"] = asdict(Summary.of(self.reference))
        out["ratio_summary"] = asdict(Summary.of(self.ratio))
        return out


@dataclass
class ScenarioResult:
    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Scale, method and anything scaled down, in a sentence each."""
    profile: str = ""
    """What py-spy saw in the server while Muster missed a target (markdown)."""
    error: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "figures": [f.summary() for f in self.figures],
            "notes": self.notes,
            "profile": self.profile,
            "error": self.error,
            "seconds": self.seconds,
        }


@dataclass
class Context:
    """What every scenario gets: scale, repetitions and a scratch directory."""

    quick: bool
    runs: int
    workdir: Path
    profile: bool = True
    """Profile the server with py-spy in one extra run when a target is missed."""
    minutes: float | None = None
    """How long the soak scenario runs (None: its own default, shorter with --quick)."""
    rate: float | None = None
    """Tasks per second the soak scenario submits (None: its own default)."""
    server_workers: int = 1
    """Server processes per Muster server in the dispatch and round-trip scenarios."""

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full
