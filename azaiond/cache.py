"""The big-part cache under ``<state>/cache/<folder>/<name>.big``: binding, pins and LRU eviction.

Each entry has a sidecar ``<name>.big.meta`` holding the SHA-256 of the small part the entry
was written with. v1 cannot tell a big part of another version by decrypting, so an entry whose
sidecar names another small part (or is missing, unreadable or wrong) is stale and never served.

Writers never expose a half pair: an entry is installed under its per-entry lock by removing
the old sidecar, renaming the new big part into place and then writing the new sidecar, each
step atomic. A crash between the steps leaves an entry without a sidecar, which counts as
stale and is fetched again. Readers check the sidecar and open the entry under the same lock,
so the descriptor they read is the entry the sidecar vouched for.

Eviction: with a limit, least recently used entries go once the total is past it, except
entries that are pinned (a load, a prefetch or an upload is using them). ``last_used`` is the
entry's mtime, touched on every use, so the order survives a restart. The in-memory index is
rebuilt from the disk at start and by ``entries()``; ``total_bytes`` is a plain attribute that
quick callers (``status``) read without taking a lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from azaiond.errors import StorageError
from azaiond.fsutil import atomic_write, fsync_dir, private_dir

log = logging.getLogger(__name__)

ENTRY_SUFFIX = ".big"
SIDECAR_SUFFIX = ".big.meta"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # as names.check_name
_MAX_SIDECAR = 4096  # a real one is under 200 bytes; anything longer is not ours

Key = tuple[str, str]  # (folder, name)


@dataclass(frozen=True)
class Entry:
    folder: str
    name: str
    size: int
    last_used: float

    def as_dict(self) -> dict[str, object]:
        return {"folder": self.folder, "name": self.name, "size": self.size, "last_used": self.last_used}


class BigPartCache:
    def __init__(self, root: Path, limit_bytes: int = 0) -> None:
        self.root = root
        self.limit_bytes = limit_bytes
        self.total_bytes = 0
        self._lock = threading.Lock()  # index and pins; never held while taking a flight lock
        self._index: dict[Key, Entry] = {}
        self._pins: Counter[Key] = Counter()
        self._flights: dict[Key, threading.Lock] = {}
        self._warned: set[Path] = set()
        # Counters since start, for metrics: entries served, fetched, evicted.
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.rescan()

    # -- paths and locks -----------------------------------------------------------------

    def path(self, folder: str, name: str) -> Path:
        return self.root / folder / f"{name}{ENTRY_SUFFIX}"

    def sidecar(self, folder: str, name: str) -> Path:
        return self.root / folder / f"{name}{SIDECAR_SUFFIX}"

    def flight(self, folder: str, name: str) -> threading.Lock:
        """The per-entry lock: one fetch at a time, and readers check and open under it."""
        with self._lock:
            return self._flights.setdefault((folder, name), threading.Lock())

    @contextlib.contextmanager
    def pinned(self, folder: str, name: str) -> Iterator[None]:
        """Keep the entry from eviction while the block runs (pin before looking it up)."""
        key = (folder, name)
        with self._lock:
            self._pins[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._pins[key] -= 1
                if not self._pins[key]:
                    del self._pins[key]
            if self.limit_bytes and self.total_bytes > self.limit_bytes:
                self.evict()

    def set_limit(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        if limit_bytes and self.total_bytes > limit_bytes:
            self.evict()

    # -- the binding ---------------------------------------------------------------------

    def fingerprint(self, folder: str, name: str) -> str | None:
        """The small part's SHA-256 the entry was written with; None when missing or unusable."""
        side = self.sidecar(folder, name)
        try:
            with open(side, "rb") as handle:
                raw = handle.read(_MAX_SIDECAR + 1)
            entry_size = self.path(folder, name).stat().st_size
        except FileNotFoundError:
            return None  # no entry, or one cached before the binding existed: stale, quietly
        except OSError as exc:
            self._warn_once(side, f"cannot be read ({exc.strerror})")
            return None
        try:
            if len(raw) > _MAX_SIDECAR:
                raise ValueError("too long")
            data = json.loads(raw)
            digest, size = data["small_sha256"], data["big_size"]
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                raise ValueError("small_sha256 is not 64 lower-case hex digits")
            if isinstance(size, bool) or not isinstance(size, int) or size != entry_size:
                raise ValueError("big_size does not match the entry")
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            self._warn_once(side, f"is unusable ({type(exc).__name__}: {exc})")
            return None
        return digest

    def _warn_once(self, side: Path, problem: str) -> None:
        with self._lock:
            if side in self._warned:
                return
            self._warned.add(side)
        log.warning("cache sidecar %s %s; the entry counts as stale", side, problem)

    def open_valid(self, folder: str, name: str, fingerprint: str) -> IO[bytes] | None:
        """The entry opened for reading if it is bound to ``fingerprint``, else None.

        Call with the flight lock held, so no writer swaps the entry between check and open.
        """
        if self.fingerprint(folder, name) != fingerprint:
            return None
        try:
            handle = open(self.path(folder, name), "rb", buffering=0)  # noqa: SIM115 (caller closes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read the cache entry {self.path(folder, name)}: {exc.strerror}") from exc
        self.touch(folder, name)
        return handle

    # -- writing -------------------------------------------------------------------------

    def staging(self, folder: str, name: str) -> Path:
        """Where a fetch writes the complete big part before ``install`` (hidden, swept at start)."""
        try:
            directory = private_dir(self.root / folder)
        except OSError as exc:
            raise StorageError(f"cannot create the cache folder {self.root / folder}: {exc.strerror}") from exc
        return directory / f".{name}{ENTRY_SUFFIX}.fetch.tmp"

    def install(self, folder: str, name: str, fingerprint: str, staged: Path) -> int:
        """Make the complete big part at ``staged`` the entry, bound to ``fingerprint``.

        Call with the flight lock held. Returns the entry's size.
        """
        path, side = self.path(folder, name), self.sidecar(folder, name)
        try:
            with contextlib.suppress(FileNotFoundError):
                side.unlink()  # from here on the old entry counts as stale
            size = staged.stat().st_size
            private_dir(path.parent)  # a download may be staged outside the cache (partial files)
            os.replace(staged, path)
            fsync_dir(path.parent)
            atomic_write(side, json.dumps({"small_sha256": fingerprint, "big_size": size}).encode())
        except OSError as exc:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise StorageError(f"cannot write the cache entry {path}: {exc.strerror}") from exc
        with self._lock:
            self._warned.discard(side)
            self._account((folder, name), Entry(folder, name, size, time.time()))
        if self.limit_bytes and self.total_bytes > self.limit_bytes:
            self.evict()
        return size

    def fill(self, folder: str, name: str, fingerprint: str, fetch: Callable[[Path], object]) -> int:
        """Fetch into the staging path with ``fetch(path)`` and install it; flight lock held."""
        staged = self.staging(folder, name)
        try:
            fetch(staged)
        except BaseException:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise
        return self.install(folder, name, fingerprint, staged)

    def touch(self, folder: str, name: str) -> None:
        now = time.time()
        with contextlib.suppress(OSError):
            os.utime(self.path(folder, name), (now, now))
        with self._lock:
            entry = self._index.get((folder, name))
            if entry is not None:
                self._index[(folder, name)] = Entry(folder, name, entry.size, now)

    # -- dropping and eviction -----------------------------------------------------------

    def drop(self, folder: str, name: str) -> int:
        """Remove one entry (sidecar first); returns the bytes freed."""
        path, side = self.path(folder, name), self.sidecar(folder, name)
        freed = 0
        try:
            with contextlib.suppress(FileNotFoundError):
                side.unlink()
            with contextlib.suppress(FileNotFoundError):
                freed = path.stat().st_size
                path.unlink()
        except OSError as exc:
            raise StorageError(f"cannot remove the cache entry {path}: {exc.strerror}") from exc
        with self._lock:
            self._account((folder, name), None)
        return freed

    def drop_many(self, folder: str | None = None, name: str | None = None) -> tuple[int, int]:
        """Drop one entry, a folder's or all; returns (entries dropped, bytes freed)."""
        dropped = freed = 0
        for entry in self.entries():
            if (folder is None or entry.folder == folder) and (name is None or entry.name == name):
                with self.flight(entry.folder, entry.name):
                    freed += self.drop(entry.folder, entry.name)
                dropped += 1
        return dropped, freed

    def evict(self, room: int = 0) -> int:
        """Drop least recently used unpinned entries until ``total + room`` fits the limit."""
        if not self.limit_bytes:
            return 0
        evicted = 0
        with self._lock:
            order = sorted(self._index.values(), key=lambda e: e.last_used)
            pinned = set(self._pins)
        for entry in order:
            if self.total_bytes + room <= self.limit_bytes:
                break
            key = (entry.folder, entry.name)
            if key in pinned:
                continue
            lock = self.flight(*key)
            if not lock.acquire(blocking=False):
                continue  # someone is fetching or checking it right now
            try:
                with self._lock:
                    if key in self._pins:
                        continue
                freed = self.drop(*key)
            finally:
                lock.release()
            evicted += 1
            self.evictions += 1
            log.info("evicted %s/%s from the cache (%d bytes, least recently used)", *key, freed)
        return evicted

    # -- the index -----------------------------------------------------------------------

    def _account(self, key: Key, entry: Entry | None) -> None:
        old = self._index.pop(key, None)
        if old is not None:
            self.total_bytes -= old.size
        if entry is not None:
            self._index[key] = entry
            self.total_bytes += entry.size

    def rescan(self) -> None:
        """Rebuild the index from the disk (entries removed or added behind our back)."""
        found: dict[Key, Entry] = {}
        with contextlib.suppress(FileNotFoundError):
            for folder_dir in self.root.iterdir():
                if not folder_dir.is_dir() or not _NAME.fullmatch(folder_dir.name):
                    continue
                for item in folder_dir.iterdir():
                    fname = item.name
                    if not fname.endswith(ENTRY_SUFFIX):
                        continue
                    name = fname[: -len(ENTRY_SUFFIX)]
                    if not _NAME.fullmatch(name):
                        continue
                    try:
                        st = item.stat()
                    except OSError:
                        continue
                    found[(folder_dir.name, name)] = Entry(folder_dir.name, name, st.st_size, st.st_mtime)
        with self._lock:
            self._index = found
            self.total_bytes = sum(e.size for e in found.values())

    def entries(self) -> list[Entry]:
        self.rescan()
        with self._lock:
            return sorted(self._index.values(), key=lambda e: (e.folder, e.name))
