"""File-system helpers for the state dir: private directories and crash-safe writes.

Every failure of the host's own disk here (full, read-only, quota, I/O error) is raised as
``StorageError`` naming the path, never as a bare ``OSError``, so a caller can tell the host's
disk from the caller's own descriptor failing.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from azaiond.errors import StorageError


def storage_error(exc: OSError, path: Path | str) -> StorageError:
    """The ``StorageError`` for ``exc`` on ``path`` (the message says which path, and why)."""
    return StorageError(f"the host's disk failed at {path}: {exc.strerror or type(exc).__name__}")


class _StorageFile(io.FileIO):
    """A file of ours: a failed write is the host's disk failing."""

    def write(self, data: Any, /) -> int:
        try:
            return super().write(data)
        except OSError as exc:
            raise storage_error(exc, str(self.name)) from exc


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as 0700 if missing; tighten it if it exists."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError as exc:
        raise storage_error(exc, path) from exc
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
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise storage_error(exc, path.parent) from exc
    body_failed = False
    try:
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        # Reopened by name so that handle.name is the temp path (for uploads by path).
        with io.BufferedWriter(_StorageFile(tmp, "wb")) as handle:
            try:
                yield handle
            except BaseException:
                body_failed = True  # the caller's own error (its input failing, say): passed on as is
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        _discard(tmp)
        if body_failed:
            raise
        raise storage_error(exc, path) from exc
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str) -> None:
    # A disk that failed may refuse this too; a sweep at the next start finds the name.
    with contextlib.suppress(OSError):
        os.unlink(tmp)


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
