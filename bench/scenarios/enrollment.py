"""Enrollment: bootstrap token + CSR -> certificate, each over a fresh TLS connection,
against the raw rate of fresh TLS connections each making one unary call of the same sizes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from bench.profiling import sampled
from bench.rawserver import raw_server
from bench.results import Context, Figure, ScenarioResult, Summary
from bench.simagent import CHANNEL_OPTIONS, UNARY_METHOD, enroll, make_csr
from bench.stack import Replica, Stack
from muster.v1 import enrollment_pb2

CONCURRENCY = 8


async def _timed(count: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Calls/s for ``count`` calls of ``one(i)``, ``CONCURRENCY`` at a time."""
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return count / (time.perf_counter() - started)


async def _muster_run(replica: Replica, count: int, run: int) -> tuple[float, int, int]:
    """(enrollments/s, request bytes, response bytes)."""
    bundle = replica.bundle_path.read_bytes()
    async with replica.admin() as admin:
        tokens = []
        for start in range(0, count, 16):
            batch = range(start, min(count, start + 16))
            made = await asyncio.gather(
                *(admin.create_bootstrap_token("default", ttl=3600) for _ in batch)
            )
            tokens += [secret for _, secret in made]
    csrs = [make_csr(f"enr-{run}-{i}") for i in range(count)]
    sizes: list[tuple[int, int]] = []

    async def one(i: int) -> None:
        csr, key = csrs[i]
        _, response = await enroll(replica.api, bundle, tokens[i], f"enr-{run}-{i}", csr, key)
        request = enrollment_pb2.EnrollRequest(token=tokens[i], csr_pem=csr, name=f"enr-{run}-{i}")
        sizes.append((request.ByteSize(), response.ByteSize()))

    rate = await _timed(count, one)
    return rate, sizes[0][0], sizes[0][1]


async def _raw_run(address: str, bundle: bytes, count: int, req: int, resp: int) -> float:
    creds = grpc.ssl_channel_credentials(bundle)
    payload = resp.to_bytes(4, "big") + b"q" * max(0, req - 4)

    async def one(_: int) -> None:
        channel = grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS)
        try:
            call: Any = channel.unary_unary(UNARY_METHOD)
            await call(payload, timeout=30)
        finally:
            await channel.close()

    return await _timed(count, one)


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("enrollment", "enrollment: token + CSR -> certificate over fresh TLS")
    count = ctx.scale(200, 30)
    result.notes.append(
        f"{count} enrollments per run, {CONCURRENCY} at a time, each on a new TLS connection "
        "with its own single-use token (tokens and P-256 CSRs made before the clock starts). "
        "Reference: the same number of new TLS connections to the raw server, each making one "
        "unary call with the EnrollRequest's and EnrollResponse's sizes."
    )
    async with Stack.create(ctx.workdir) as stack:
        a = await stack.start("a")
        async with raw_server(a.data_dir / "ca", ctx.workdir) as raw:
            tls = raw.tls
            bundle = a.bundle_path.read_bytes()
            muster, ref = [], []
            await _muster_run(a, 10, -1)  # warm-up
            for i in range(ctx.runs):
                rate, req, resp = await _muster_run(a, count, i)
                muster.append(rate)
                ref.append(await _raw_run(tls, bundle, count, req, resp))
            result.notes.append(f"Message sizes: request {req} bytes, response {resp} bytes.")
            ratio = [m / r for m, r in zip(muster, ref, strict=True)]
            fig = Figure("enrollment", "enrollments/s", "/s", muster,
                         "raw new TLS connection + unary", ref, "Muster / raw", ratio,
                         ">= 0.5x raw", Summary.of(ratio).median >= 0.5,
                         key="enrollment")  # fmt: skip
            result.figures.append(fig)
            if not fig.met and ctx.profile:
                async with sampled(a.pid, ctx.workdir / "profile.txt") as prof:
                    await _muster_run(a, count, ctx.runs)
                result.profile = prof.markdown("server `a` during one extra enrollment run")
    return result
