"""The benchmark harness must not rot: a quick run of one scenario produces a well-formed
report. It checks that the harness works, not how fast anything is."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from bench.stack import REDIS_URL

pytestmark = pytest.mark.slow

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
    head = subprocess.run(
        ["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert data["code"].startswith(head)  # the commit measured, "-dirty" if edited
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
    assert f"on code {data['code']}" in markdown
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


# The targets table of issue 12 and the report writer ------------------------------------


def _figure(key: str, ratio: list[float], met: bool | None, **extra: object) -> dict[str, object]:
    from bench.results import Figure

    fig = Figure(
        "s", key, "tasks/s", [100.0] * len(ratio), "peer", [50.0] * len(ratio), "M / P", ratio
    )
    fig.met, fig.key = met, key
    for name, value in extra.items():
        setattr(fig, name, value)
    return fig.summary()


def _data(*figures: dict[str, object]) -> dict[str, object]:
    return {
        "stamp": "20260101T000000Z",
        "command": "python -m bench",
        "args": {"runs": 3, "quick": False},
        "seconds": 60.0,
        "versions": {"python": "3"},
        "machine": {"nproc": 2, "cpu": "x", "memory_gib": 1, "kernel": "k", "nofile": 1024},
        "scenarios": [
            {"name": "s", "title": "t", "figures": list(figures), "notes": [], "profile": "",
             "error": "", "seconds": 1.0}
        ],
    }  # fmt: skip


def test_a_target_row_is_met_only_when_every_figure_it_names_is() -> None:
    from bench import targets

    both = _data(
        _figure("dispatch.redis", [2.5, 2.1, 3.0], True),
        _figure("dispatch.rabbitmq", [2.0, 1.5, 1.9], False),
    )
    [row] = [r for r in targets.rows(both) if r.target.keys[0] == "dispatch.redis"]
    assert row.status == targets.NOT_MET
    assert row.cells[0] == "dispatch.redis: 2.50x (2.10-3.00) M / P"

    one = _data(_figure("dispatch.redis", [2.5, 2.1, 3.0], True))
    [row] = [r for r in targets.rows(one) if r.target.keys[0] == "dispatch.redis"]
    assert row.status == targets.NOT_MEASURED  # half a row is not a met row

    met = _data(
        _figure("dispatch.redis", [2.5, 2.1, 3.0], True),
        _figure("dispatch.rabbitmq", [2.2, 2.0, 2.9], True),
    )
    [row] = [r for r in targets.rows(met) if r.target.keys[0] == "dispatch.redis"]
    assert row.status == targets.MET


def test_report_only_rows_and_unavailable_figures_say_so() -> None:
    from bench import targets

    cpu = _figure("cpu.single", [], None)
    cpu["muster_summary"] = {"median": 1500.0, "min": 1400.0, "max": 1600.0, "runs": 3}
    cpu["unit"] = "µs"
    many = _figure("dispatch.many.redis", [], None, error="not available: no submit_many")
    table = {r.target.keys[0]: r for r in targets.rows(_data(cpu, many))}
    assert table["cpu.single"].status == targets.REPORT
    assert table["cpu.single"].cells == ["cpu.single: 1,500 µs (1,400-1,600)"]
    assert table["dispatch.many.redis"].status == targets.NOT_MEASURED
    assert table["dispatch.many.redis"].cells == [
        "dispatch.many.redis: not available: no submit_many"
    ]


def test_the_summary_lists_every_unmet_target_last_and_the_report_carries_the_table() -> None:
    from bench import report, targets

    data = _data(
        _figure("dispatch.redis", [0.5, 0.4, 0.6], False),
        _figure("dispatch.rabbitmq", [0.3, 0.2, 0.4], False),
        _figure("enrollment", [0.6, 0.7, 0.8], True),
    )
    text = targets.summary(data)
    unmet = text[text.index("UNMET TARGETS (1):") :]
    assert "dispatch, 8 simulated agents" in unmet
    assert "enrollment" not in unmet
    assert "[met] enrollment: >= 0.5x raw TLS + unary" in text
    assert "Not measured in this run" in text  # every row without figures is named
    markdown = report.markdown(data)
    assert markdown.index("## Targets (issue 12)") < markdown.index("## Results")
    assert (
        "| enrollment | >= 0.5x raw TLS + unary | enrollment: 0.70x (0.60-0.80) M / P | met |"
        in markdown
    )
    assert "| **not met** |" in markdown
    assert "Celery + RabbitMQ" in markdown  # the method names both peers and their settings
    assert "acks_late" in markdown


def test_every_target_key_is_produced_by_some_scenario() -> None:
    """A key typed differently in a scenario and in the table would leave a row unmeasured
    for ever: each key must appear in bench/scenarios."""
    from bench import targets

    sources = "".join(p.read_text() for p in (ROOT / "bench" / "scenarios").glob("*.py"))
    for target in targets.TARGETS:
        for key in target.keys:
            prefix = key.rsplit(".", 1)[0] + "."
            assert f'"{key}"' in sources or f'key_prefix="{prefix[:-1]}"' in sources, key


@pytest.mark.timeout(300)
def test_quick_runs_measure_both_celery_peers_real_daemons_and_server_cpu(
    tmp_path: Path,
) -> None:
    pytest.importorskip("celery", reason="the Celery peers need the bench extra")
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("the RabbitMQ peer needs a local RabbitMQ (rabbitmqctl)")
    prefix = f"muster-bench-test-{secrets.token_hex(4)}"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--runs", "1", "--output", str(tmp_path),
         "dispatch", "roundtrip-daemons"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=290,
        env={**os.environ, "BENCH_CELERY_PREFIX": prefix},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "benchmarks.json").read_text())
    assert [s["error"] for s in data["scenarios"]] == ["", ""]
    figures = {f["key"]: f for s in data["scenarios"] for f in s["figures"] if f["key"]}
    for key in ("dispatch.redis", "dispatch.rabbitmq", "daemons.roundtrip.p50"):
        fig = figures[key]
        assert len(fig["muster"]) == len(fig["reference"]) == len(fig["ratio"]) == 1, key
        assert all(v > 0 for v in fig["muster"] + fig["reference"]), key
    assert figures["dispatch.rabbitmq"]["reference_name"] == "Celery + RabbitMQ end-to-end"
    assert figures["cpu.single"]["muster"][0] > 0
    many = figures["dispatch.many.redis"]
    assert many["error"].startswith("not available") or many["muster"][0] > 0
    assert "Targets (issue 12):" in proc.stdout
    assert "## Targets (issue 12)" in (tmp_path / "benchmarks.md").read_text()
    # What a round trip costs the stores, counted by them (bench/counters.py).
    costs = {
        f["figure"]: f["muster"]
        for s in data["scenarios"]
        if s["name"] == "roundtrip-daemons"
        for f in s["figures"]
    }
    assert costs["Postgres transactions per task"][0] > 0
    assert costs["Redis commands per task"][0] > 0
    # Each peer cleaned up after itself: the RabbitMQ vhost and the Redis keys are gone.
    vhosts = subprocess.run(
        ["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60
    )
    assert vhosts.returncode == 0 and f"{prefix}-rabbitmq" not in vhosts.stdout.split()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.keys(f"{prefix}*") == []
    finally:
        client.close()
