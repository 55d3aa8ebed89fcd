"""docs/benchmarks.md and its raw JSON: the table, the command, versions and the machine.

The method text at the top is written by hand here; the analysis between the
``<!-- analysis -->`` markers is written by hand in docs/benchmarks.md and kept when
the report is regenerated.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench import targets
from bench.results import ScenarioResult, Summary
from bench.stack import PG_ADMIN_URL, REDIS_URL

START, END = "<!-- analysis:start -->", "<!-- analysis:end -->"

HEADER = """\
# Benchmarks

This machine is shared and noisy, so absolute numbers say little: every figure below
is set against a reference measured **in the same run** on the same machine, and the
ratio is what to read. Each figure is the **median of {runs} runs**, with the smallest
and largest run in brackets; ratios are computed per run (Muster and its reference
measured back to back) and then summarised the same way.

How it is measured (`bench/`, `python -m bench`, `make bench`):

- Everything runs on loopback on this one machine: Muster server processes
  (`python -m bench.serve`, which is `start_server` with `MUSTER_*` settings) on a fresh
  Postgres database per scenario (migrated with `muster db upgrade`) and a Redis key
  prefix of their own, the references, and the load generators. Everything started is
  stopped (each child in its own process group), the databases are dropped and the Redis
  keys deleted.
- **Two kinds of agents.** Most scenarios use *simulated* agents: `bench/simagent.py`
  enrolls through the real `EnrollmentService` and speaks the real `AgentService.Connect`
  protocol over real mutual TLS, one TLS connection per agent, many agents per process
  (`python -m bench.fleet`, up to 2,500 per process), so the load generator does not
  starve the server. Their tasks are no-ops: an Assignment is answered at once with
  Accepted, Result and Credit. `dispatch-daemons` and `roundtrip-daemons` instead run 8
  real `muster agent` processes (`bench/daemons.py`: the shipped `echo` executor with an
  empty payload, `--concurrency 4`, the executor path with its durable outbox), fed the
  way users feed them: SDK callers, each a thread with its own blocking `muster.Client`,
  that `submit()` a task and `wait()` for its result, one task at a time (32 callers for
  dispatch, 1 for round trip). Those are the figures users will quote.
- The references are our own small programs: `bench/rawref.py`, a plain `grpc.aio`
  server with no Muster code in the path (a bidi echo over mTLS, one connection per
  simulated agent, and a unary call over server-authenticated TLS, with Muster's message
  sizes and the same certificates); two Celery peers with a no-op task and a prefork
  worker of concurrency 2 each (`bench/celeryapp.py`, `bench/celeryref.py`): **Celery +
  Redis** (broker and result backend, Celery's defaults) and **Celery + RabbitMQ**, the
  durable setup (py-amqp, a virtual host of the run's own, persistent messages with
  delivery mode 2 on a durable queue, `acks_late`, prefetch multiplier 1 as Celery's docs
  advise for `acks_late`, results through the `rpc://` backend, persistent too); and
  Postgres `COPY` into a copy of the audit table (`bench/scenarios/audit.py`). Celery's
  dispatch figure is `apply_async` x N then `ResultSet.join_native`; its round trip is
  `delay().get()`, one task at a time.
- **Server CPU per no-op task** is the server process's (and any child's) user + system
  CPU time read from `/proc` over a measured dispatch window, divided by the tasks it
  ran, in microseconds.
- `SubmitMany` dispatch sends 100 tasks per `AsyncClient.submit_many` call, 4 calls in
  flight; where the SDK has no `submit_many` yet the row says "not available".
- Bench servers keep Muster's defaults except: the submission rate limit is set so high
  that it never refuses (it is still checked, in Redis, on every Submit), the per-peer
  enrollment limit likewise (every simulated agent enrolls from 127.0.0.1), and a 2 s
  shutdown grace. Each is one process unless the run says `--server-workers N`: the
  dispatch, round-trip and schedule scenarios then run each server as `--workers N` (N
  processes sharing the ports), and their notes say so.
- Where Muster misses a target, one extra run is profiled with py-spy on the server
  process; the summary is under the scenario's notes.
- The targets of issue 12 are checked in the first table below: a row is met only when
  every figure it names meets its target on the median of the per-run ratios. `make
  bench` prints the same table when it ends and lists every unmet target last; unmet
  targets still exit 0 (they are findings), a scenario that failed exits 1.
