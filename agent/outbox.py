"""Results not yet acknowledged, one durable file each, so a crash or a lost stream loses none.

A Result is written (fsynced, renamed into place) before it is sent, and its file
is removed only when the server Acks it; on every new stream the agent resends
whatever is left.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from urllib.parse import quote

from google.protobuf.message import DecodeError

from muster.files import TMP_SUFFIX, ensure_private_dir, remove_durably, write_atomic
from muster.v1 import agent_pb2

log = logging.getLogger(__name__)

SUFFIX = ".result"
_MAX_NAME = 180


def file_name(task_id: str, attempt: int) -> str:
    """A safe, unique file name for one attempt: the task id percent-encoded, then the attempt."""
    encoded = quote(task_id, safe="")
    if len(encoded) > _MAX_NAME or not encoded:
        # Task ids are opaque; keep absurdly long ones within the file-name limit.
        encoded = "sha256-" + hashlib.sha256(task_id.encode()).hexdigest()
    return f"{encoded}@{attempt}{SUFFIX}"


class Outbox:
    """The on-disk queue of Results awaiting an Ack, keyed by (task_id, attempt)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        ensure_private_dir(path)
        self._clean_temporaries()

    def put(self, result: agent_pb2.Result) -> None:
        """Store ``result`` durably, replacing any earlier one for the same attempt."""
        target = self.path / file_name(result.task_id, result.attempt)
        write_atomic(target, result.SerializeToString())

    def remove(self, task_id: str, attempt: int) -> bool:
        """Drop the Result for this attempt; False when there was none."""
        return remove_durably(self.path / file_name(task_id, attempt))

    def get(self, task_id: str, attempt: int) -> agent_pb2.Result | None:
        return self._read(self.path / file_name(task_id, attempt))

    def __contains__(self, ref: tuple[str, int]) -> bool:
        return (self.path / file_name(*ref)).is_file()

    def __len__(self) -> int:
        return sum(1 for _ in self._files())

    def pending(self) -> list[agent_pb2.Result]:
        """Every stored Result, oldest first (resend order follows completion order)."""
        files = sorted(self._files(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        results = []
        for path in files:
            result = self._read(path)
            if result is not None:
                results.append(result)
        return results

    def _files(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name.endswith(SUFFIX) and p.is_file()]

    def _read(self, path: Path) -> agent_pb2.Result | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        result = agent_pb2.Result()
        try:
            result.ParseFromString(data)
        except DecodeError:
            # Writes are atomic, so this is outside damage: set it aside for a human.
            aside = path.with_name(path.name + ".corrupt")
            path.replace(aside)
            log.error("outbox file %s is not a valid Result; moved it to %s", path, aside)
            return None
        return result

    def _clean_temporaries(self) -> None:
        """Remove temp files from writes a crash interrupted; they were never committed."""
        for path in self.path.iterdir():
            if path.name.startswith(".") and path.name.endswith(TMP_SUFFIX):
                path.unlink(missing_ok=True)
