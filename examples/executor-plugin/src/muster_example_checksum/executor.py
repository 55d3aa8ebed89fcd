"""``files.sha256``: the SHA-256 of files under one directory that this agent shares.

A fleet uses it to check what its hosts hold (model weights, a release, a dataset):
submit ``{"paths": ["models/*.gguf"], "expect": {"models/a.gguf": "<hex>"}}`` to a pool
and each attempt answers with the digests, or fails for good naming the files that differ.

What it shows, in the order the guide (docs/executors.md) explains it:

- configuration from the agent, never from the task: the directory comes from the
  agent's environment (``MUSTER_CHECKSUM_ROOT``); unset, the executor is not loaded
  (``ExecutorUnavailable``), so the agent does not offer the kind;
- payload validation before any work, against a JSON Schema, with a non-retryable
  failure naming the field; paths are confined to the directory (no absolute paths, no
  ``..``, no symlink out of it);
- blocking work (reading files) in a worker thread, so the agent's event loop keeps its
  heartbeats going, with progress as it goes;
- cancellation (a server's Cancel, or the runner's timeout): the worker stops at its next
  chunk and closes the file before the CancelledError goes on;
- an output that stays within ``ctx.max_output_bytes`` (entries are omitted, and counted,
  rather than the whole attempt failing at the agent's limit);
- retryable vs not: a bad request, a mismatch or a permission error will not change on
  another agent or later, a file that changed while it was read probably will.

It reports no usage: usage is the tokens of a model call, which this executor makes none
of (see the guide for an executor that does).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import jsonschema

from muster.agent.executors import (
    ExecutionResult,
    ExecutorError,
    ExecutorSettings,
    ExecutorUnavailable,
    ProgressThrottle,
    TaskContext,
)
from muster.errors import ConfigError

KIND = "files.sha256"
ROOT_ENV = "MUSTER_CHECKSUM_ROOT"
MAX_FILES = 10_000
"""More matches than this is a request to narrow, not a job to start."""
CHUNK_BYTES = 1 << 20
"""Read (and check for a stop) this much at a time."""

PAYLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["paths"],
    "properties": {
        "paths": {
            "type": "array",
            "minItems": 1,
            "maxItems": 100,
            "items": {"type": "string", "minLength": 1, "maxLength": 1024},
        },
        "expect": {
            "type": "object",
            "maxProperties": MAX_FILES,
            "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(PAYLOAD_SCHEMA)


@dataclass(frozen=True, slots=True)
class Request:
    """A validated payload: glob patterns relative to the root, and the digests expected."""

    patterns: tuple[str, ...]
    expect: dict[str, str]


@dataclass(frozen=True, slots=True)
class Digest:
    path: str
    """Relative to the root, with forward slashes."""
    size: int
    sha256: str


def parse_payload(payload: bytes) -> Request:
    """The request, or a non-retryable ExecutorError: no retry can fix a bad payload."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as err:
        raise ExecutorError(f"{KIND} payload is not JSON: {err}", retryable=False) from err
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(doc))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "payload"
        raise ExecutorError(f"{KIND} {where}: {error.message}", retryable=False)
    patterns = tuple(doc["paths"])
    for pattern in patterns:
        _check_relative(pattern, "paths")
    expect = dict(doc.get("expect", {}))
    for path in expect:
        _check_relative(path, "expect")
    return Request(patterns, expect)


def _check_relative(path: str, field: str) -> None:
    pure = PurePosixPath(path)
    if "\x00" in path or "\\" in path or pure.is_absolute() or ".." in pure.parts:
        raise ExecutorError(
            f"{KIND} {field}: {path[:100]!r} must be a relative path without '..'",
            retryable=False,
        )


