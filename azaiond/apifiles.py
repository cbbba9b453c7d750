"""Whole-file resources kept on the Resource API alone (the seed's ``load_bytes`` / ``upload_file``).

``api_load``: ``POST /resources/get/{folder}`` with ``fileName`` = name returns the file
encrypted with this user's and machine's api_key. The ciphertext is spooled into an unnamed
temp file in the state dir (never plaintext, gone when closed), its length and padding are
checked, and only then is it decrypted into the caller's sink: a body cut short releases no
byte.

``api_upload``: the bytes as they are go to ``POST /resources/{folder}`` as file ``name``, in a
multipart body that streams from the caller's input with its length known up front. The length
is the ``size`` param, a regular file's size or, for a pipe without ``size``, what the input
holds, buffered in memory. ``resources.api_max_mb`` caps whole-file resources both ways, so
that buffer is bounded and no host takes more from the API than the operator allows. An input that
ends before ``size`` or goes on past it aborts the request before the closing boundary, so the
API stores nothing.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from azaiond import crypto
from azaiond.apiclient import ResourceApi
from azaiond.errors import Cancelled, IntegrityError, InvalidParams, StorageError, TooLarge
from azaiond.names import check_name
from azaiond.resources import LoadResult

log = logging.getLogger(__name__)


class Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class MultipartBody:
    """``multipart/form-data`` with one file field ``data``, read in pieces from ``source``."""

    def __init__(
        self,
        filename: str,
        source: Reader,
        size: int,
        *,
        rewind: Callable[[], bool] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.filename = filename
        boundary = f"azaiond-{secrets.token_hex(16)}"
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self._head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="data"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode("ascii")
        self._tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        self._source = source
        self._size = size
        self._rewind = rewind
        self._cancel = cancel
        self._reset()

    def _reset(self) -> None:
        self._pos = 0  # bytes of the whole body handed out
        self._sent = 0  # bytes of the content handed out

    def __len__(self) -> int:
        return len(self._head) + self._size + len(self._tail)

    def rewind(self) -> bool:
        if self._rewind is None or not self._rewind():
            return False
        self._reset()
        return True

    def read(self, size: int = -1, /) -> bytes:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("the upload was stopped before it finished; nothing was committed")
        want = len(self) - self._pos if size is None or size < 0 else size
        head_len = len(self._head)
        if self._pos < head_len:
            out = self._head[self._pos : self._pos + want]
        elif self._sent < self._size:
            out = self._source.read(min(want, self._size - self._sent, 1024 * 1024))
            if not out:
                raise InvalidParams(f"the input ended after {self._sent} of the {self._size} bytes announced")
            self._sent += len(out)
            if self._sent == self._size and self._source.read(1):
                raise InvalidParams(f"the input holds more than the {self._size} bytes announced")
        else:
            at = self._pos - head_len - self._size
            out = self._tail[at : at + want]
        self._pos += len(out)
        return out


class ApiFiles:
    def __init__(self, api: ResourceApi, spool_dir: Path, max_bytes: int) -> None:
        self._api = api
        self._spool_dir = spool_dir
        self.max_bytes = max_bytes

    def load(self, name: str, folder: str, sink: crypto.Sink, cancel: threading.Event | None = None) -> LoadResult:
        check_name(name)
        check_name(folder, "folder")
        try:
            spool = tempfile.TemporaryFile(dir=self._spool_dir)  # noqa: SIM115 (closed below)
        except OSError as exc:
            raise StorageError(f"cannot spool in {self._spool_dir}: {exc.strerror}") from exc
        with spool:
            # The cap is on the file; its ciphertext adds an IV and up to a block of padding.
            key = self._api.fetch_resource(folder, name, spool, self.max_bytes + crypto.IV_SIZE + crypto.BLOCK)
            try:
                spool.flush()  # os.pread below reads the file, not this object's buffer
            except OSError as exc:
                raise StorageError(f"cannot spool in {self._spool_dir}: {exc.strerror}") from exc
            fd = spool.fileno()
            length = os.fstat(fd).st_size
            if length < crypto.IV_SIZE + crypto.BLOCK or length % crypto.BLOCK:
                raise IntegrityError("decryption failed")
            crypto.check_tail(os.pread(fd, 2 * crypto.BLOCK, length - 2 * crypto.BLOCK), key)
            offset = 0

            def read(buf: memoryview) -> int:
                nonlocal offset
                if cancel is not None and cancel.is_set():
                    raise Cancelled("the load was stopped before it finished")
                n = os.preadv(fd, [buf], offset)
                offset += n
                return n

            size, digest = crypto.decrypt_chunks(read, sink, key)
        return LoadResult(size, digest)

    def upload(
        self,
        name: str,
        folder: str,
        source: Reader,
        *,
        size: int | None = None,
        fd: int | None = None,
        cancel: threading.Event | None = None,
    ) -> int:
        """Store ``source`` as it is; returns the size. ``fd`` is the descriptor it reads, if any."""
        check_name(name, "file name")
        check_name(folder, "folder")
        if size is not None and size < 0:
            raise InvalidParams("size must not be negative")
        rewind: Callable[[], bool] | None = None
        if isinstance(source, io.BytesIO):
            inline = source
            length = len(inline.getbuffer())
            rewind = lambda: inline.seek(0) == 0  # noqa: E731
        elif fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
            start = os.lseek(fd, 0, os.SEEK_CUR)
            length = os.fstat(fd).st_size - start
            rewind = lambda: os.lseek(fd, start, os.SEEK_SET) == start  # noqa: E731
        elif size is not None:
            length = size  # a pipe that announced its length: streamed, sent once
        else:
            buffered, length = self._buffer(source, cancel)
            source = buffered
            rewind = lambda: buffered.seek(0) == 0  # noqa: E731
        if size is not None and size != length:
            raise InvalidParams(f"size is {size} but the input holds {length} bytes")
        if length > self.max_bytes:
            raise TooLarge(f"{length} bytes is over resources.api_max_mb for whole-file API resources")
        body = MultipartBody(name, source, length, rewind=rewind, cancel=cancel)
        self._api.upload_stream(folder, body)
        log.info("uploaded %s/%s to the Resource API (%d bytes)", folder, name, length)
        return length

    def _buffer(self, source: Reader, cancel: threading.Event | None) -> tuple[io.BytesIO, int]:
        """Take a pipe of unknown length into memory, up to the cap."""
        buffer = io.BytesIO()
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the upload was stopped before it finished; nothing was committed")
            chunk = source.read(1024 * 1024)
            if not chunk:
                break
            buffer.write(chunk)
            if buffer.tell() > self.max_bytes:
                raise TooLarge(
                    "the input is over resources.api_max_mb: pass its size (azaionctl does) or a regular file"
                )
        buffer.seek(0)
        return buffer, len(buffer.getbuffer())
