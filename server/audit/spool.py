"""The audit spool: append-only, fsynced files of events the database could not take yet.

A spool directory holds segments, ``<creation ns>-<pid>-<random>.jsonl``, one JSON object
per line per event, each carrying a CRC-32 of its own canonical encoding. Whoever writes
or replays a segment holds an exclusive ``flock`` on it, so replicas sharing a data
directory never touch each other's segments; a segment no live process holds (left by a
crash or a stop while the database was away) is adopted and replayed by the next writer.
A crash in the middle of an append leaves a torn last line: it is cut off with a warning
when the segment is adopted (its events had not been acknowledged as spooled).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
import zlib
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from muster.server.audit.record import AuditRecord

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"
REJECTED = "rejected.jsonl"
"""Events the database refused as invalid (not unreachable): kept here, never replayed."""
_FORMAT = 1
_READ_BLOCK = 1 << 16


def encode(record: AuditRecord) -> bytes:
    """One spool line: the record's fields and a CRC-32 over their canonical JSON."""
    body: dict[str, Any] = {
        "v": _FORMAT,
        "event_id": record.event_id,
        "time": record.time.isoformat(timespec="microseconds"),
        "actor": record.actor,
        "action": record.action,
        "target": record.target,
        "outcome": record.outcome,
        "peer": record.peer,
        "request_id": record.request_id,
        "details": record.details,
    }
    body["crc"] = _crc(body)
    return _canonical(body).encode() + b"\n"


def decode(line: bytes) -> AuditRecord:
    """The record on one spool line; ValueError if the line is damaged."""
    try:
        body = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not JSON ({err})") from None
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    crc = body.pop("crc", None)
    if crc != _crc(body):
        raise ValueError("CRC mismatch")
    if body.get("v") != _FORMAT:
        raise ValueError(f"unknown spool format {body.get('v')!r}")
    try:
        return AuditRecord(
            event_id=str(body["event_id"]),
            time=datetime.fromisoformat(body["time"]),
            actor=str(body["actor"]),
            action=str(body["action"]),
            target=str(body["target"]),
            outcome=str(body["outcome"]),
            peer=str(body["peer"]),
            request_id=str(body["request_id"]),
            details=dict(body["details"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"malformed event ({type(err).__name__}: {err})") from None


def _canonical(body: dict[str, Any]) -> str:
    # ASCII only: a line is bytes-exact whatever the text in it.
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _crc(body: dict[str, Any]) -> str:
    return format(zlib.crc32(_canonical(body).encode()), "08x")


class Segment:
    """One spool file, held under an exclusive lock for as long as this object is open."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self._fd = fd
        self.size = size
        """Bytes in the file (every one of them whole lines)."""
        self.read_offset = 0
        """Where replay continues: everything before it is in the database."""

    def __repr__(self) -> str:
        return f"Segment({str(self.path)!r}, size={self.size}, read_offset={self.read_offset})"

    @classmethod
    def create(cls, directory: Path) -> Segment:
        """A new, empty segment of this process in ``directory`` (made 0700 if missing)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        path = directory / name
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _fsync_dir(directory)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, 0)

    @classmethod
    def adopt(cls, path: Path) -> Segment | None:
        """Take over a segment no live process holds; None if another one holds it (or it went)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # replayed and removed by its holder between our open and our lock
                os.close(fd)
                return None
            size = _cut_torn_tail(fd, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        return cls(path, fd, size)

    def append(self, records: Iterable[AuditRecord]) -> None:
        """Append and fsync; on failure the file is cut back, so it holds only whole lines."""
        data = b"".join(encode(r) for r in records)
        if not data:
            return
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            raise
        self.size += len(data)

    def read(self, offset: int, max_events: int) -> tuple[list[AuditRecord], int]:
        """Up to ``max_events`` records from ``offset``, and the offset after them.

        A damaged line is skipped with an error in the log (appends are whole lines and
        fsynced, so this means the disk or someone else changed the file).
        """
        records: list[AuditRecord] = []
        buffer = b""
        position = offset
        while len(records) < max_events and position < self.size:
            chunk = os.pread(self._fd, max(_READ_BLOCK, len(buffer)), position + len(buffer))
            if not chunk:
                break
            buffer += chunk
            while len(records) < max_events:
                end = buffer.find(b"\n")
                if end < 0:
                    break
                line, buffer = buffer[: end + 1], buffer[end + 1 :]
                try:
                    records.append(decode(line))
                except ValueError as err:
                    log.error(
                        "audit spool %s: skipping a damaged line at byte %d (%s)",
                        self.path,
                        position,
                        err,
                    )
                position += len(line)
        return records, position

    def remove(self) -> None:
        """Delete the file (everything in it is in the database) and let go of it."""
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            _fsync_dir(self.path.parent)
        self.close()

    def close(self) -> None:
        """Let go of the file (and its lock), keeping it for whoever comes next."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def adopt_all(directory: Path) -> list[Segment]:
    """Every segment in ``directory`` that no live process holds, oldest first."""
    if not directory.is_dir():
        return []
    adopted = []
    for path in sorted(directory.glob("*" + SUFFIX)):
        if path.name == REJECTED:
            continue
        segment = Segment.adopt(path)
        if segment is None:
            continue
        if segment.size == 0:
            segment.remove()
            continue
        log.warning(
            "audit spool %s holds %d bytes of events from an earlier run; replaying them",
            path,
            segment.size,
        )
        adopted.append(segment)
    return adopted


def reject(directory: Path, records: Sequence[AuditRecord]) -> None:
    """Keep events the database refused as invalid, so an operator can look at them."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / REJECTED, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"".join(encode(r) for r in records))
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(fd: int, path: Path) -> int:
    """Drop a last line that a crash left without its newline; returns the size after."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(0, end - _READ_BLOCK)
        block = os.pread(fd, end - start, start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end < size:
        log.warning(
            "audit spool %s: dropping a torn last line of %d bytes "
            "(a crash interrupted its write before it was acknowledged)",
            path,
            size - end,
        )
        os.ftruncate(fd, end)
        os.fsync(fd)
    return end


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