class ChecksumExecutor:
    """Hashes files under ``$MUSTER_CHECKSUM_ROOT``; see the module docstring."""

    kind = KIND

    def __init__(
        self,
        settings: ExecutorSettings | None = None,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        progress_interval: float = 0.5,
        opener: Callable[[Path], IO[bytes]] | None = None,
    ) -> None:
        # The agent passes its ExecutorSettings; ``environ`` is its environment.
        environ = settings.environ if settings is not None else os.environ
        configured = environ.get(ROOT_ENV, "").strip()
        if not configured:
            # Not wanted on this host: skipped (and not offered) unless --executors names it.
            raise ExecutorUnavailable(f"set {ROOT_ENV} to the directory {KIND} may read")
        root = Path(configured).resolve()
        if not root.is_dir():
            # Wanted but wrong: stop the agent's start, whoever asked for it.
            raise ConfigError(f"{ROOT_ENV}={configured!r} is not a directory")
        self.root = root
        self._chunk = chunk_bytes
        self._progress_interval = progress_interval
        self._open: Callable[[Path], IO[bytes]] = opener or (lambda path: path.open("rb"))

    async def run(self, ctx: TaskContext) -> ExecutionResult:
        request = parse_payload(ctx.payload)  # before any work
        # Walking a tree can take a while: not on the event loop.
        files = await asyncio.to_thread(self._select, request.patterns)
        total = sum(size for _, _, size in files)
        await ctx.progress(f"hashing {len(files)} file(s), {total} bytes", 0)
        digests = await self._hash_all(ctx, files, total)
        self._check_expected(request.expect, digests)
        return ExecutionResult(output=_output(digests, total, ctx.max_output_bytes))

    # Selecting ---------------------------------------------------------------

    def _select(self, patterns: tuple[str, ...]) -> list[tuple[str, Path, int]]:
        """``(relative path, path, size)`` of each regular file the patterns match, sorted."""
        found: dict[str, tuple[Path, int]] = {}
        for pattern in patterns:
            matched = False
            for path in self._matches(pattern):
                real = path.resolve()
                if not real.is_relative_to(self.root):
                    raise ExecutorError(
                        f"{pattern!r} leads out of the shared directory (a symbolic link)",
                        retryable=False,
                    )
                if not real.is_file():
                    continue
                matched = True
                relative = path.relative_to(self.root).as_posix()
                found[relative] = (real, real.stat().st_size)
                if len(found) > MAX_FILES:
                    raise ExecutorError(
                        f"the paths match more than {MAX_FILES} files: narrow them",
                        retryable=False,
                    )
            if not matched:
                raise ExecutorError(f"no file matches {pattern!r}", retryable=False)
        return [(rel, path, size) for rel, (path, size) in sorted(found.items())]

    def _matches(self, pattern: str) -> Iterator[Path]:
        try:
            yield from self.root.glob(pattern)
        except ValueError as err:  # e.g. "**" not alone in a segment
            raise ExecutorError(f"bad pattern {pattern!r}: {err}", retryable=False) from err

    # Hashing -----------------------------------------------------------------

    async def _hash_all(
        self, ctx: TaskContext, files: list[tuple[str, Path, int]], total: int
    ) -> list[Digest]:
        """Hash in a worker thread, reporting progress; on cancellation stop it first."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        moved = asyncio.Event()
        done_bytes = [0]

        def advance(n: int) -> None:  # runs in the worker thread
            done_bytes[0] += n
            loop.call_soon_threadsafe(moved.set)

        work = asyncio.ensure_future(asyncio.to_thread(self._hash_files, files, stop, advance))
        throttle = ProgressThrottle(self._progress_interval)
        try:
            while not work.done():
                waiter = asyncio.ensure_future(moved.wait())
                try:
                    await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                moved.clear()
                if not work.done() and throttle.ready():
                    percent = 100 * done_bytes[0] // total if total else 0
                    await ctx.progress(f"hashed {done_bytes[0]} of {total} bytes", percent)
            return work.result()
        except asyncio.CancelledError:
            # Cancelled by the server or timed out by the runner. A thread cannot be
            # interrupted: tell it to stop, let it close its file (within one chunk),
            # then let the cancellation go on. Swallowing it would keep the slot busy.
            stop.set()
            await asyncio.wait({work})
            raise

    def _hash_files(
        self,
        files: list[tuple[str, Path, int]],
        stop: threading.Event,
        advance: Callable[[int], None],
    ) -> list[Digest]:
        return [self._hash_file(rel, path, stop, advance) for rel, path, _ in files]

    def _hash_file(
        self, rel: str, path: Path, stop: threading.Event, advance: Callable[[int], None]
    ) -> Digest:
        digest = hashlib.sha256()
        size = 0
        try:
            before = path.stat()
            with self._open(path) as file:
                while chunk := file.read(self._chunk):
                    if stop.is_set():
                        raise _Stopped
                    digest.update(chunk)
                    size += len(chunk)
                    advance(len(chunk))
            after = path.stat()
        except PermissionError as err:
            # The agent's user cannot read it: retrying will not change that.
            raise ExecutorError(f"cannot read {rel}: permission denied", retryable=False) from err
        except OSError as err:
            # Gone since it was listed, a disk error: another try may well work.
            raise ExecutorError(f"cannot read {rel}: {err.strerror or err}") from err
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or (
            size != after.st_size
        ):
            raise ExecutorError(f"{rel} changed while it was read")  # retryable: it settles
        return Digest(rel, size, digest.hexdigest())

    @staticmethod
    def _check_expected(expect: dict[str, str], digests: list[Digest]) -> None:
        got = {d.path: d.sha256 for d in digests}
        wrong = sorted(path for path, want in expect.items() if got.get(path) != want)
        if wrong:
            shown = ", ".join(
                f"{path} ({'not found' if path not in got else 'differs'})" for path in wrong[:5]
            )
            more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
            # A definite answer, the same on a retry: fail for good.
            raise ExecutorError(
                f"{len(wrong)} file(s) not as expected: {shown}{more}", retryable=False
            )


class _Stopped(Exception):
    """The worker thread saw the stop request (the awaiting side raises CancelledError)."""


def _output(digests: list[Digest], total: int, limit: int) -> bytes:
    """The JSON answer, within ``limit`` bytes (0: no limit): entries that do not fit are
    left out and counted in ``omitted``, so the caller knows the list is partial."""
    entries = [
        json.dumps({"path": d.path, "bytes": d.size, "sha256": d.sha256}, ensure_ascii=False)
        for d in digests
    ]

    def render(kept: list[str]) -> bytes:
        head = f'{{"count": {len(digests)}, "total_bytes": {total}, '
        tail = f'"omitted": {len(digests) - len(kept)}}}'
        return (head + '"files": [' + ", ".join(kept) + "], " + tail).encode()

    whole = render(entries)
    if not limit or len(whole) <= limit:
        return whole
    room = limit - len(render([])) - 20  # "omitted" may gain digits: keep a margin
    kept: list[str] = []
    for entry in entries:
        room -= len(entry.encode()) + 2  # and ", "
        if room < 0:
            break
        kept.append(entry)
    return render(kept)
