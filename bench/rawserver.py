"""Start and stop the raw reference server (``python -m bench.rawref``) from the harness."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import procs


@dataclass
class RawServer:
    proc: asyncio.subprocess.Process
    mtls: str
    tls: str

    @property
    def pid(self) -> int:
        return self.proc.pid


@asynccontextmanager
async def raw_server(ca_dir: Path, workdir: Path, name: str = "raw") -> AsyncIterator[RawServer]:
    """A raw grpc.aio server trusting ``ca_dir``'s CA, with a server certificate from it."""
    out = workdir / f"{name}.json"
    out.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    proc = await procs.spawn(
        [procs.PYTHON, "-m", "bench.rawref", "--ca-dir", str(ca_dir),
         "--cert-dir", str(workdir / f"{name}-cert"), "--out", str(out)],
        log_path=log_path,
    )  # fmt: skip
    try:
        while not out.exists():
            if proc.returncode is not None:
                raise RuntimeError(f"raw server exited: {procs.log_tail(log_path)}")
            await asyncio.sleep(0.02)
        info = json.loads(out.read_text())
        yield RawServer(proc, info["mtls"], info["tls"])
    finally:
        await procs.stop(proc)
