"""Split resources in format v2: the header as the small part, sealed chunks as the big part.

Load: verify the header, refuse a generation lower than this host has seen (before fetching
anything), check the big part's length before any output, then open chunk after chunk and write
each plaintext only once its tag verified. A cached big part that fails (wrong length, or a chunk
that does not open) is dropped, and the load goes on from the CDN with a ranged GET at the very
chunk that failed, so the caller gets every byte once. A big part from the CDN that fails is
``integrity``. The generation is recorded once every chunk has opened.

Upload: the generation is the largest of the time in microseconds, one more than this host has
seen, and one more than the published small part's when that one is v2. The sealed stream goes
to the cache and the CDN as a v1 big part does; the header goes to the API as ``<name>.small``.

The big part is read through ``bigpart.BigPart``: a cache entry, or the download of a missing
one, whose chunks open as soon as their bytes are contiguous (fetch.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from azaiond import sealed
from azaiond.apiclient import ResourceApi
from azaiond.bigpart import BigPart
from azaiond.cdn import SMALL_SHA256, Cdn
from azaiond.crypto import BackgroundHash, Sink
from azaiond.errors import IntegrityError, InvalidParams, NotFound, Rollback
from azaiond.fetch import Progress
from azaiond.fsutil import atomic_file
from azaiond.generations import MAX_GENERATION, Generations

log = logging.getLogger(__name__)


class CacheAccess(Protocol):
    """What the v2 path needs of the big-part cache (kept by ``SplitResources``)."""

    def cache_path(self, name: str, folder: str) -> Path: ...

    def open_big(
        self,
        name: str,
        folder: str,
        small: bytes,
        *,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> tuple[BigPart, bool]:
        """The big part that goes with ``small``: the cache entry, or its download read as it
        arrives; True when it comes from the CDN now."""
        ...

    def drop_big(self, name: str, folder: str) -> None: ...

    def staged_big(self, name: str, folder: str) -> Path:
        """A private temp path beside the entry for a big part being written."""
        ...

    def install_big(self, name: str, folder: str, small: bytes, staged: Path) -> None:
        """Make the complete big part at ``staged`` the entry, bound to ``small``."""
        ...


@dataclass(frozen=True)
class V2Load:
    size: int
    sha256: str
    generation: int


@dataclass(frozen=True)
class V2Upload:
    size: int
    small_size: int
    big_size: int
    generation: int


def is_v2_small(small: bytes) -> bool:
    return sealed.looks_v2(small, sealed.MAGIC_SPLIT, exact=True)


class SplitV2:
    def __init__(
        self,
        api: ResourceApi,
        cdn: Callable[[], Cdn],
        cache: CacheAccess,
        generations: Generations,
        chunk_log2: int = sealed.CHUNK_LOG2,
    ) -> None:
        self._api = api
        self._cdn = cdn
        self._cache = cache
        self.generations = generations
        self._chunk_log2 = chunk_log2

    # -- load ----------------------------------------------------------------------------

    def load(
        self,
        name: str,
        folder: str,
        small: bytes,
        root: bytes,
        *,
        sink: Sink,
        cancel: threading.Event | None,
        progress: Progress | None = None,
    ) -> V2Load:
        header = sealed.open_header(small, root, sealed.MAGIC_SPLIT)
        seen = self.generations.highest(folder, name)
        if seen is not None and header.generation < seen:
            raise Rollback(
                f"{folder}/{name}: generation {header.generation} is older than {seen}, "
                "which this host has already seen"
            )
        digest = BackgroundHash()
        opener = sealed.Opener(header)
        buffer = memoryview(bytearray(header.chunk + sealed.TAG_SIZE))
        size = 0

        def emit(plain: memoryview) -> None:
            nonlocal size
            digest.update(plain)
            sink.write(plain)
            size += len(plain)

        def run(source: sealed.Source, first: int) -> None:
            sealed.open_chunks(header, source, first, emit, opener=opener, buffer=buffer, cancel=cancel)

        try:
            resume = self._from_cache(name, folder, small, header, run, cancel=cancel, progress=progress)
            if resume is not None:
                self._from_cdn(name, folder, header, resume, run)
        finally:
            digest.close()
        self.generations.record(folder, name, header.generation)
        return V2Load(size, digest.hexdigest(b""), header.generation)

    def _from_cache(
        self,
        name: str,
        folder: str,
        small: bytes,
        header: sealed.Header,
        run: Callable[[sealed.Source, int], None],
        *,
        cancel: threading.Event | None,
        progress: Progress | None,
    ) -> int | None:
        """Read what the cache entry (or the download of a missing one) gives; the chunk to go
        on from on the CDN, or None when done."""
        big, fetched = self._cache.open_big(name, folder, small, cancel=cancel, progress=progress)
        try:
            try:
                if big.size != header.stream_size:
                    raise sealed.ChunkFailed(0)
                run(big, 0)
                big.finish()  # a download is installed in the cache before the load answers
            except sealed.ChunkFailed as exc:
                big.fail(exc)  # a download of bad bytes keeps no partial file either
                raise
            finally:
                big.close()
            return None
        except sealed.ChunkFailed as exc:
            self._cache.drop_big(name, folder)
            if fetched:  # straight from the CDN, and still bad
                raise IntegrityError(sealed.FAILED) from exc
            log.warning(
                "cached big part of %s/%s fails at chunk %d; going on from the CDN", folder, name, exc.index
            )
            return exc.index

    def _from_cdn(
        self, name: str, folder: str, header: sealed.Header, first: int, run: Callable[[sealed.Source, int], None]
    ) -> None:
        offset = header.offset(first)
        stream = self._cdn().read_from(folder, f"{name}.big", offset)
        try:
            if stream.length not in (-1, header.stream_size - offset):
                raise IntegrityError(sealed.FAILED)
            run(stream, first)
        except sealed.ChunkFailed as exc:
            raise IntegrityError(sealed.FAILED) from exc
        finally:
            stream.close()

    # -- upload --------------------------------------------------------------------------

    def next_generation(self, name: str, folder: str, root: bytes) -> int:
        """The generation a new upload gets (see the module doc)."""
        candidates = [time.time_ns() // 1000]
        seen = self.generations.highest(folder, name)
        if seen is not None:
            candidates.append(seen + 1)
        try:
            published = self._api.get_resource(folder, f"{name}.small")
        except NotFound:
            published = b""
        if is_v2_small(published):
            try:
                candidates.append(sealed.open_header(published, root, sealed.MAGIC_SPLIT).generation + 1)
            except IntegrityError:
                # Sealed under another key: no host that holds ours ever accepted it.
                log.warning("the published small part of %s/%s does not verify with this key", folder, name)
        generation = max(candidates)
        if generation > MAX_GENERATION:
            raise IntegrityError(f"{folder}/{name}: the generation counter is exhausted")
        return generation

    def upload(
        self,
        name: str,
        folder: str,
        source: sealed.Source,
        *,
        size: int | None,
        root: bytes,
        cancel: threading.Event | None,
    ) -> V2Upload:
        generation = self.next_generation(name, folder, root)
        path = self._cache.staged_big(name, folder)
        cdn = self._cdn()  # fails before any work when the CDN cannot be had
        spool: sealed.Spool | None = None
        try:
            if size is None:  # a pipe: its length must be known before the header is made
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                spool = sealed.Spool(str(path.parent))
                size = spool.fill(source, cancel=cancel)
                source = spool
            header = sealed.make_header(sealed.MAGIC_SPLIT, root, generation, size, chunk_log2=self._chunk_log2)
            # v2 carries its own binding; the small part's fingerprint on the CDN object and
            # beside the cache entry is what every big part gets, and harmless here.
            metadata = {SMALL_SHA256: hashlib.sha256(header.raw).hexdigest()}
            with (
                atomic_file(path) as big,
                cdn.growing_upload(folder, f"{name}.big", Path(big.name), metadata) as part,
            ):
                try:
                    sealed.seal_stream(header, source, big, cancel, on_chunk=lambda: part.advance(big))
                except ValueError as exc:
                    raise InvalidParams(f"upload: the input changed while it was read ({exc})") from exc
                part.finish(big)
                big_size = big.tell()
                self._api.upload(folder, f"{name}.small", header.raw)
            self._cache.install_big(name, folder, header.raw, path)
        finally:
            if spool is not None:
                spool.close()
            with contextlib.suppress(OSError):  # a failed disk: the start-up sweep removes it
                path.unlink()
        self.generations.record(folder, name, generation)
        log.info("uploaded %s/%s (v2, generation %d): %d bytes, big %d", folder, name, generation, size, big_size)
        return V2Upload(size, len(header.raw), big_size, generation)
