"""py-spy on a server process during one extra run, summarised as the functions that took
the most CPU samples: where Muster misses a target, this names the slowest part."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
OURS = ("server/", "muster/", "agent/")
"""Muster's packages; py-spy names files relative to their sys.path entry."""


@dataclass
class Profile:
    path: Path
    samples: int = 0
    self_top: list[tuple[str, float]] = field(default_factory=list)
    ours_top: list[tuple[str, float]] = field(default_factory=list)
    error: str = ""

    def markdown(self, label: str) -> str:
        if self.error:
            return f"Profile of {label}: not available ({self.error})."
        lines = [
            f"Profile of {label}: {self.samples} CPU samples (py-spy, 200 Hz, busy threads only).",
            "",
            "| most self time | share | most inclusive time in Muster code | share |",
            "|---|---|---|---|",
        ]
        for i in range(max(len(self.self_top), len(self.ours_top))):
            a = self.self_top[i] if i < len(self.self_top) else ("", 0.0)
            b = self.ours_top[i] if i < len(self.ours_top) else ("", 0.0)
            lines.append(
                f"| `{a[0]}` | {a[1]:.1%} | `{b[0]}` | {b[1]:.1%} |"
                if b[0]
                else f"| `{a[0]}` | {a[1]:.1%} | | |"
            )
        return "\n".join(lines)


def _name(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    file = match["file"]
    short = "/".join(file.split("/")[-2:])
    return f"{match['func']} ({short})", file


def _ours(file: str) -> bool:
    return "site-packages" not in file and any(file.startswith(p) or f"/{p}" in file for p in OURS)


def summarise(path: Path, top: int = 12) -> Profile:
    prof = Profile(path)
    self_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if frames and frames[0].startswith(("process ", "thread ")):
            frames = frames[1:]
        if not frames:
            continue
        prof.samples += count
        self_counts[_name(frames[-1])[0]] += count
        seen = set()
        for frame in frames:
            name, file = _name(frame)
            if _ours(file) and name not in seen:
                seen.add(name)
                incl[name] += count
    if prof.samples:
        prof.self_top = [(n, c / prof.samples) for n, c in self_counts.most_common(top)]
        prof.ours_top = [(n, c / prof.samples) for n, c in incl.most_common(top)]
    return prof


@asynccontextmanager
async def sampled(pid: int, path: Path) -> AsyncIterator[Profile]:
    """Record ``pid`` with py-spy for the duration of the block; the Profile fills in after."""
    prof = Profile(path)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    proc = None
    try:
        proc = await procs.spawn(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(path),
                "--nonblocking",
                "--subprocesses",  # a `--workers` server's workers too
            ],
            log_path=path.with_suffix(".log"),
        )
        await asyncio.sleep(0.5)
        if proc.returncode is not None:
            prof.error = procs.log_tail(path.with_suffix(".log"), 300).strip() or "py-spy exited"
    except OSError as err:
        prof.error = f"py-spy could not start: {err}"
    try:
        yield prof
    finally:
        if proc is not None and proc.returncode is None:
            await procs.stop(proc, sig=signal.SIGINT, timeout=30)
        if not prof.error:
            with contextlib.suppress(OSError):
                done = summarise(path)
                prof.samples, prof.self_top, prof.ours_top = (
                    done.samples,
                    done.self_top,
                    done.ours_top,
                )
            if not prof.samples:
                prof.error = procs.log_tail(path.with_suffix(".log"), 300).strip() or "no samples"
