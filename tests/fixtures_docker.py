"""Fixtures: a private dockerd on a temp socket, and helpers that build test images offline.

The engine is real (NOTES.md): ``dockerd`` with its own socket, data-root and exec-root under a
short temp dir (a Unix socket path must stay under 108 bytes), no networking, overlay2. It is
stopped by its PID at the end of the session. If it cannot start, the fixture fails with the
reason instead of skipping, so a broken CI machine never passes the docker tests silently.

Images come from ``docker import`` of a tiny rootfs, since there is no registry to pull from.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.devdocker import Dockerd, start_dockerd


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    """A running private Docker engine; fails (never skips) when it cannot start."""
    try:
        ctx = start_dockerd()
        engine = ctx.__enter__()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"cannot start a private dockerd: {exc}", pytrace=False)
    try:
        yield engine
    finally:
        ctx.__exit__(None, None, None)


class _RandomReader(io.RawIOBase):
    """``size`` bytes of os.urandom, read in pieces, so a big layer never sits in memory."""

    def __init__(self, size: int) -> None:
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self._left, 1024 * 1024)
        buf[:n] = os.urandom(n)
        self._left -= n
        return n


def write_rootfs_tar(out: Path, files: dict[str, bytes], random_size: int = 0) -> None:
    """A tiny rootfs as a tar: ``files`` by path, plus ``random.bin`` of ``random_size`` bytes."""
    with tarfile.open(out, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
        if random_size:
            info = tarfile.TarInfo("random.bin")
            info.size = random_size
            tar.addfile(info, io.BufferedReader(_RandomReader(random_size), 1024 * 1024))


def build_image(engine: Dockerd, name: str, workdir: Path, random_size: int = 0) -> str:
    """Create image ``name`` with ``docker import``; returns its ID (sha256:...)."""
    rootfs = workdir / f"rootfs-{os.getpid()}-{time.monotonic_ns()}.tar"
    files = {"etc/hello": f"hello from {name}\n".encode(), "etc/os-release": b"ID=azaion-test\n"}
    write_rootfs_tar(rootfs, files, random_size)
    try:
        engine.cli("import", str(rootfs), name)
    finally:
        rootfs.unlink()
    return engine.cli("image", "inspect", "--format", "{{.Id}}", name).strip()


def save_images(engine: Dockerd, names: list[str], out: Path) -> Path:
    """``docker save`` the images into ``out``; returns ``out``."""
    engine.cli("save", "-o", str(out), *names)
    return out
