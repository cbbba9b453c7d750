"""A big part half downloaded: the partial file and the record of which of its bytes are good.

``<state>/partial/<folder>/<name>.big.part`` holds the object's bytes at their own offsets;
``<name>.big.part.json`` beside it records the object's ETag and size and the byte extents
already written. A download fills the file out of order (parallel ranges), checkpoints the
record now and then (data synced first, so the record never claims bytes a crash lost), and
hands the finished, synced file to the cache, which renames it into place. A later download of
the same object, also after a daemon restart, fetches only what the record lacks.

Both files are untrusted input: a record that does not parse, names another ETag or size,
claims bytes past the end of the file, or a file that is not a regular file all mean "start
over". Partial files are no cache entries (the cache never lists them), but they take disk
space: those older than a configured age are removed when the daemon starts, and under a cache
size limit ``usage`` and ``prune`` let a new download make room.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from azaiond.cdn import ObjectInfo
from azaiond.errors import StorageError
from azaiond.fsutil import atomic_write, fsync_dir, private_dir

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
RECORD_SUFFIX = ".part.json"


class Extents:
    """Disjoint, sorted byte ranges ``[start, end)``; adjacent ones are merged."""

    def __init__(self, spans: list[tuple[int, int]] | None = None) -> None:
        self.spans: list[tuple[int, int]] = []
        for start, end in spans or []:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        out: list[tuple[int, int]] = []
        placed = False
        for a, b in self.spans:
            if b < start:
                out.append((a, b))
            elif end < a:
                if not placed:
                    out.append((start, end))
                    placed = True
                out.append((a, b))
            else:  # overlapping or touching: swallow it
                start, end = min(a, start), max(b, end)
        if not placed:
            out.append((start, end))
        self.spans = out

    def total(self) -> int:
        return sum(b - a for a, b in self.spans)

    def prefix(self) -> int:
        """How many bytes from offset 0 are all present."""
        return self.spans[0][1] if self.spans and self.spans[0][0] == 0 else 0

    def covers(self, start: int, end: int) -> bool:
        return any(a <= start and end <= b for a, b in self.spans)

    def gaps(self, size: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos = 0
        for a, b in self.spans:
            if a > pos:
                out.append((pos, min(a, size)))
            pos = max(pos, b)
        if pos < size:
            out.append((pos, size))
        return [(a, b) for a, b in out if b > a]

    def copy(self) -> Extents:
        other = Extents()
        other.spans = list(self.spans)
        return other


def _extents(spans: object, limit: int) -> Extents | None:
    """Spans from a record, if every one is a pair of ints within ``[0, limit]``."""
    if not isinstance(spans, list):
        return None
    extents = Extents()
    for span in spans:
        if not (isinstance(span, list) and len(span) == 2 and all(type(v) is int for v in span)):
            return None
        start, end = span
        if not 0 <= start < end <= limit:
            return None
        extents.add(start, end)
    return extents


def storage_error(exc: OSError, path: Path, doing: str) -> StorageError:
    return StorageError(f"{doing} {path} failed: {exc.strerror or type(exc).__name__}")


class PartialFile:
    """The partial file of one object and its record; one writer at a time (the download)."""

    def __init__(self, root: Path, folder: str, name: str) -> None:
        self.dir = root / folder
        self.path = self.dir / f"{name}{PART_SUFFIX}"
        self.record = self.dir / f"{name}{RECORD_SUFFIX}"
        self.fd = -1

    def open(self, info: ObjectInfo) -> Extents:
        """Open (or create) the file for ``info``; returns the extents it already holds."""
        try:
            private_dir(self.dir)
            extents = self._trusted_extents(info)
            if extents is None:
                self.discard()
                extents = Extents()
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            self.fd = os.open(self.path, flags, 0o600)
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                raise StorageError(f"{self.path} is not a regular file")
        except OSError as exc:
            raise storage_error(exc, self.path, "opening") from exc
        if extents.total():
            log.info("resuming %s: %d of %d bytes already here", self.path, extents.total(), info.size)
        return extents

    def _trusted_extents(self, info: ObjectInfo) -> Extents | None:
        """The record's extents if record and file both check out for ``info``, else None."""
        try:
            data = json.loads(self.record.read_text(encoding="utf-8"))
            st = os.stat(self.path, follow_symlinks=False)
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not stat.S_ISREG(st.st_mode):
            return None
        if data.get("etag") != info.etag or data.get("size") != info.size or not info.etag:
            log.info("%s is of another version of the object: starting over", self.path)
            return None
        return _extents(data.get("extents"), min(info.size, st.st_size))

    def checkpoint(self, info: ObjectInfo, extents: Extents) -> None:
        """Persist which bytes are good: sync the data first, then replace the record."""
        try:
            os.fdatasync(self.fd)
            body = {"etag": info.etag, "size": info.size, "extents": [list(s) for s in extents.spans]}
            atomic_write(self.record, json.dumps(body).encode())
        except OSError as exc:
            raise storage_error(exc, self.record, "writing") from exc

    def commit(self, install: Callable[[Path], None]) -> None:
        """Sync the complete file and have ``install`` move it into the cache (it raises
        ``StorageError`` itself), then forget the record."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise storage_error(exc, self.path, "storing") from exc
        install(self.path)
        with contextlib.suppress(OSError):
            self.record.unlink()
            fsync_dir(self.dir)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Remove file and record: nothing in them may be trusted any more."""
        for path in (self.record, self.path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def sweep(root: Path, max_age: float, now: float | None = None) -> int:
    """Remove partial files and records older than ``max_age`` seconds; returns how many."""
    now = time.time() if now is None else now
    removed = 0
    try:
        if not root.is_dir():
            return 0
        for path in root.rglob("*"):
            if not path.name.endswith((PART_SUFFIX, RECORD_SUFFIX)):
                continue
            with contextlib.suppress(OSError):
                st = path.lstat()
                if now - st.st_mtime > max_age:
                    path.unlink()
                    removed += 1
    except OSError as exc:  # an unusable state dir: each load that needs it answers storage
        log.warning("cannot sweep the partial downloads under %s: %s", root, exc.strerror)
    if removed:
        log.info("removed %d stale partial download file(s) under %s", removed, root)
    return removed


def _parts(root: Path, skip: set[Path]) -> list[tuple[float, int, Path]]:
    """(mtime, bytes on the disk, path) of the partial files under ``root`` not in ``skip``."""
    found: list[tuple[float, int, Path]] = []
    with contextlib.suppress(OSError):
        for path in root.rglob(f"*{PART_SUFFIX}"):
            if path in skip:
                continue
            with contextlib.suppress(OSError):
                st = path.lstat()
                if stat.S_ISREG(st.st_mode):
                    found.append((st.st_mtime, st.st_blocks * 512, path))  # sparse: what it holds
    return found


def usage(root: Path, skip: set[Path]) -> int:
    """Bytes the partial files under ``root`` (but those in ``skip``) take on the disk."""
    return sum(size for _, size, _ in _parts(root, skip))


def prune(root: Path, need: int, skip: set[Path]) -> int:
    """Remove partial files (and their records) oldest first until ``need`` bytes are freed."""
    freed = 0
    for _, size, path in sorted(_parts(root, skip)):
        if freed >= need:
            break
        for victim in (path.with_name(path.name[: -len(PART_SUFFIX)] + RECORD_SUFFIX), path):
            with contextlib.suppress(FileNotFoundError):
                victim.unlink()
        freed += size
        log.info("removed the partial download %s (%d bytes) to make room", path, size)
    return freed
