"""An S3 multipart upload of a file that is still being written.

An upload encrypts into a temp file (the future cache entry) and must put the same bytes on the
CDN. Doing the two one after the other costs the whole encryption time on top of the transfer;
here each part goes up as soon as the encryptor has written it, so the two overlap. Parts are
read lazily from the file by the worker threads, never held whole in memory, and a failure or
cancellation aborts the multipart upload so no half object stays behind.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any

MIN_PART = 5 * 1024 * 1024  # S3's smallest part but the last
READ_BLOCK = 1024 * 1024  # the largest read botocore (payload hash) or urllib3 (send) asks for


class FileSlice(io.RawIOBase):
    """A seekable, readable window ``[start, start + length)`` of a file, for a request body.

    ``read`` returns a view of one buffer that the next ``read`` overwrites. Its readers here
    consume each block at once: botocore hashes it for the request signature, urllib3 sends
    it. ``io.RawIOBase.read`` would allocate a fresh buffer and a bytes copy of every block (two
    passes of the whole part for the hash, two more for the send, and up to 2 MiB of heap per
    part in flight); this reads each block once into memory that stays the same.
    """

    def __init__(self, path: Path, start: int, length: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._start = start
        self._length = length
        self._pos = 0
        self._block: memoryview | None = None

    def __len__(self) -> int:
        return self._length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + offset))
        return self._pos

    def read(self, size: int = -1, /) -> memoryview:
        """The next ``size`` bytes (all that is left if negative), valid until the next read."""
        left = self._length - self._pos
        want = left if size < 0 else min(size, left)
        if want <= 0:
            return memoryview(b"")
        if self._block is None or len(self._block) < want:
            self._block = memoryview(bytearray(max(want, min(READ_BLOCK, self._length))))
        n = self.readinto(self._block[:want])
        return self._block[:n]

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._length - self._pos)
        if want <= 0:
            return 0
        n = os.preadv(self._fd, [memoryview(buffer)[:want]], self._start + self._pos)
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self._block = None
        super().close()


class GrowingFileUpload:
    """Upload ``path`` to ``bucket/key`` while it grows: ``advance`` after writes, then ``finish``."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        path: Path,
        *,
        metadata: Mapping[str, str] | None = None,
        part_size: int,
        translate: Callable[[Exception], Exception],
        workers: int = 10,  # as many parts in flight as boto3's own transfers
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._path = path
        # S3 user metadata (x-amz-meta-*) set when the object is created, e.g. the small part's
        # fingerprint on a big part.
        self._extra: dict[str, object] = {"Metadata": dict(metadata)} if metadata else {}
        self._part_size = max(part_size, MIN_PART)
        self._translate = translate
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cdn-part")
        self._parts: list[Future[str]] = []
        self._upload_id: str | None = None
        self._sent = 0

    def __enter__(self) -> GrowingFileUpload:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self.abort()
        self._pool.shutdown(wait=True)

    def advance(self, handle: IO[bytes]) -> None:
        """``handle`` writes the file: send every whole part it holds that is not sent yet."""
        if handle.tell() - self._sent < self._part_size:
            return
        for part in self._parts:  # fail fast: no point encrypting on once a part was refused
            if part.done() and part.exception() is not None:
                exc = part.exception()
                assert exc is not None
                raise self._translate(exc if isinstance(exc, Exception) else RuntimeError()) from exc
        handle.flush()  # the workers read the file by name, not through this buffer
        written = handle.tell()
        while written - self._sent >= self._part_size:
            self._submit(self._sent, self._part_size)
            self._sent += self._part_size

    def finish(self, handle: IO[bytes]) -> None:
        """The file is complete: send the rest and complete the upload (or put a small one whole)."""
        handle.flush()
        total = handle.tell()
        try:
            if self._upload_id is None:
                with FileSlice(self._path, 0, total) as body:
                    self._client.put_object(
                        Bucket=self._bucket, Key=self._key, Body=body, ContentLength=total, **self._extra
                    )
                return
            if total > self._sent:
                self._submit(self._sent, total - self._sent)
                self._sent = total
            etags = [part.result() for part in self._parts]
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": [{"ETag": e, "PartNumber": i + 1} for i, e in enumerate(etags)]},
            )
        except Exception as exc:
            raise self._translate(exc) from exc

    def abort(self) -> None:
        """Stop sending and drop the parts already on the CDN."""
        for part in self._parts:
            part.cancel()
        self._pool.shutdown(wait=True)
        if self._upload_id is not None:
            # The original error is what the caller must see; a failed abort only leaves parts
            # that the bucket's lifecycle rules clean up.
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)

    def _submit(self, start: int, length: int) -> None:
        if self._upload_id is None:
            try:
                reply = self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key, **self._extra)
            except Exception as exc:
                raise self._translate(exc) from exc
            self._upload_id = str(reply["UploadId"])
        number = len(self._parts) + 1
        self._parts.append(self._pool.submit(self._send, number, start, length))

    def _send(self, number: int, start: int, length: int) -> str:
        with FileSlice(self._path, start, length) as body:
            reply = self._client.upload_part(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
                ContentLength=length,
            )
        return str(reply["ETag"])
