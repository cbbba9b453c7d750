"""Pieces of the fault tests: short upstream deadlines, a fault proxy in front of a loopback URL,
and a small tmpfs to fill."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from tests.faultproxy import FaultProxy

# Short deadlines keep the fault tests fast; the defaults are far longer.
FAST = {
    "api": {"retries": 1, "timeout": 1.0, "backoff": 0.02, "deadline": 2.0},
    "cdn": {"retries": 1, "timeout": 1.0, "deadline": 2.0},
}


def start_proxy(url: str) -> FaultProxy:
    """A started fault proxy that forwards to the host and port of ``url``."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return FaultProxy(parts.hostname, parts.port).start()


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (mode 0700) for the duration."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
