"""Giving every benchmark variant the same memory state on these VMs.

The guest kernel runs with virtio-balloon free page reporting: memory the guest frees is
reported to the host about two seconds later and unmapped there, and touching it again costs
a host fault each page, about 0.7 s per GiB (20 GiB of fresh anonymous memory took 56 s of
system time to touch the first time, 8 GiB took 8.3 s right after). A variant that writes a
GiB of page cache was fast when it found memory freed a moment before and slow when it found
memory freed long ago, so which one got which depended on what ran before it, and samples were
bimodal. The helpers below take that out of the comparison (docs/performance.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

MIB = 1024 * 1024


def recycle(path: Path, size_mb: int) -> None:
    """Write ``size_mb`` MiB of page cache at ``path`` and free it at once.

    Call it just before a variant that writes about that much into new files: it then finds
    recently freed memory, whatever ran before it.
    """
    block = b"\0" * MIB
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(block)
    path.unlink()


def overwrite(path: str, buffering: int = -1) -> IO[bytes]:
    """``path`` opened for writing from its start and not truncated; the writer truncates at its
    end (``f.truncate()``), so an output rewritten every round keeps the memory it has."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    return open(fd, "wb", buffering=buffering)
