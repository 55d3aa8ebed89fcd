"""Unit tests of the ``files.sha256`` executor: the executor alone, with a TaskContext.

Run them where the plugin is installed next to Muster's agent (``pip install -e
'.[test]'`` in the agent's environment, then ``pytest``): the last test loads the
executor through its entry point, as the agent does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from pathlib import Path
from typing import IO, Any

import pytest
from muster_example_checksum import KIND, ROOT_ENV, ChecksumExecutor

from muster.agent.executors import (
    ExecutorError,
    ExecutorRegistry,
    ExecutorSettings,
    ExecutorUnavailable,
    TaskContext,
)
from muster.errors import ConfigError


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"
    (shared / "models").mkdir(parents=True)
    (shared / "models" / "a.gguf").write_bytes(b"weights a" * 1000)
    (shared / "models" / "b.gguf").write_bytes(b"weights b")
    (shared / "models" / "notes.txt").write_bytes(b"not a model")
    (shared / "empty").mkdir()
    return shared


def executor(root: Path, **options: Any) -> ChecksumExecutor:
    return ChecksumExecutor(ExecutorSettings(environ={ROOT_ENV: str(root)}), **options)


class Recorder:
    """What the executor reported as progress."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, int]] = []
        self.changed = asyncio.Event()

    async def __call__(self, message: str, percent: int, output_tokens: int) -> None:
        self.reports.append((message, percent))
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.reports) < count:
                self.changed.clear()
                await self.changed.wait()


def context(payload: Any, *, progress: Any = None, max_output_bytes: int = 1 << 20) -> TaskContext:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return TaskContext(
        task_id="t1",
        attempt=1,
        kind=KIND,
        payload=raw,
        on_progress=progress,
        max_output_bytes=max_output_bytes,
    )


async def test_hashes_what_the_patterns_match_in_path_order(root: Path) -> None:
    progress = Recorder()
    result = await executor(root).run(context({"paths": ["models/*.gguf"]}, progress=progress))
    answer = json.loads(result.output)
    a = (root / "models" / "a.gguf").read_bytes()
    assert answer == {
        "count": 2,
        "total_bytes": len(a) + 9,
        "files": [
            {"path": "models/a.gguf", "bytes": len(a), "sha256": sha(a)},
            {"path": "models/b.gguf", "bytes": 9, "sha256": sha(b"weights b")},
        ],
        "omitted": 0,
    }
    assert progress.reports[0] == (f"hashing 2 file(s), {len(a) + 9} bytes", 0)
    assert result.usage.input_tokens == result.usage.output_tokens == 0  # no model call


async def test_expected_digests_pass_and_a_difference_fails_for_good(root: Path) -> None:
    good = {"models/b.gguf": sha(b"weights b")}
    run = executor(root).run
    await run(context({"paths": ["models/b.gguf"], "expect": good}))
    with pytest.raises(ExecutorError) as failed:
        await run(
            context(
                {
                    "paths": ["models/*.gguf"],
                    "expect": {"models/a.gguf": "0" * 64, "models/gone.gguf": "1" * 64},
                }
            )
        )
    assert not failed.value.retryable
    assert str(failed.value) == (
        "2 file(s) not as expected: models/a.gguf (differs), models/gone.gguf (not found)"
    )


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{not json", "files.sha256 payload is not JSON"),
        ({}, "files.sha256 payload: 'paths' is a required property"),
        ({"paths": []}, "files.sha256 paths: [] should be non-empty"),
        ({"paths": ["a"], "shell": "rm -rf /"}, "Additional properties are not allowed"),
        ({"paths": [7]}, "files.sha256 paths/0: 7 is not of type 'string'"),
        ({"paths": ["/etc/passwd"]}, "'/etc/passwd' must be a relative path without '..'"),
        ({"paths": ["models/../../x"]}, "must be a relative path without '..'"),
        ({"paths": ["a"], "expect": {"a": "XYZ"}}, "files.sha256 expect/a: 'XYZ' does not match"),
        ({"paths": ["nothing/*"]}, "no file matches 'nothing/*'"),
        ({"paths": ["empty"]}, "no file matches 'empty'"),
    ],
)
async def test_a_bad_request_fails_for_good_before_any_file_is_read(
    root: Path, payload: Any, message: str
) -> None:
    opened: list[Path] = []

    def opener(path: Path) -> IO[bytes]:
        opened.append(path)
        return path.open("rb")

    with pytest.raises(ExecutorError, match=re.escape(message)) as err:
        await executor(root, opener=opener).run(context(payload))
    assert not err.value.retryable
    assert opened == []


