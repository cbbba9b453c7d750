"""Byte sinks and sources over descriptors passed with a request, and bounded in-memory ones.

A descriptor from a client may be a file, a pipe or a socket, blocking or not; these helpers
write and read it fully either way, and refuse one opened the wrong way round with a clear
error instead of failing half way through.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import select

from azaiond.errors import InvalidParams, TooLarge


def _access_mode(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise InvalidParams("the passed descriptor is not usable") from exc


def require_writable(fd: int, method: str) -> None:
    if _access_mode(fd) not in (os.O_WRONLY, os.O_RDWR):
        raise InvalidParams(f"the descriptor passed to {method} is not open for writing")


def require_readable(fd: int, method: str) -> None:
    if _access_mode(fd) not in (os.O_RDONLY, os.O_RDWR):
        raise InvalidParams(f"the descriptor passed to {method} is not open for reading")


class FdSink:
    """Writes everything it is given to a descriptor, waiting out EAGAIN on non-blocking ones."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: memoryview | bytes, /) -> int:
        view = memoryview(data)
        total = len(view)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [])
                continue
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    raise InvalidParams("the reader of the passed descriptor went away") from exc
                raise InvalidParams(f"writing to the passed descriptor failed: {exc.strerror}") from exc
            view = view[n:]
        return total


class FdSource(io.RawIOBase):
    """A readable raw stream over a borrowed descriptor (not closed here)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while True:
            try:
                n = os.readv(self.fd, [buffer])
            except BlockingIOError:
                select.select([self.fd], [], [])
                continue
            except OSError as exc:
                raise InvalidParams(f"reading the passed descriptor failed: {exc.strerror}") from exc
            return n

    def close(self) -> None:
        # The transport owns the descriptor; only mark this wrapper closed.
        super().close()


class CappedBuffer:
    """An in-memory sink for inline replies that refuses to grow past the inline limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = bytearray()

    def write(self, data: memoryview | bytes, /) -> int:
        if len(self.buffer) + len(data) > self.limit:
            raise TooLarge(
                f"the payload is over the inline limit of {self.limit // (1024 * 1024)} MiB: pass a descriptor"
            )
        self.buffer += data
        return len(data)


class HashingSink(io.RawIOBase):
    """Passes writes through to a sink while counting and hashing them (for cdn_download)."""

    def __init__(self, sink: FdSink | CappedBuffer) -> None:
        super().__init__()
        self.sink = sink
        self.size = 0
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: memoryview | bytes, /) -> int:  # type: ignore[override]
        self.sink.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)
