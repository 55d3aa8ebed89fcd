"""``python -m bench``: run scenarios one after the other, survive a failing one, and write the
report (markdown and raw JSON)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import signal
import sys
import time
import traceback
from pathlib import Path

from bench import procs, report, stack, targets
from bench.results import Context, ScenarioResult
from bench.scenarios import SCENARIOS

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure Muster against its references in one run and write the report.",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="scenario",
        help=f"any of: {', '.join(SCENARIOS)} (default all)",
    )
    parser.add_argument("--quick", action="store_true", help="small scales: about a minute in all")
    parser.add_argument("--runs", type=int, default=3, help="repetitions per figure (default 3)")
    parser.add_argument(
        "--output",
        type=Path,
        help="where benchmarks.md and benchmarks.json go (default: docs/ for a full run of "
        "every scenario, else bench/results/)",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        help="soak: how long to run, in minutes (default 30; 3 with --quick)",
    )
    parser.add_argument(
        "--rate", type=float, help="soak: echo tasks submitted per second (default 20)"
    )
    parser.add_argument(
        "--server-workers",
        type=int,
        default=1,
        metavar="N",
        help="dispatch and round-trip scenarios: run each Muster server as `--workers N` "
        "(N processes sharing the ports; default 1: one process)",
    )
    parser.add_argument(
        "--server-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a MUSTER_<NAME> setting for every bench server, e.g. eager_dispatch=false "
        "(repeatable; to measure a lever on and off)",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="never run py-spy (--quick never does)"
    )
    return parser


async def _run(
    args: argparse.Namespace, names: list[str], stamp: str
) -> tuple[list[ScenarioResult], dict[str, object]]:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    results = []
    env = await report.environment()
    try:
        for name in names:
            workdir = RESULTS / f"work-{stamp}" / name
            ctx = Context(
                quick=args.quick,
                runs=args.runs,
                workdir=workdir,
                profile=not (args.no_profile or args.quick),
                minutes=args.minutes,
                rate=args.rate,
                server_workers=args.server_workers,
            )
            log.info("scenario %s: starting", name)
            started = time.monotonic()
            try:
                result = await SCENARIOS[name](ctx)
            except Exception as err:  # a failed scenario is reported, the run goes on
                log.error("scenario %s failed: %s", name, err)
                (workdir / "error.txt").parent.mkdir(parents=True, exist_ok=True)
                (workdir / "error.txt").write_text(traceback.format_exc())
                result = ScenarioResult(name, name, error=f"{type(err).__name__}: {err}"[:1000])
            result.seconds = time.monotonic() - started
            log.info("scenario %s: done in %.0fs", name, result.seconds)
            results.append(result)
    finally:
        await procs.stop_all()
    return results, env


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    args = _parser().parse_args(argv)
    unknown = [n for n in args.scenarios if n not in SCENARIOS]
    if unknown:
        _parser().error(f"unknown scenario(s): {', '.join(unknown)}")
    if args.runs < 1:
        _parser().error("--runs must be at least 1")
    if args.minutes is not None and args.minutes <= 0:
        _parser().error("--minutes must be positive")
    if args.server_workers < 1:
        _parser().error("--server-workers must be at least 1")
    if args.rate is not None and args.rate <= 0:
        _parser().error("--rate must be positive")
    for setting in args.server_setting:
        name, sep, value = setting.partition("=")
        if not sep or not name or not name.replace("_", "").isalnum():
            _parser().error(f"--server-setting {setting!r}: expected NAME=VALUE")
        stack.SERVER_SETTINGS[name.lower()] = value
    names = args.scenarios or list(SCENARIOS)
    full = not args.server_setting and not args.quick and set(names) == set(SCENARIOS)
    output = args.output or (DOCS if full else RESULTS)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.monotonic()
    results, env = asyncio.run(_run(args, names, stamp))
    data = report.document(
        results,
        command=command.strip(),
        args=vars(args),
        stamp=stamp,
        seconds=time.monotonic() - started,
        env=env,
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(data, indent=2, default=str) + "\n"
    (RESULTS / f"{stamp}.json").write_text(raw)
    output.mkdir(parents=True, exist_ok=True)
    (output / "benchmarks.json").write_text(raw)
    md = output / "benchmarks.md"
    md.write_text(report.markdown(data, previous=md.read_text() if md.exists() else ""))
    log.info("wrote %s and %s", md, output / "benchmarks.json")
    # Unmet targets are a finding, not a failure of the harness: exit 0, but say so last.
    print(targets.summary(data))
    failed = [r.name for r in results if r.error]
    if failed:
        print(f"FAILED SCENARIOS: {', '.join(failed)}")
    return 1 if failed else 0
