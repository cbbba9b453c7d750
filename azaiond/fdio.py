"""Byte sinks and sources over descriptors passed with a request, and bounded in-memory ones.

A descriptor from a client may be a file, a pipe or a socket, blocking or not; these helpers
write and read it fully either way, and refuse one opened the wrong way round with a clear
error instead of failing half way through.

A caller's descriptor must never hold a worker for ever: a reader who stops reading (a FIFO
nobody drains) or a writer who stops writing would otherwise block a thread in the kernel
with no way out. So every wait is a poll with a deadline: when no byte moves for ``stall``
seconds, or the call's cancel event is set (the caller hung up, the daemon stops), the call
ends as ``Cancelled``. The waits never block in the kernel. A socket is used with MSG_DONTWAIT.
A pipe or FIFO is reopened through ``/proc/self/fd`` as a non-blocking description of our
own; where that is refused (the unit's daemon has no CAP_DAC_OVERRIDE, and a member's pipe is
0600 and the member's), O_NONBLOCK is set on the client's description for the length of the
call and put back before the reply. Regular files and other devices are used as they are;
they do not stall on a peer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from types import TracebackType

from azaiond.errors import Cancelled, InvalidParams, TooLarge

DEFAULT_STALL = 30.0  # seconds without progress before a transfer on a caller's descriptor ends
# How often a wait wakes to look at the cancel event; bounds how late a cancellation is seen.
_SLICE = 0.2
# After end of input from a pipe or socket, how long to wait for news that the caller hung up:
# a client killed mid-upload closes its pipe and its connection within microseconds, but the
# event loop may learn of the hang-up a moment after this thread saw end of input.
EOF_GRACE = 0.05

Progress = Callable[[int, "int | None"], None]


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


def _no_progress(done: int, total: int | None) -> None:
    pass


class _Channel:
    """A borrowed descriptor made safe to wait on: our own non-blocking view where needed."""

    def __init__(self, fd: int, writing: bool, cancel: threading.Event | None, stall: float) -> None:
        self.fd = fd
        self.cancel = cancel
        self.stall = stall
        self.own: int | None = None  # a descriptor we opened and must close
        self.restore: int | None = None  # the client's file status flags, to put back
        self.sock: socket.socket | None = None
        self.size: int | None = None  # a regular file's size (for progress totals)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise InvalidParams("the passed descriptor is not usable") from exc
        self.peer_kind = stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)
        if stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        elif stat.S_ISFIFO(st.st_mode):
            flags = (os.O_WRONLY if writing else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                self.own = os.open(f"/proc/self/fd/{fd}", flags)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # a FIFO with no reader left
                    raise InvalidParams("the reader of the passed descriptor went away") from exc
                self._borrow_nonblocking()
        elif stat.S_ISSOCK(st.st_mode):
            with contextlib.suppress(OSError):
                self.sock = socket.socket(fileno=os.dup(fd))

    def _borrow_nonblocking(self) -> None:
        try:
            status = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            if not status & os.O_NONBLOCK:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, status | os.O_NONBLOCK)
                self.restore = status
        except OSError as exc:
            raise InvalidParams("the passed descriptor is not usable") from exc

    @property
    def blocking(self) -> bool:
        """True when only a poll before each transfer stands between us and a blocked thread."""
        return self.peer_kind and self.own is None and self.sock is None and self.restore is None

    @property
    def usable(self) -> int:
        return self.own if self.own is not None else self.fd

    def close(self) -> None:
        if self.restore is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self.restore)
            self.restore = None
        if self.own is not None:
            with contextlib.suppress(OSError):
                os.close(self.own)
            self.own = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("the call was cancelled: the caller went away or the daemon is stopping")

    def wait(self, event: int, since: float) -> None:
        """Wait until the descriptor is ready for ``event``; Cancelled past the stall deadline."""
        poller = select.poll()
        poller.register(self.usable, event)
        while True:
            self.check_cancel()
            left = since + self.stall - time.monotonic()
            if left <= 0:
                what = "read" if event == select.POLLOUT else "written"
                raise Cancelled(
                    f"the passed descriptor was not {what} for {self.stall:.0f} s; the call was stopped"
                )
            try:
                if poller.poll(min(left, _SLICE) * 1000):
                    return  # ready, or an error/hang-up the next syscall reports
            except InterruptedError:
                continue


class FdSink:
    """Writes everything it is given to a caller's descriptor, with a stall deadline.

    Use as a context manager (or call ``close``): it may hold a descriptor of its own.
    """

    def __init__(
        self,
        fd: int,
        cancel: threading.Event | None = None,
        stall: float = DEFAULT_STALL,
        progress: Progress = _no_progress,
    ) -> None:
        self.fd = fd
        self._ch = _Channel(fd, True, cancel, stall)
        self._progress = progress
        self.written = 0

    def __enter__(self) -> FdSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._ch.close()

    def __del__(self) -> None:
        # A safety net for a caller that forgot ``with``: the client's flags must come back.
        self._ch.close()

    def _write_some(self, view: memoryview) -> int:
        ch = self._ch
        if ch.sock is not None:
            return ch.sock.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        return os.write(ch.usable, view)

    def write(self, data: memoryview | bytes, /) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        ch = self._ch
        blocking = ch.blocking
        since = time.monotonic()
        ch.check_cancel()
        while view:
            if blocking:  # the client's own blocking description: only write once it is ready
                ch.wait(select.POLLOUT, since)
            try:
                n = self._write_some(view)
            except (BlockingIOError, InterruptedError):
                ch.wait(select.POLLOUT, since)
                continue
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    raise InvalidParams("the reader of the passed descriptor went away") from exc
                raise InvalidParams(f"writing to the passed descriptor failed: {exc.strerror}") from exc
            if n:
                since = time.monotonic()
                view = view[n:]
        self.written += total
        self._progress(self.written, None)
        return total


class FdSource(io.RawIOBase):
    """A readable raw stream over a borrowed descriptor (not closed here), with a stall deadline.

    ``size`` is the input's length when known (a regular file), for progress totals.
    """

    def __init__(
        self,
        fd: int,
        cancel: threading.Event | None = None,
        stall: float = DEFAULT_STALL,
        progress: Progress = _no_progress,
    ) -> None:
        super().__init__()
        self.fd = fd
        self._ch = _Channel(fd, False, cancel, stall)
        self._progress = progress
        self.size = self._ch.size
        self.done = 0

    def readable(self) -> bool:
        return True

    def _read_some(self, buffer: memoryview) -> int:
        ch = self._ch
        if ch.sock is not None:
            return ch.sock.recv_into(buffer, len(buffer), socket.MSG_DONTWAIT)
        return os.readv(ch.usable, [buffer])

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        ch = self._ch
        blocking = ch.blocking
        since = time.monotonic()
        ch.check_cancel()
        while True:
            if blocking:
                ch.wait(select.POLLIN, since)
            try:
                n = self._read_some(memoryview(buffer).cast("B"))
            except (BlockingIOError, InterruptedError):
                ch.wait(select.POLLIN, since)
                continue
            except OSError as exc:
                raise InvalidParams(f"reading the passed descriptor failed: {exc.strerror}") from exc
            if n:
                self.done += n
                self._progress(self.done, self.size)
            elif ch.peer_kind and ch.cancel is not None and ch.cancel.wait(EOF_GRACE):
                # End of input because the caller died, not because it finished: commit nothing.
                ch.check_cancel()
            return n

    def close(self) -> None:
        # The transport owns the descriptor; only our own view of it is closed here.
        self._ch.close()
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


class CappedSink:
    """Passes writes to ``sink`` until ``limit`` bytes; one more byte is ``too_large``, named
    after the config key that sets the limit."""

    def __init__(self, sink: FdSink, limit: int, key: str) -> None:
        self.sink = sink
        self.limit = limit
        self.key = key
        self.size = 0

    def write(self, data: memoryview | bytes, /) -> int:
        if self.size + len(data) > self.limit:
            raise TooLarge(f"the plaintext is over {self.key} ({self.limit // (1024 * 1024)} MiB)")
        self.size += len(data)
        return self.sink.write(data)


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
