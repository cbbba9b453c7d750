"""Split resources (docs/formats.md): a small part on the Resource API, a big part on the CDN.

Upload: ``ct = encrypt(data, resource_key)``; the first ``n = min(small_part_kb KiB, 30 % of ct)``
bytes go to the API as ``<name>.small``, the rest to the CDN as ``<folder>/<name>.big`` and to
the local cache. Load: the small part from the API, the big part from the cache or else the
CDN (fetch.py: parallel ranged GETs into a resumable partial file, read while they arrive), and
``decrypt(small || big)`` streamed into any writable sink.

Both directions stream with memory that does not grow with the resource. Before a single
plaintext byte is written, a load vets the padding from the last two cipher blocks, so a
truncated or tail-tampered cached part is dropped and fetched again from the CDN once. Loads
that miss the same big part share one download (single flight), each reading it as it arrives.

The padding says nothing about which version of the resource a big part belongs to, so each
big part is bound to its small part by the small part's SHA-256: beside cache entries
(azaiond.cache) and as the CDN object's metadata. A cached entry of another version is never
served; a CDN object of another version answers ``stale`` before a byte of it is fetched, and a
download is installed in the cache bound to the small part it was checked against.

v1 has no MAC: tampering that keeps the padding valid yields wrong bytes, undetected. See
docs/security.md. Format v2 (azaiond/splitv2.py) is authenticated; a load tells the two apart by
the small part, an upload writes the one the call or ``resources.format`` asks for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from azaiond import crypto
from azaiond.apiclient import ResourceApi
from azaiond.bigpart import BigPart, CachedBigPart
from azaiond.cache import BigPartCache
from azaiond.cdn import SMALL_SHA256, Cdn, ObjectInfo
from azaiond.errors import Cancelled, IntegrityError, InvalidParams, NotAuthenticated, Stale
from azaiond.fetch import Fetcher, Progress
from azaiond.fsutil import atomic_file
from azaiond.generations import Generations
from azaiond.names import check_bucket, check_name
from azaiond.sealed import CHUNK_LOG2
from azaiond.splitv2 import SplitV2, is_v2_small

log = logging.getLogger(__name__)
MIB = 1024 * 1024


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
    cache_hit: bool | None = None  # v1 split resources: the big part came from the cache


@dataclass(frozen=True)
class UploadResult:
    size: int
    small_size: int
    big_size: int
    format: int = 1


def small_size(ciphertext_len: int, small_part_kb: int) -> int:
    return min(small_part_kb * 1024, ciphertext_len * 3 // 10)


def small_fingerprint(small: bytes) -> str:
    """The binding between the two parts: lower-case hex SHA-256 of the small part as the API
    returns it (decrypted), kept beside cache entries and as the big part's S3 metadata."""
    return hashlib.sha256(small).hexdigest()


def check_binding(info: ObjectInfo, fingerprint: str, where: str) -> None:
    """Refuse a big part whose metadata names another small part (``Stale``).

    A big part without the metadata (uploaded before the binding existed, or by other tools)
    is taken as it is; the padding check and the cache binding still apply.
    """
    claimed = info.metadata.get(SMALL_SHA256)
    if claimed is not None and claimed.strip().lower() != fingerprint:
        raise Stale(
            f"{where}: the CDN holds another version of the big part than the Resource API's small part"
            " (a publish in progress, or a broken publish)"
        )


class SplitResources:
    def __init__(
        self,
        api: ResourceApi,
        cdn: Callable[[], Cdn],
        cache: BigPartCache | Path,
        resource_key: Callable[[], str | None],
        small_part_kb: int = 3,
        *,
        generations: Generations | None = None,
        upload_format: int = 1,
        chunk_log2: int = CHUNK_LOG2,
        fetcher: Fetcher | None = None,
    ) -> None:
        self._api = api
        self._cdn = cdn
        self.cache = cache if isinstance(cache, BigPartCache) else BigPartCache(cache)
        self.cache_dir = self.cache.root
        self._resource_key = resource_key
        self._small_part_kb = small_part_kb
        self._format = upload_format
        generations = generations or Generations(self.cache_dir.parent / "generations.json")
        self.v2 = SplitV2(api, cdn, self, generations, chunk_log2)
        # Cold loads: parallel ranged GETs into a resumable partial file beside the cache.
        self.fetcher = fetcher or Fetcher(
            self.cache_dir.parent / "partial", range_size=8 * MIB, parallel=4, retries=3
        )

    def close(self) -> None:
        """Stop downloads under way; their partial files are kept for the next load."""
        self.fetcher.close()

    def _key(self) -> bytes:
        secret = self._resource_key()
        if not secret:
            raise NotAuthenticated("no resource key: install the 'resource-key' credential or set resources.key")
        return crypto.aes_key(secret)

    def cache_path(self, name: str, folder: str) -> Path:
        return self.cache.path(folder, name)

    @staticmethod
    def _check(name: str, folder: str) -> None:
        check_name(name)
        check_name(folder, "folder")
        check_bucket(folder)

    # -- the big part --------------------------------------------------------------------

    def _open_big(
        self,
        name: str,
        folder: str,
        fingerprint: str,
        bad: os.stat_result | None = None,
        *,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> tuple[BigPart, bool]:
        """The big part bound to ``fingerprint``; True if it comes from the CDN now.

        A cache entry is checked and opened under its entry lock. Else the fetcher's download of
        it is read while it arrives (loads that miss the same entry share one download); before
        a byte is fetched the object's HEAD must carry no other small part's fingerprint
        (``Stale``), and room is made under ``cache_max_mb``. The finished download is installed
        bound to ``fingerprint``. ``bad`` is an entry that failed verification: it is dropped
        and fetched again unless a peer has replaced it already.
        """
        dest = self.cache.path(folder, name)
        where = f"{folder}/{name}"

        def check(info: ObjectInfo) -> None:
            check_binding(info, fingerprint, where)

        def prepare(info: ObjectInfo) -> None:
            self._make_room(folder, name, info.size)

        def install(staged: Path) -> None:
            with self.cache.flight(folder, name):
                self.cache.install(folder, name, fingerprint, staged)

        while True:
            with self.cache.flight(folder, name):
                handle = self.cache.open_valid(folder, name, fingerprint)
                if handle is not None:
                    st = os.fstat(handle.fileno())
                    if bad is None or (st.st_dev, st.st_ino) != (bad.st_dev, bad.st_ino):
                        self.cache.hits += 1
                        return CachedBigPart(dest, handle), False
                    handle.close()
                    self.cache.drop(folder, name)  # still the bad one: nobody replaced it yet
            reader = self.fetcher.open(
                self._cdn,
                folder,
                f"{name}.big",
                dest,
                install=install,
                present=lambda: self.cache.fingerprint(folder, name) == fingerprint,
                tag=fingerprint,
                cancel=cancel,
                progress=progress,
                check=check,
                prepare=prepare,
            )
            if reader is not None:
                self.cache.misses += 1
                return reader, True
            bad = None  # installed meanwhile by another load: a fresh entry

    def _make_room(self, folder: str, name: str, size: int) -> None:
        """Under a cache limit, room for ``size`` more bytes: partial files of other downloads
        count, so least recently used entries go first, then idle partial files, oldest first."""
        limit = self.cache.limit_bytes
        if not limit:
            return
        key = f"{name}.big"
        others = self.fetcher.disk_bytes(folder, key)
        self.cache.evict(room=size + others)
        over = self.cache.total_bytes + size + others - limit
        if over > 0:
            self.fetcher.prune(over, folder, key)

    # The big-part cache as other formats' loaders use it: by small part, binding included.
    # Run such a load inside ``self.cache.pinned(folder, name)`` so its entry is not evicted.
    def open_big(
        self,
        name: str,
        folder: str,
        small: bytes,
        *,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> tuple[BigPart, bool]:
        """The big part bound to ``small``: the cache entry, or its download read as it arrives."""
        return self._open_big(name, folder, small_fingerprint(small), cancel=cancel, progress=progress)

    def drop_big(self, name: str, folder: str) -> None:
        self._drop(name, folder)

    def staged_big(self, name: str, folder: str) -> Path:
        return self.cache.staging(folder, name).with_name(f".{name}.big.up-{secrets.token_hex(4)}.tmp")

    def install_big(self, name: str, folder: str, small: bytes, staged: Path) -> None:
        with self.cache.flight(folder, name):
            self.cache.install(folder, name, small_fingerprint(small), staged)

    def _drop(self, name: str, folder: str) -> None:
        with self.cache.flight(folder, name):
            self.cache.drop(folder, name)

    # -- load ----------------------------------------------------------------------------

    def load(
        self,
        name: str,
        folder: str,
        sink: crypto.Sink,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> LoadResult:
        """Load into ``sink``. ``progress(done, total)`` hears of the CDN phase of a big part
        that is not cached: bytes of it on the disk (resumed ones included) and its size."""
        self._check(name, folder)
        key = self._key()
        small = self._api.get_resource(folder, f"{name}.small")
        if is_v2_small(small):
            with self.cache.pinned(folder, name):  # v2 reads its entry through open_big
                v2 = self.v2.load(name, folder, small, key, sink=sink, cancel=cancel, progress=progress)
            return LoadResult(v2.size, v2.sha256, 2, v2.generation)
        fingerprint = small_fingerprint(small)
        with self.cache.pinned(folder, name):
            big, fetched = self._open_big(name, folder, fingerprint, cancel=cancel, progress=progress)
            try:
                try:
                    self._vet(small, big, key)
                except IntegrityError as exc:
                    if fetched:  # straight from the CDN and still bad: keep nobody from trusting it
                        self._refuse(name, folder, big, exc)
                        raise
                    log.warning("cached big part of %s/%s fails verification; fetching it again", folder, name)
                    bad = os.fstat(big.fileno()) if isinstance(big, CachedBigPart) else None
                    big.close()
                    big, fetched = self._open_big(name, folder, fingerprint, bad, cancel=cancel, progress=progress)
                    try:
                        self._vet(small, big, key)
                    except IntegrityError as exc2:
                        self._refuse(name, folder, big, exc2)
                        raise
                try:
                    result = self._decrypt(small, big, key, sink, cancel)
                except IntegrityError as exc:
                    # The tail was vetted, so the file changed under us; never trust it again.
                    self._refuse(name, folder, big, exc)
                    raise
                big.finish()  # a download is installed in the cache before the load answers
                return dataclasses.replace(result, cache_hit=not fetched)
            finally:
                big.close()

    def _refuse(self, name: str, folder: str, big: BigPart, exc: IntegrityError) -> None:
        """Bad bytes: stop a download of them (no partial file is kept) and drop the entry."""
        big.fail(exc)
        self._drop(name, folder)

    def prefetch(
        self, name: str, folder: str, cancel: threading.Event | None = None, progress: Progress | None = None
    ) -> int:
        """Make sure the cache holds the big part bound to the current small part; its size.

        Nothing is decrypted: the small part only tells which version of the big part to keep.
        ``progress(done, total)`` hears of the CDN fetch, as for ``load``.
        """
        self._check(name, folder)
        small = self._api.get_resource(folder, f"{name}.small")
        fingerprint = small_fingerprint(small)
        with self.cache.pinned(folder, name):
            big, _ = self._open_big(name, folder, fingerprint, cancel=cancel, progress=progress)
            try:
                big.finish()
                return big.size
            finally:
                big.close()

    @staticmethod
    def _vet(small: bytes, big: BigPart, key: bytes) -> None:
        """Check length and padding of ``small || big`` from its last two blocks alone (a
        download fetches its tail early, so this waits for two ranges at most)."""
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
                raise Cancelled("the load was stopped before it finished")
            if pending:
                n = min(len(pending), len(buf))
                buf[:n] = pending[:n]
                pending = pending[n:]
                return n
            return big.readinto(buf)

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
        self._check(name, folder)
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
        size = len(head)
        whole = len(head) < limit * 4  # the whole resource was read: compute the exact split
        ct_head = bytes(enc.update(head))
        if whole:
            ct_head += enc.finalize()
            cut = small_size(len(ct_head), self._small_part_kb)
        else:
            cut = limit
        small = ct_head[:cut]
        fingerprint = small_fingerprint(small)
        cdn = self._cdn()  # fails before any work when the CDN cannot be had
        staged = self.staged_big(name, folder)
        # The big part is written to a temp file that becomes the cache entry, and each part of
        # it goes to the CDN (tagged with the small part's fingerprint) as soon as it is written.
        # The temp file is installed in the cache only once both parts are stored upstream, so a
        # failed upload leaves no cache entry.
        metadata = {SMALL_SHA256: fingerprint}
        try:
            with (
                atomic_file(staged) as big,
                cdn.growing_upload(folder, f"{name}.big", Path(big.name), metadata) as part,
            ):
                big.write(ct_head[cut:])
                if not whole:
                    buf = bytearray(crypto.CHUNK)
                    view = memoryview(buf)
                    while True:
                        if cancel is not None and cancel.is_set():
                            raise Cancelled("the upload was stopped before it finished; nothing was committed")
                        n = source.readinto(view)
                        if not n:
                            break
                        size += n
                        big.write(enc.update(view[:n]))
                        part.advance(big)
                    big.write(enc.finalize())
                part.finish(big)
                big_size = big.tell()
                self._api.upload(folder, f"{name}.small", small)
            with self.cache.flight(folder, name):
                self.cache.install(folder, name, fingerprint, staged)
        finally:
            # Mostly gone already (installed or removed by atomic_file); on a failed disk the
            # start-up sweep removes what is left.
            with contextlib.suppress(OSError):
                staged.unlink()
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
