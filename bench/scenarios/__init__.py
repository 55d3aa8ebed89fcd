"""The scenarios of issues 4 and 12's tables, by name, in the order the report lists them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.results import Context, ScenarioResult
from bench.scenarios import (
    ai,
    audit,
    daemons,
    dispatch,
    enrollment,
    idle,
    reconnect,
    revocation,
    soak,
)

Scenario = Callable[[Context], Awaitable[ScenarioResult]]

SCENARIOS: dict[str, Scenario] = {
    "dispatch": dispatch.run_dispatch,
    "dispatch-daemons": daemons.run_dispatch,
    "roundtrip": dispatch.run_roundtrip,
    "roundtrip-daemons": daemons.run_roundtrip,
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
