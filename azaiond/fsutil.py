"""File-system helpers for the state dir: private directories and crash-safe writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as 0700 if missing; tighten it if it exists."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o600) -> Iterator[IO[bytes]]:
    """Write into a temp file beside ``path``; fsync and rename it over ``path`` only on success.

    Temp names start with ``.`` and end with ``.tmp`` so that a sweep after a crash finds them
    and no reader ever takes one for a real entry.
    """
    # Create a missing parent privately, but never change the mode of one that exists: the
    # caller may write beside files it does not own (azaionctl seal-images into the cwd).
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        # Reopened by name so that handle.name is the temp path (for uploads by path).
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    with atomic_file(path, mode) as handle:
        handle.write(data)


def sweep_temp_files(root: Path) -> int:
    """Remove temp files a crash left under ``root``; returns how many."""
    removed = 0
    if root.is_dir():
        for tmp in root.rglob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed
