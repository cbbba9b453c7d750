"""Split resources (SPEC section 6): a small part on the Resource API, a big part on the CDN.

Upload: ``ct = encrypt(data, resource_key)``; the first ``n = min(small_part_kb KiB, 30 % of ct)``
bytes go to the API as ``<name>.small``, the rest to the CDN as ``<folder>/<name>.big`` and to
the local cache. Load: the small part from the API, the big part from the cache or else the
CDN (fetch.py: parallel ranged GETs, read while they arrive, resumable), and
``decrypt(small || big)`` streamed into any writable sink.

Both directions stream with memory that does not grow with the resource. Before a single
plaintext byte is written, a load vets the padding from the last two cipher blocks, so a
truncated or tail-tampered cached part is dropped and fetched again from the CDN once. Loads
that miss the same big part share one download.

v1 has no MAC: tampering that keeps the padding valid yields wrong bytes, undetected. See
docs/security.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from azaiond import crypto
from azaiond.apiclient import ResourceApi
from azaiond.bigpart import BigPart, CachedBigPart
from azaiond.cdn import Cdn, ObjectInfo
from azaiond.errors import Cancelled, IntegrityError, NotAuthenticated
from azaiond.fetch import Fetcher, Progress
from azaiond.fsutil import atomic_file
from azaiond.names import check_bucket, check_name

log = logging.getLogger(__name__)
MIB = 1024 * 1024


class Input(Protocol):
    """What an upload reads from: a file, a pipe or a buffer."""

    def read(self, size: int = -1, /) -> bytes: ...

    def readinto(self, buffer: bytearray, /) -> int | None: ...


@dataclass(frozen=True)
class LoadResult:
    size: int
    sha256: str


@dataclass(frozen=True)
class UploadResult:
    size: int
    small_size: int
    big_size: int


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
        fetcher: Fetcher | None = None,
    ) -> None:
        self._api = api
        self._cdn = cdn
        self.cache_dir = cache_dir
        self._resource_key = resource_key
        self._small_part_kb = small_part_kb
        # Cold loads: parallel ranged GETs into a resumable partial file beside the cache.
        self._fetcher = fetcher or Fetcher(cache_dir.parent / "partial", range_size=8 * MIB, parallel=4, retries=3)

    def _key(self) -> bytes:
        secret = self._resource_key()
        if not secret:
            raise NotAuthenticated("no resource key: install the 'resource-key' credential or set resources.key")
        return crypto.aes_key(secret)

    def cache_path(self, name: str, folder: str) -> Path:
        return self.cache_dir / folder / f"{name}.big"

    # -- load ----------------------------------------------------------------------------

    def load(
        self,
        name: str,
        folder: str,
        sink: crypto.Sink,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> LoadResult:
        check_name(name)
        check_name(folder, "folder")
        check_bucket(folder)
        key = self._key()
        small = self._api.get_resource(folder, f"{name}.small")
        path = self.cache_path(name, folder)
        big = self._big_part(name, folder, path, small, cancel=cancel, progress=progress)
        try:
            if isinstance(big, CachedBigPart):
                try:
                    self._vet(small, big, key)
                except IntegrityError:
                    log.warning("cached big part %s fails verification; fetching it again from the CDN", path)
                    big.close()
                    self._drop(path)
                    big = self._big_part(name, folder, path, small, cancel=cancel, progress=progress)
            try:
                if not isinstance(big, CachedBigPart):
                    self._vet(small, big, key)  # waits for the tail only: it is fetched early
                result = self._decrypt(small, big, key, sink, cancel)
            except IntegrityError as exc:
                # Straight from the CDN and bad, or a cache file that changed under us after
                # it was vetted: nobody may trust these bytes again.
                big.fail(exc)
                self._drop(path)
                raise
            big.finish()
            return result
        finally:
            big.close()

    def fetch_big(
        self, name: str, folder: str, cancel: threading.Event | None = None, progress: Progress | None = None
    ) -> int:
        """Make sure the big part is in the cache (nothing decrypted); returns its size."""
        check_name(name)
        check_name(folder, "folder")
        check_bucket(folder)
        big = self._big_part(name, folder, self.cache_path(name, folder), None, cancel=cancel, progress=progress)
        try:
            big.finish()
            return big.size
        finally:
            big.close()

    def _big_part(
        self,
        name: str,
        folder: str,
        path: Path,
        small: bytes | None,
        *,
        cancel: threading.Event | None,
        progress: Progress | None,
    ) -> BigPart:
        """The cache entry if there is one, else a reader of its download from the CDN (which
        joins a download of the same object already under way)."""
        while True:
            cached = CachedBigPart.find(path)
            if cached is not None:
                return cached
            reader = self._fetcher.open(
                self._cdn,
                folder,
                f"{name}.big",
                path,
                cancel=cancel,
                progress=progress,
                check=lambda info: self._check_object(info, small),
            )
            if reader is not None:
                return reader

    def _check_object(self, info: ObjectInfo, small: bytes | None) -> None:
        """Vet what the CDN's HEAD says before a byte of the big part is fetched or released.

        The place for checks of the object's metadata (``info.metadata``) against the small
        part the load holds (None when the big part is fetched without a load).
        """

    def _drop(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    @staticmethod
    def _vet(small: bytes, big: BigPart, key: bytes) -> None:
        """Check length and padding of ``small || big`` from its last two blocks alone."""
        total = len(small) + big.size
        if total < crypto.IV_SIZE + crypto.BLOCK or total % crypto.BLOCK:
            raise IntegrityError("decryption failed")
        take = min(big.size, 2 * crypto.BLOCK)
        tail = big.pread(big.size - take, take)
        crypto.check_tail((small + tail)[-2 * crypto.BLOCK :] if take < 2 * crypto.BLOCK else tail, key)

    @staticmethod
    def _decrypt(
        small: bytes, big: BigPart, key: bytes, sink: crypto.Sink, cancel: threading.Event | None
    ) -> LoadResult:
        pending = memoryview(small)

        def read(buf: memoryview) -> int:
            nonlocal pending
            if cancel is not None and cancel.is_set():
                raise Cancelled("the load was stopped: the daemon is shutting down or the caller went away")
            if pending:
                n = min(len(pending), len(buf))
                buf[:n] = pending[:n]
                pending = pending[n:]
                return n
            return big.readinto(buf)

        size, digest = crypto.decrypt_chunks(read, sink, key)
        return LoadResult(size, digest)

    # -- upload --------------------------------------------------------------------------

    def upload(self, name: str, folder: str, source: Input, cancel: threading.Event | None = None) -> UploadResult:
        check_name(name)
        check_name(folder, "folder")
        check_bucket(folder)
        key = self._key()
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
                    n = source.readinto(buf)
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
