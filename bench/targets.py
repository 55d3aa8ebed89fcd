"""The targets table of issue 12: each row names the figures (by their ``Figure.key``) that
answer it, and is met only when every one of them is. Read from the report's JSON, so the
markdown report and ``make bench``'s closing summary say the same thing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MET, NOT_MET, REPORT, NOT_MEASURED = "met", "not met", "report", "not measured"


@dataclass(frozen=True)
class Target:
    figure: str
    target: str
    keys: tuple[str, ...]


TARGETS: tuple[Target, ...] = (
    Target(
        "dispatch, 8 simulated agents, single-task Submit clients",
        ">= 2x Celery + Redis, >= 2x Celery + RabbitMQ",
        ("dispatch.redis", "dispatch.rabbitmq"),
    ),
    Target(
        "dispatch, 8 real `muster agent` daemons, SDK callers that submit and wait",
        ">= 2x Celery + Redis, >= 2x Celery + RabbitMQ",
        ("daemons.dispatch.redis", "daemons.dispatch.rabbitmq"),
    ),
    Target(
        "dispatch with `SubmitMany`, 8 simulated agents",
        "report, and >= 5x Celery + Redis",
        ("dispatch.many.redis",),
    ),
    Target(
        "round trip p50 / p99, simulated agents",
        "<= 1x / <= 2x Celery + Redis",
        ("roundtrip.p50", "roundtrip.p99"),
    ),
    Target(
        "round trip p50 / p99, real `muster agent` daemons, SDK caller",
        "<= 1x / <= 2x Celery + Redis",
        ("daemons.roundtrip.p50", "daemons.roundtrip.p99"),
    ),
    Target("enrollment", ">= 0.5x raw TLS + unary", ("enrollment",)),
    Target("quota cost (Redis on / off)", ">= 0.9", ("quota",)),
    Target(
        "server CPU per no-op task",
        "report, in microseconds",
        ("cpu.single", "cpu.many", "daemons.cpu"),
    ),
    Target("idle RSS per agent at 10,000", "<= 1.25x raw", ("idle.rss",)),
)


@dataclass
class Row:
    target: Target
    status: str
    cells: list[str]
    """One per figure found: its name, then its ratio (or value) as median (min-max)."""


def _figures(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for scenario in data.get("scenarios", []):
        for fig in scenario.get("figures", []):
            if fig.get("key"):
                out[fig["key"]] = fig
    return out


def _num(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _cell(fig: dict[str, Any]) -> str:
    name = fig["figure"]
    if fig.get("error"):
        return f"{name}: {fig['error']}"
    ratio = fig["ratio_summary"]
    if ratio["runs"]:
        spread = f" ({_num(ratio['min'])}-{_num(ratio['max'])})" if ratio["runs"] > 1 else ""
        return f"{name}: {_num(ratio['median'])}x{spread} {fig['ratio_name']}".rstrip()
    value = fig["muster_summary"]
    if value["runs"]:
        spread = f" ({_num(value['min'])}-{_num(value['max'])})" if value["runs"] > 1 else ""
        return f"{name}: {_num(value['median'])} {fig['unit']}{spread}"
    return f"{name}: no value"


def rows(data: dict[str, Any]) -> list[Row]:
    """Each target with its status: met only when every figure it names was measured and
    met; report-only rows say ``report`` once measured."""
    figures = _figures(data)
    out = []
    for target in TARGETS:
        found = [figures[k] for k in target.keys if k in figures]
        measured = [f for f in found if not f.get("error") and f["muster_summary"]["runs"]]
        checked = [f["met"] for f in measured if f["met"] is not None]
        if not measured:
            status = NOT_MEASURED
        elif any(m is False for m in checked):
            status = NOT_MET
        elif len(measured) < len(target.keys) and checked:
            status = NOT_MEASURED  # half a row is not a met row
        elif checked:
            status = MET
        else:
            status = REPORT
        out.append(Row(target, status, [_cell(f) for f in found]))
    return out


def markdown(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Targets (issue 12)",
        "",
        "Each row is met only when every figure it names meets its target (median of the "
        "per-run ratios); `make bench` prints the same table at the end and lists what is "
        "unmet.",
        "",
        "| figure | target | measured (median, min-max over runs) | status |",
        "|---|---|---|---|",
    ]
    for row in rows(data):
        status = f"**{row.status}**" if row.status in (NOT_MET, NOT_MEASURED) else row.status
        measured = "<br>".join(_escape(c) for c in row.cells) or "-"
        lines.append(f"| {row.target.figure} | {row.target.target} | {measured} | {status} |")
    return lines


def summary(data: dict[str, Any]) -> str:
    """The closing text of ``python -m bench``: every row, then the unmet ones by name."""
    out = ["Targets (issue 12):"]
    table = rows(data)
    for row in table:
        out.append(f"  [{row.status}] {row.target.figure}: {row.target.target}")
        out.extend(f"      {c}" for c in row.cells)
    unmet = [r for r in table if r.status == NOT_MET]
    unmeasured = [r for r in table if r.status == NOT_MEASURED]
    if unmet:
        out.append(f"UNMET TARGETS ({len(unmet)}):")
        out.extend(f"  - {r.target.figure}: {r.target.target}" for r in unmet)
    if unmeasured:
        out.append(f"Not measured in this run ({len(unmeasured)}):")
        out.extend(f"  - {r.target.figure}" for r in unmeasured)
    if not unmet and not unmeasured:
        out.append("Every target is met.")
    return "\n".join(out)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
