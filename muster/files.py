"""Crash-safe file writes shared by the server (CA material) and the agent (its state dir):
a reader sees the old file or the new one, never half of one, and a key never exists with
looser permissions than asked for."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700
TMP_SUFFIX = ".tmp"


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) as 0700, tightening it if it already exists looser."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    # mkdir's mode goes through the umask, and an existing dir keeps its mode.
    if path.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
        path.chmod(PRIVATE_DIR_MODE)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path, data: bytes, *, mode: int = PRIVATE_FILE_MODE, overwrite: bool = True
) -> None:
    """Write ``path`` with ``data`` durably, with ``mode`` from the first byte on.

    The bytes go to a fresh temporary file beside the target (O_EXCL, created
    with ``mode``), are fsynced, then put in place and the directory is fsynced:
    ``os.replace`` swaps an existing file; with ``overwrite=False`` ``os.link``
    refuses to, raising FileExistsError.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def remove_durably(path: Path) -> bool:
    """Unlink ``path`` and fsync its directory; False if it was already gone."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True
