"""Cold loads: a big part fetched with parallel ranged GETs, read while it arrives, resumable.

A HEAD gives the object's size, ETag and metadata. Worker threads then GET ranges of it (the
byte gaps of the partial file, cut into ``range_size`` pieces) and write each chunk at its own
offset in the partial file (partial.py). Readers attach to the download and read its contiguous
prefix as it grows, so decryption overlaps the transfer; the first piece and the last one are
fetched first, because a v1 load vets the ciphertext's tail before it releases a byte.

One download per object at a time: concurrent loads of the same missing big part attach to
the same download. When every byte is there the file is synced and handed to the caller's
``install`` (the cache renames it into place and binds it to its small part).
When a download fails, or its last reader goes away, the workers stop and the record is
checkpointed, so the next attempt (also after a restart) fetches only what is missing. Each
range GET carries If-Match with the ETag of the HEAD; an object that changes mid-way fails the
download and its partial file is dropped.

Errors: a CDN that cuts or truncates is retried from the byte where it stopped, ``retries``
times without progress, then ``cdn``; the disk failing is ``storage`` (with the path); a reader
whose caller went away gets ``cancelled``.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from azaiond.cdn import Cdn, ObjectChanged, ObjectInfo, RangeInterrupted
from azaiond.errors import AzaionError, Cancelled, CdnError, StorageError
from azaiond.partial import Extents, PartialFile, storage_error
from azaiond.partial import prune as partial_prune
from azaiond.partial import usage as partial_usage

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]
CHUNK = 1024 * 1024  # bytes a worker reads from the socket and writes at a time
WAIT_SLICE = 0.1  # seconds a reader waits before it looks at its cancel flag again
SETTLE = 5.0  # seconds a failed download's readers wait for its record before they report
CHECKPOINT_EVERY = 2.0  # seconds between record checkpoints while a download runs


class Download:
    """One object being fetched into its partial file by a few worker threads."""

    def __init__(
        self,
        cdn: Cdn,
        bucket: str,
        key: str,
        info: ObjectInfo,
        *,
        partial: PartialFile,
        dest: Path,
        install: Callable[[Path], None],
        tag: str,
        range_size: int,
        parallel: int,
        retries: int,
        on_end: Callable[[Download], None],
    ) -> None:
        self.cdn, self.bucket, self.key, self.info = cdn, bucket, key, info
        self.partial, self.dest, self._install = partial, dest, install
        self.tag = tag  # what the finished bytes will be bound to (readers of another tag wait)
        self._range_size, self._parallel, self._retries = range_size, parallel, retries
        self._on_end = on_end
        self._cond = threading.Condition()
        self.extents = Extents()
        self.fetched = 0  # bytes this download took from the CDN (resumed bytes not counted)
        self.error: AzaionError | None = None
        self.committed = False
        self.ended = threading.Event()  # workers gone, file closed or renamed: the path is free
        self._stop = threading.Event()
        self._readers = 0
        self._workers: list[threading.Thread] = []
        self._pieces: collections.deque[tuple[int, int]] = collections.deque()
        self._running = 0
        self._last_checkpoint = time.monotonic()
        self._listeners: list[Progress] = []
        self._reported = 0
        self._report_lock = threading.Lock()  # listeners see ``done`` only grow
        self._sent = -1
        self._report_step = max(CHUNK, info.size // 200)  # about 200 progress reports at most
        self._discard = False

    # -- life cycle ----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def open_partial(self) -> None:
        self.extents = self.partial.open(self.info)

    def start(self) -> None:
        """Start the workers on what the partial file lacks (commit at once if nothing)."""
        pieces = [
            (a, min(a + self._range_size, b))
            for start, end in self.extents.gaps(self.info.size)
            for a in range(start, end, self._range_size)
            for b in (end,)
        ]
        if len(pieces) > 2:  # the tail early: a v1 reader vets it before its first byte
            pieces.insert(1, pieces.pop())
        self._pieces.extend(pieces)
        count = min(self._parallel, len(pieces))
        self._running = count
        if count == 0:  # all there already: commit, off the caller's thread (it holds the fetcher's lock)
            threading.Thread(target=self._finish, name=f"fetch-{self.key}-commit", daemon=True).start()
            return
        for i in range(count):
            t = threading.Thread(target=self._work, name=f"fetch-{self.key}-{i}", daemon=True)
            self._workers.append(t)
            t.start()

    def attach(self, progress: Progress | None) -> None:
        with self._cond:
            self._readers += 1
            if progress is not None:
                self._listeners.append(progress)
                progress(self.extents.total(), self.info.size)

    def detach(self, progress: Progress | None) -> None:
        with self._cond:
            self._readers -= 1
            if progress is not None and progress in self._listeners:
                self._listeners.remove(progress)
            if self._readers == 0 and not self.ended.is_set():
                self._stop.set()  # nobody wants the bytes any more: keep what we have for later

    def stop(self) -> None:
        self._stop.set()

    def fail(self, exc: AzaionError, *, discard: bool = False) -> None:
        """End the download with ``exc`` for every reader; ``discard`` drops the partial file."""
        with self._cond:
            if self.error is None:
                self.error = exc
            self._discard = self._discard or discard
            self._stop.set()
            self._cond.notify_all()

    def join(self, timeout: float) -> None:
        self.ended.wait(timeout)

    # -- workers -------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                with self._cond:
                    if not self._pieces:
                        break
                    start, end = self._pieces.popleft()
                self._fetch(start, end)
        except AzaionError as exc:
            self.fail(exc, discard=isinstance(exc, ObjectChanged))
        except Exception as exc:  # a bug must not leave readers waiting for ever
            log.exception("download of %s/%s failed", self.bucket, self.key)
            self.fail(CdnError(f"the download of {self.bucket}/{self.key} failed ({type(exc).__name__})"))
        finally:
            with self._cond:
                self._running -= 1
                last = self._running == 0
            if last:
                self._finish()

    def _fetch(self, start: int, end: int) -> None:
        """Fetch ``[start, end)``, retrying from the byte where a broken GET stopped."""
        pos, misses = start, 0
        while pos < end and not self._stop.is_set():
            began = pos
            try:
                body = self.cdn.get_range(self.bucket, self.key, pos, end, self.info.etag)
                try:
                    if body.total != str(self.info.size):
                        raise ObjectChanged(f"{self.bucket}/{self.key} changed size on the CDN during the download")
                    while pos < end and not self._stop.is_set():
                        data = body.read(min(CHUNK, end - pos))
                        if not data:
                            raise RangeInterrupted(f"the CDN ended a range of {self.bucket}/{self.key} early")
                        self._write(data, pos)
                        pos += len(data)
                finally:
                    body.close()
            except RangeInterrupted as exc:
                misses = 0 if pos > began else misses + 1
                if misses > self._retries:
                    raise CdnError(f"{exc.message}, {misses} times in a row") from exc
                log.info("%s at byte %d; retrying from there", exc.message, pos)
                self._stop.wait(min(2.0, 0.1 * 2**misses))

    def _write(self, data: bytes, pos: int) -> None:
        view = memoryview(data)
        at = pos
        try:
            while view:
                n = os.pwrite(self.partial.fd, view, at)
                view, at = view[n:], at + n
        except OSError as exc:
            raise storage_error(exc, self.partial.path, "writing") from exc
        with self._cond:
            self.extents.add(pos, pos + len(data))
            self.fetched += len(data)
            done = self.extents.total()
            report = done - self._reported >= self._report_step or done == self.info.size
            if report:
                self._reported = done
            listeners = list(self._listeners) if report else []
            self._cond.notify_all()
            checkpoint = time.monotonic() - self._last_checkpoint > CHECKPOINT_EVERY
            if checkpoint:
                self._last_checkpoint = time.monotonic()
                snapshot = self.extents.copy()
        if listeners:
            with self._report_lock:  # workers race here: never let a smaller count out last
                if done > self._sent:
                    self._sent = done
                    for listener in listeners:
                        listener(done, self.info.size)
        if checkpoint:
            self.partial.checkpoint(self.info, snapshot)

    def _finish(self) -> None:
        """The last worker is gone: commit a complete file, else checkpoint (or drop) it."""
        with self._cond:
            complete = self.error is None and (self.info.size == 0 or self.extents.covers(0, self.info.size))
            snapshot = self.extents.copy()
        try:
            if complete:
                self.partial.commit(self._install)
                log.info(
                    "downloaded %s/%s from the CDN (%d bytes, %d fetched now)",
                    self.bucket, self.key, self.info.size, self.fetched,
                )
            elif self._discard:
                self.partial.discard()
            else:
                self.partial.checkpoint(self.info, snapshot)
        except StorageError as exc:
            self.fail(exc)
            complete = False
        except Exception:  # a bug must not leave readers waiting for ever
            log.exception("finishing the download of %s/%s failed", self.bucket, self.key)
            self.fail(CdnError(f"the download of {self.bucket}/{self.key} failed"))
            complete = False
        with self._cond:
            self.committed = complete
            if not complete and self.error is None:
                self.error = Cancelled("the download was stopped: nobody is waiting for it")
            self._cond.notify_all()
        self._on_end(self)  # first: while it is registered, a joining reader may still dup the fd
        self.partial.close()
        self.ended.set()

    # -- what readers use ----------------------------------------------------------------

    def available(self, pos: int) -> int:
        """How many bytes from ``pos`` on are in the file already."""
        with self._cond:
            return next((b - pos for a, b in self.extents.spans if a <= pos < b), 0)

    def wait_for(self, ready: Callable[[], bool], cancel: threading.Event | None) -> None:
        """Wait until ``ready()`` (checked under the lock), raising the download's error or Cancelled.

        On an error it first gives the workers a moment to end, so that when a load reports a
        failure the partial file's record already says what a retry can reuse.
        """
        with self._cond:
            while not ready():
                if self.error is not None:
                    break
                if cancel is not None and cancel.is_set():
                    raise Cancelled("the caller went away; the load was stopped")
                self._cond.wait(WAIT_SLICE)
            else:
                return
            error = self.error
        self.ended.wait(SETTLE)
        raise error


class DownloadReader:
    """Reads a download's bytes in order as they arrive: the seam a decryptor reads through.

    ``readinto`` returns what is contiguous from the current position, waiting for more when
    there is none yet (0 only at the end of the object); ``pread`` waits for any span (a v1 load
    vets the tail with it). Errors of the download, and the caller's cancel, come out of both.
    """

    def __init__(self, download: Download, cancel: threading.Event | None, progress: Progress | None) -> None:
        self._dl = download
        self._cancel = cancel
        self._progress = progress
        self.size = download.info.size
        self.info = download.info
        self.pos = 0
        self._fd = os.dup(download.partial.fd)  # survives the rename into the cache
        download.attach(progress)
        self._open = True

    def readinto(self, buffer: memoryview | bytearray) -> int:
        if self.pos >= self.size or not len(buffer):
            return 0
        dl = self._dl
        dl.wait_for(lambda: dl.extents.covers(self.pos, self.pos + 1), self._cancel)
        n = self._read_at(memoryview(buffer)[: min(len(buffer), dl.available(self.pos))], self.pos)
        self.pos += n
        return n

    def pread(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        dl = self._dl
        dl.wait_for(lambda: offset >= end or dl.extents.covers(offset, end), self._cancel)
        buf = bytearray(max(0, end - offset))
        n = self._read_at(memoryview(buf), offset)
        return bytes(buf[:n])

    def seek(self, offset: int) -> None:
        self.pos = offset

    def _read_at(self, view: memoryview, offset: int) -> int:
        try:
            return os.preadv(self._fd, [view], offset)
        except OSError as exc:
            raise storage_error(exc, self._dl.partial.path, "reading") from exc

    def finish(self) -> None:
        """Wait until the download is stored in the cache (or failed)."""
        dl = self._dl
        dl.wait_for(lambda: dl.committed, self._cancel)

    def fail(self, exc: AzaionError) -> None:
        """The bytes are bad: end the download for everyone, drop what it fetched, and wait
        until it has ended (it may have been renamed into the cache already: the caller drops
        that entry afterwards)."""
        self._dl.fail(exc, discard=True)
        self._dl.ended.wait()

    def close(self) -> None:
        if self._open:
            self._open = False
            os.close(self._fd)
            self._dl.detach(self._progress)

    def __enter__(self) -> DownloadReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Fetcher:
    """Starts downloads into ``<root>/<bucket>/<key>.part`` and hands out readers of them.

    Downloads are keyed by their destination: the caller's ``install`` puts the finished file
    there, and ``present()`` says whether a usable one is there already.
    """

    def __init__(self, root: Path, *, range_size: int, parallel: int, retries: int) -> None:
        self.root = root
        self._range_size = range_size
        self._parallel = parallel
        self._retries = retries
        self._lock = threading.Lock()
        self._active: dict[Path, Download] = {}

    def configure(self, *, range_size: int, parallel: int, retries: int) -> None:
        """New settings (a live reload) for downloads that start from now on."""
        self._range_size, self._parallel, self._retries = range_size, parallel, retries

    def open(
        self,
        cdn: Callable[[], Cdn],
        bucket: str,
        key: str,
        dest: Path,
        *,
        install: Callable[[Path], None],
        present: Callable[[], bool] = lambda: False,
        tag: str = "",
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
        check: Callable[[ObjectInfo], None] = lambda info: None,
        prepare: Callable[[ObjectInfo], None] = lambda info: None,
    ) -> DownloadReader | None:
        """A reader of the object's download, joining one under way; None when ``present()``.

        ``check`` sees the HEAD's answer before a byte is fetched (and before a reader joins a
        download under way); whatever it raises ends the open. ``prepare`` runs once before a
        new download starts (to make room on the disk). ``install(path)`` makes the finished
        file the entry at ``dest``. A download under way with another ``tag`` (bytes meant for
        another version of the resource) is waited for, never joined.
        """
        while True:
            with self._lock:
                running = self._active.get(dest)
                if running is not None and not running.stopping and running.tag == tag:
                    check(running.info)
                    return DownloadReader(running, cancel, progress)
                if running is None and present():
                    return None
            if running is not None:  # stopping (it still holds the partial file), or another version
                while not running.ended.wait(WAIT_SLICE):
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("the caller went away; the load was stopped")
                continue
            info = cdn().head(bucket, key)
            check(info)
            prepare(info)
            with self._lock:
                if dest in self._active or present():
                    continue  # another load started or finished it meanwhile
                download = Download(
                    cdn(), bucket, key, info, partial=PartialFile(self.root, bucket, key), dest=dest,
                    install=install, tag=tag, range_size=self._range_size, parallel=self._parallel,
                    retries=self._retries, on_end=self._ended,
                )
                download.open_partial()
                reader = DownloadReader(download, cancel, progress)
                self._active[dest] = download
                download.start()
                return reader

    # -- the partial files on the disk ---------------------------------------------------

    def disk_bytes(self, bucket: str, key: str) -> int:
        """What the partial files of other objects hold on the disk (what this one would add is
        the caller's to count)."""
        return partial_usage(self.root, skip={PartialFile(self.root, bucket, key).path})

    def prune(self, need: int, bucket: str, key: str) -> int:
        """Remove idle partial files of other objects, oldest first, until ``need`` bytes are
        freed; returns the bytes freed. Downloads under way keep theirs."""
        with self._lock:  # no download starts on a file while it is being removed
            busy = {d.partial.path for d in self._active.values()}
            return partial_prune(self.root, need, skip=busy | {PartialFile(self.root, bucket, key).path})

    def _ended(self, download: Download) -> None:
        with self._lock:
            if self._active.get(download.dest) is download:
                del self._active[download.dest]

    def close(self, timeout: float = 5.0) -> None:
        """Stop every download (their records are checkpointed) and wait a little for them."""
        with self._lock:
            downloads = list(self._active.values())
        for download in downloads:
            download.stop()
        deadline = time.monotonic() + timeout
        for download in downloads:
            download.join(max(0.0, deadline - time.monotonic()))
