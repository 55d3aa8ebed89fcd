"""The scenarios of issue 4's table, by name, in the order the report lists them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.results import Context, ScenarioResult
from bench.scenarios import ai, audit, dispatch, enrollment, idle, reconnect, revocation, soak

Scenario = Callable[[Context], Awaitable[ScenarioResult]]

SCENARIOS: dict[str, Scenario] = {
    "dispatch": dispatch.run_dispatch,
    "roundtrip": dispatch.run_roundtrip,
    "schedule": dispatch.run_schedule,
    "idle": idle.run,
    "reconnect": reconnect.run,
    "enrollment": enrollment.run,
    "quota": dispatch.run_quota,
    "audit": audit.run,
    "revocation": revocation.run,
    "scaleout": dispatch.run_scaleout,
    "ai": ai.run,
    "soak": soak.run,
}
