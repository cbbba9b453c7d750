"""Sealed memory files (memfd_create): plaintext handed to a caller without touching a filesystem.

The daemon writes the plaintext into an anonymous memory file, then seals it against writes,
growing, shrinking and further seal changes, and passes the descriptor back. The caller can
read or mmap it (read-only: a shared writable mapping is refused once F_SEAL_WRITE is set)
and knows the bytes cannot change under it. The pages belong to the file until the last
descriptor and mapping are gone.
"""

from __future__ import annotations

import fcntl
import os

from azaiond.errors import StorageError

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def create(name: str) -> int:
    """A new, empty, sealable memfd (close-on-exec); ``name`` shows in /proc/PID/fd only."""
    try:
        return os.memfd_create(name[:200], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise StorageError(f"cannot create a memory file: {exc.strerror or exc}") from exc


def seal(fd: int) -> None:
    """Forbid every change from now on, this process's included."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError as exc:
        raise StorageError(f"cannot seal the memory file: {exc.strerror or exc}") from exc