async def test_a_symbolic_link_out_of_the_directory_is_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"outside")
    (root / "models" / "link.gguf").symlink_to(tmp_path / "secret")
    with pytest.raises(ExecutorError, match="leads out of the shared directory") as err:
        await executor(root).run(context({"paths": ["models/*.gguf"]}))
    assert not err.value.retryable


def test_without_a_directory_the_kind_is_not_offered_and_a_wrong_one_stops_the_agent(
    tmp_path: Path,
) -> None:
    with pytest.raises(ExecutorUnavailable, match=ROOT_ENV):
        ChecksumExecutor(ExecutorSettings(environ={}))
    with pytest.raises(ConfigError, match="is not a directory"):
        ChecksumExecutor(ExecutorSettings(environ={ROOT_ENV: str(tmp_path / "missing")}))


async def test_the_output_stays_within_the_agents_limit(root: Path) -> None:
    for n in range(300):
        (root / "models" / f"shard-{n:04d}.bin").write_bytes(n.to_bytes(2, "big"))
    result = await executor(root).run(context({"paths": ["models/shard-*"]}, max_output_bytes=4096))
    assert len(result.output) <= 4096
    answer = json.loads(result.output)
    assert answer["count"] == 300
    assert 0 < len(answer["files"]) < 300
    assert answer["omitted"] == 300 - len(answer["files"])
    assert answer["files"][0]["path"] == "models/shard-0000.bin"


class GatedFile:
    """A file whose reads wait for the test: one chunk per ``step.release()``."""

    def __init__(self, path: Path, step: threading.Semaphore, reads: list[int]) -> None:
        self._file = path.open("rb")
        self._step = step
        self._reads = reads
        self.closed = threading.Event()

    def read(self, n: int) -> bytes:
        if not self._step.acquire(timeout=10):
            raise TimeoutError("the test never released the read")
        data = self._file.read(n)
        self._reads.append(len(data))
        return data

    def __enter__(self) -> GatedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        self.closed.set()


async def test_cancellation_stops_the_worker_at_its_next_chunk_and_closes_the_file(
    root: Path,
) -> None:
    (root / "big.bin").write_bytes(b"x" * 64 * 1024)
    step = threading.Semaphore(0)
    reads: list[int] = []
    files: list[GatedFile] = []

    def opener(path: Path) -> IO[bytes]:
        files.append(GatedFile(path, step, reads))
        return files[-1]  # type: ignore[return-value]

    progress = Recorder()
    job = executor(root, chunk_bytes=4096, progress_interval=0, opener=opener)
    task = asyncio.create_task(job.run(context({"paths": ["big.bin"]}, progress=progress)))
    step.release()  # one chunk
    await progress.wait_for(2)  # "hashing 1 file(s)", then the first chunk
    assert progress.reports[1] == ("hashed 4096 of 65536 bytes", 6)
    task.cancel()  # what the runner does on a Cancel or a timeout
    await asyncio.sleep(0)  # one loop step: the executor handles it and asks the worker to stop
    step.release()  # the worker reads its next chunk, sees the stop, closes the file
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files[0].closed.is_set()
    assert reads == [4096, 4096]  # two chunks of sixteen: it stopped


async def test_a_file_that_changes_while_it_is_read_is_worth_a_retry(root: Path) -> None:
    target = root / "models" / "a.gguf"

    def opener(path: Path) -> IO[bytes]:
        file = path.open("rb")
        with target.open("ab") as writer:  # someone is still writing it
            writer.write(b"more")
        return file

    with pytest.raises(
        ExecutorError, match=re.escape("models/a.gguf changed while it was read")
    ) as err:
        await executor(root, opener=opener).run(context({"paths": ["models/a.gguf"]}))
    assert err.value.retryable


async def test_an_unreadable_file_fails_for_good(root: Path) -> None:
    def opener(path: Path) -> IO[bytes]:
        raise PermissionError(13, "Permission denied", str(path))

    with pytest.raises(
        ExecutorError, match=re.escape("cannot read models/b.gguf: permission denied")
    ) as err:
        await executor(root, opener=opener).run(context({"paths": ["models/b.gguf"]}))
    assert not err.value.retryable


def test_the_agent_finds_it_through_its_entry_point(root: Path) -> None:
    registry = ExecutorRegistry.discover(
        ["files.sha256"], settings=ExecutorSettings(environ={ROOT_ENV: str(root)})
    )
    loaded = registry.get(KIND)
    assert isinstance(loaded, ChecksumExecutor)
    assert loaded.root == root.resolve()