"""


async def environment() -> dict[str, Any]:
    """The versions and the machine the figures came from."""
    versions = {"python": platform.python_version()}
    for dist in ("grpcio", "sqlalchemy", "asyncpg", "redis", "celery", "cryptography", "py-spy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    try:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            versions["postgres"] = str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()
    except (OSError, asyncpg.PostgresError) as err:
        versions["postgres"] = f"unreachable ({err})"
    try:
        client = aioredis.from_url(REDIS_URL)
        try:
            versions["redis-server"] = str((await client.info("server"))["redis_version"])
        finally:
            await client.aclose()
    except Exception as err:  # report what we could not learn
        versions["redis-server"] = f"unreachable ({err})"
    return {"code": code_revision(), "versions": versions, "machine": _machine()}


def code_revision() -> str:
    """The commit measured (``-dirty`` when the work tree had changes), or ``unknown``
    outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "nofile": _nofile(),
    }


def _nofile() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def document(
    results: list[ScenarioResult],
    *,
    command: str,
    args: dict[str, Any],
    stamp: str,
    seconds: float,
    env: dict[str, Any],
) -> dict[str, Any]:
    return {
        "stamp": stamp,
        "command": command,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in args.items()},
        "seconds": round(seconds, 1),
        **env,
        "scenarios": [r.to_json() for r in results],
    }


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(summary: dict[str, Any], unit: str = "", ratio: bool = False) -> str:
    s = Summary(**summary)
    if s.runs == 0:
        return "-"
    suffix = "x" if ratio else (f" {unit}" if unit else "")
    spread = f" ({_fmt(s.min)}-{_fmt(s.max)})" if s.runs > 1 else ""
    return f"{_fmt(s.median)}{suffix}{spread}"


def markdown(data: dict[str, Any], previous: str = "") -> str:
    runs = data["args"].get("runs", 3)
    lines = [HEADER.format(runs=runs), *targets.markdown(data), "", "## Results", ""]
    lines += [
        f"Produced by `{data['command']}` (`make bench` runs `python -m bench`) at "
        f"{data['stamp']}, in {data['seconds'] / 60:.1f} minutes, on code "
        f"{data.get('code', 'unknown')}"
        + (
            " (**--quick**: small scales, not the figures to quote)."
            if data["args"].get("quick")
            else "."
        ),
        "",
        "| scenario | figure | Muster | reference | reference value | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario in data["scenarios"]:
        if scenario["error"] and not scenario["figures"]:
            lines.append(
                f"| {scenario['name']} | **failed** | {_escape(scenario['error'][:200])} "
                "| | | | | no |"
            )
            continue
        for f in scenario["figures"]:
            met = {True: "yes", False: "**no**", None: "-"}[f["met"]]
            if f.get("error"):
                lines.append(
                    f"| {scenario['name']} | {f['figure']} | {_escape(f['error'][:200])} "
                    f"| {f['reference_name']} | | | {f['target']} | - |"
                )
                continue
            ratio = _cell(f["ratio_summary"], ratio=True)
            if f["ratio_name"] and ratio != "-":
                ratio = f"{ratio} {f['ratio_name']}"
            lines.append(
                f"| {scenario['name']} | {f['figure']} | {_cell(f['muster_summary'], f['unit'])} "
                f"| {f['reference_name']} | {_cell(f['reference_summary'], f['unit'])} "
                f"| {ratio} | {f['target']} | {met} |"
            )
    lines += ["", "## Versions and machine", ""]
    v, m = data["versions"], data["machine"]
    lines.append("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".")
    lines.append("")
    lines.append(
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB memory, Linux "
        f"{m['kernel']}, open-file limit {m['nofile']}."
    )
    lines += ["", "## Scenarios: scale, method, failures and profiles", ""]
    for scenario in data["scenarios"]:
        lines.append(f"### {scenario['name']}: {scenario['title']}")
        lines.append("")
        for note in scenario["notes"]:
            lines.append(f"- {note}")
        if scenario["error"]:
            lines.append(f"- **Failed**: {_escape(scenario['error'])}")
        lines.append(f"- Took {scenario['seconds']:.0f} s.")
        if scenario["profile"]:
            lines += ["", scenario["profile"]]
        lines.append("")
    lines += ["## Analysis", "", _analysis(previous), ""]
    return "\n".join(lines)


def _analysis(previous: str) -> str:
    match = re.search(re.escape(START) + r".*?" + re.escape(END), previous, re.S)
    if match:
        return match.group(0)
    return (
        f"{START}\n(Written by hand after a full run: what the table and the profiles say.)\n{END}"
    )


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
