"""The benchmark harness must not rot: a quick run of one scenario produces a well-formed
report. It checks that the harness works, not how fast anything is."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_a_quick_audit_run_writes_a_well_formed_report(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--runs",
            "3",
            "--output",
            str(tmp_path),
            "audit",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert data["command"] == f"python -m bench --quick --runs 3 --output {tmp_path} audit"
    assert {"python", "grpcio", "sqlalchemy", "postgres", "redis-server"} <= data["versions"].keys()
    assert data["machine"]["nproc"] >= 1
    [scenario] = data["scenarios"]
    assert scenario["name"] == "audit"
    assert scenario["error"] == ""
    figures = {f["figure"]: f for f in scenario["figures"]}
    rate = figures["events/s"]
    assert len(rate["muster"]) == len(rate["reference"]) == len(rate["ratio"]) == 3
    assert all(v > 0 for v in rate["muster"] + rate["reference"])
    summary = rate["ratio_summary"]
    assert summary["min"] <= summary["median"] <= summary["max"]
    assert summary["runs"] == 3
    assert figures["lost events"]["muster"] == [0.0, 0.0, 0.0]
    markdown = (tmp_path / "benchmarks.md").read_text()
    assert "| scenario | figure | Muster |" in markdown
    assert "| audit | events/s |" in markdown
    assert "simulated" in markdown  # the method note travels with every report


def test_an_unknown_scenario_is_refused_before_anything_starts(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--output", str(tmp_path), "no-such-scenario"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown scenario" in proc.stderr
    assert not (tmp_path / "benchmarks.json").exists()


@pytest.mark.timeout(180)
def test_a_quick_ai_run_measures_budget_overhead_and_finds_no_overspend(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--runs", "1", "--output", str(tmp_path), "ai"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [scenario] = json.loads((tmp_path / "benchmarks.json").read_text())["scenarios"]
    assert scenario["name"] == "ai"
    assert scenario["error"] == ""
    figures = {f["figure"]: f for f in scenario["figures"]}
    rate = figures["throughput, budgets set"]
    assert len(rate["muster"]) == len(rate["reference"]) == len(rate["ratio"]) == 1
    assert all(v > 0 for v in rate["muster"] + rate["reference"])
    assert figures["largest overspend (settled - limit)"]["muster"] == [0.0]
    assert figures["largest spent + reserved above limit (sampled)"]["muster"] == [0.0]
    assert figures["tasks run before the budget held"]["muster"][0] > 0
    assert "| ai | largest overspend" in (tmp_path / "benchmarks.md").read_text()
