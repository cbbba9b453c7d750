"""Split resources (docs/formats.md): a small part on the Resource API, a big part on the CDN.

Upload: ``ct = encrypt(data, resource_key)``; the first ``n = min(small_part_kb KiB, 30 % of ct)``
bytes go to the API as ``<name>.small``, the rest to the CDN as ``<folder>/<name>.big`` and to
the local cache. Load: the small part from the API, the big part from the cache or else the
CDN, and ``decrypt(small || big)`` streamed into any writable sink.

Both directions stream with memory that does not grow with the resource. Before a single
plaintext byte is written, a load vets the padding from the last two cipher blocks, so a
truncated or tail-tampered cached part is dropped and fetched again from the CDN once. Loads
that miss the same big part share one download (single flight).

v1 has no MAC: tampering that keeps the padding valid yields wrong bytes, undetected. See
docs/security.md. Format v2 (azaiond/splitv2.py) is authenticated; a load tells the two apart by
the small part, an upload writes the one the call or ``resources.format`` asks for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from azaiond import crypto
from azaiond.apiclient import ResourceApi
from azaiond.cdn import Cdn
from azaiond.errors import Cancelled, IntegrityError, InvalidParams, NotAuthenticated
from azaiond.fsutil import atomic_file, private_dir
from azaiond.generations import Generations
from azaiond.names import check_bucket, check_name
from azaiond.sealed import CHUNK_LOG2
from azaiond.splitv2 import SplitV2, is_v2_small

log = logging.getLogger(__name__)


class Input(Protocol):
    """What an upload reads from: a file, a pipe or a buffer."""

    def read(self, size: int = -1, /) -> bytes: ...

    def readinto(self, buffer: memoryview, /) -> int | None: ...


FORMATS = (1, 2)


@dataclass(frozen=True)
class LoadResult:
    size: int
    sha256: str
    format: int = 1
    generation: int | None = None  # v2 only


@dataclass(frozen=True)
class UploadResult:
    size: int
    small_size: int
    big_size: int
    format: int = 1


def small_size(ciphertext_len: int, small_part_kb: int) -> int:
    return min(small_part_kb * 1024, ciphertext_len * 3 // 10)


class SplitResources:
    def __init__(
        self,
        api: ResourceApi,
        cdn: Callable[[], Cdn],
        cache_dir: Path,
        resource_key: Callable[[], str | None],
        small_part_kb: int = 3,
        *,
        generations: Generations | None = None,
        upload_format: int = 1,
        chunk_log2: int = CHUNK_LOG2,
    ) -> None:
        self._api = api
        self._cdn = cdn
        self.cache_dir = cache_dir
        self._resource_key = resource_key
        self._small_part_kb = small_part_kb
        self._flights: dict[Path, threading.Lock] = {}
        self._flights_guard = threading.Lock()
        self._format = upload_format
        generations = generations or Generations(cache_dir.parent / "generations.json")
        self.v2 = SplitV2(api, cdn, self, generations, chunk_log2)

    def _key(self) -> bytes:
        secret = self._resource_key()
        if not secret:
            raise NotAuthenticated("no resource key: install the 'resource-key' credential or set resources.key")
        return crypto.aes_key(secret)

    def cache_path(self, name: str, folder: str) -> Path:
        return self.cache_dir / folder / f"{name}.big"

    # The v2 path's view of the cache (splitv2.CacheAccess).
    def open_big(self, name: str, folder: str, small: bytes) -> tuple[IO[bytes], bool]:
        path = self.cache_path(name, folder)
        fetched = self._ensure_cached(name, folder, path, refetch=False)
        try:
            return open(path, "rb", buffering=0), fetched
        except FileNotFoundError:  # a concurrent load dropped a bad entry in between: fetch it
            self._ensure_cached(name, folder, path, refetch=False)
            return open(path, "rb", buffering=0), True

    def drop_big(self, name: str, folder: str) -> None:
        self._drop(self.cache_path(name, folder))

    def _flight(self, path: Path) -> threading.Lock:
        with self._flights_guard:
            return self._flights.setdefault(path, threading.Lock())

    # -- load ----------------------------------------------------------------------------

    def load(self, name: str, folder: str, sink: crypto.Sink, cancel: threading.Event | None = None) -> LoadResult:
        check_name(name)
        check_name(folder, "folder")
        check_bucket(folder)
        key = self._key()
        small = self._api.get_resource(folder, f"{name}.small")
        if is_v2_small(small):
            v2 = self.v2.load(name, folder, small, key, sink=sink, cancel=cancel)
            return LoadResult(v2.size, v2.sha256, 2, v2.generation)
        path = self.cache_path(name, folder)
        fetched = self._ensure_cached(name, folder, path, refetch=False)
        try:
            self._vet(small, path, key)
        except IntegrityError:
            if fetched:  # straight from the CDN and still bad: keep nobody from trusting it
                self._drop(path)
                raise
            log.warning("cached big part %s fails verification; fetching it again from the CDN", path)
            self._ensure_cached(name, folder, path, refetch=True)
            try:
                self._vet(small, path, key)
            except IntegrityError:
                self._drop(path)
                raise
        try:
            return self._decrypt(small, path, key, sink, cancel)
        except IntegrityError:
            # The tail was vetted, so this means the file changed under us; never trust it again.
            self._drop(path)
            raise

    def _ensure_cached(self, name: str, folder: str, path: Path, *, refetch: bool) -> bool:
        """Make sure ``path`` holds the big part; True if this call (or a peer's) fetched it now."""
        with self._flight(path):
            if refetch:
                self._drop(path)
            elif path.exists():
                return False
            private_dir(path.parent)
            self._cdn().download_to(folder, f"{name}.big", path)
            return True

    def _drop(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    @staticmethod
    def _vet(small: bytes, path: Path, key: bytes) -> None:
        """Check length and padding of ``small || big`` from its last two blocks alone."""
        with open(path, "rb") as big:
            big_len = os.fstat(big.fileno()).st_size
            total = len(small) + big_len
            if total < crypto.IV_SIZE + crypto.BLOCK or total % crypto.BLOCK:
                raise IntegrityError("decryption failed")
            take = min(big_len, 2 * crypto.BLOCK)
            big.seek(big_len - take)
            tail = big.read(take)
        crypto.check_tail((small + tail)[-2 * crypto.BLOCK :] if take < 2 * crypto.BLOCK else tail, key)

    @staticmethod
    def _decrypt(
        small: bytes, path: Path, key: bytes, sink: crypto.Sink, cancel: threading.Event | None
    ) -> LoadResult:
        with open(path, "rb", buffering=0) as big:
            pending = memoryview(small)

            def read(buf: memoryview) -> int:
                nonlocal pending
                if cancel is not None and cancel.is_set():
                    raise Cancelled("the daemon is shutting down; the load was stopped")
                if pending:
                    n = min(len(pending), len(buf))
                    buf[:n] = pending[:n]
                    pending = pending[n:]
                    return n
                return big.readinto(buf) or 0

            size, digest = crypto.decrypt_chunks(read, sink, key)
        return LoadResult(size, digest)

    # -- upload --------------------------------------------------------------------------

    def upload(
        self,
        name: str,
        folder: str,
        source: Input,
        cancel: threading.Event | None = None,
        *,
        format: int | None = None,
        size: int | None = None,
    ) -> UploadResult:
        """Upload ``source`` in ``format`` (default ``resources.format``); ``size`` if known (v2)."""
        check_name(name)
        check_name(folder, "folder")
        check_bucket(folder)
        fmt = self._format if format is None else format
        if fmt not in FORMATS:
            raise InvalidParams(f"upload: format must be 1 or 2, not {fmt}")
        key = self._key()
        if fmt == 2:
            v2 = self.v2.upload(name, folder, source, size=size, root=key, cancel=cancel)
            return UploadResult(v2.size, v2.small_size, v2.big_size, 2)
        limit = self._small_part_kb * 1024
        # Once the ciphertext reaches 10/3 of the small part's size, the split point is fixed at
        # the full small size, so only this much plaintext is read ahead to decide it.
        head = _read_up_to(source, limit * 4)
        enc = crypto.StreamEncryptor(key)
        path = self.cache_path(name, folder)
        size = len(head)
        cdn = self._cdn()  # fails before any work when the CDN cannot be had
        # The big part is written to a temp file that becomes the cache entry, and each part of
        # it goes to the CDN as soon as it is written. The temp file is renamed into the cache
        # only once both parts are stored upstream, so a failed upload leaves no cache entry.
        with atomic_file(path) as big, cdn.growing_upload(folder, f"{name}.big", Path(big.name)) as cdn_part:
            ct_head = bytes(enc.update(head))
            if len(head) < limit * 4:  # the whole resource was read: compute the exact split
                ct_head += enc.finalize()
                cut = small_size(len(ct_head), self._small_part_kb)
                big.write(ct_head[cut:])
                small = ct_head[:cut]
            else:
                cut = limit
                small = ct_head[:cut]
                big.write(ct_head[cut:])
                buf = bytearray(crypto.CHUNK)
                view = memoryview(buf)
                while True:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("the daemon is shutting down; the upload was stopped")
                    n = source.readinto(view)
                    if not n:
                        break
                    size += n
                    big.write(enc.update(view[:n]))
                    cdn_part.advance(big)
                big.write(enc.finalize())
            cdn_part.finish(big)
            big_size = big.tell()
            self._api.upload(folder, f"{name}.small", small)
        log.info("uploaded %s/%s: %d bytes (small %d, big %d)", folder, name, size, len(small), big_size)
        return UploadResult(size=size, small_size=len(small), big_size=big_size)


def _read_up_to(source: Input, limit: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < limit:
        chunk = source.read(limit - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)
