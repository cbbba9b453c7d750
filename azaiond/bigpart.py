"""The one way a load reads a big part, wherever its bytes are: the seam between fetch and decrypt.

A big part is either a cache entry (a complete file) or a download under way (fetch.py), whose
reader waits for bytes that have not arrived yet. Both give the same calls, so a decryptor
(v1's CBC stream, or a chunked format that opens chunk by chunk) reads its input in order with
``readinto``, looks at any span with ``pread`` (waiting for it if need be), and knows the total
``size`` before the first byte. ``finish`` returns once the bytes are safely in the cache;
``fail`` says they are bad, so that nobody keeps them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Protocol

from azaiond.errors import AzaionError
from azaiond.partial import storage_error


class BigPart(Protocol):
    size: int
    pos: int

    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        """Bytes from ``pos`` on (waiting for them if need be); 0 only at the end."""
        ...

    def pread(self, offset: int, size: int, /) -> bytes:
        """Bytes ``[offset, offset + size)`` (clipped to the end), waiting for them if need be."""
        ...

    def seek(self, offset: int, /) -> None: ...

    def finish(self) -> None:
        """Return once the big part is stored in the cache; raise what stopped that."""
        ...

    def fail(self, exc: AzaionError, /) -> None:
        """The bytes are bad: nobody may keep them (a download is stopped and dropped)."""
        ...

    def close(self) -> None: ...


class CachedBigPart:
    """A big part already in the cache: a plain file, opened by the cache (``open_valid``)."""

    def __init__(self, path: Path, handle: IO[bytes]) -> None:
        self.path = path
        self._handle = handle
        self._fd = handle.fileno()
        self.size = os.fstat(self._fd).st_size
        self.pos = 0

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        n = self._read_at(memoryview(buffer), self.pos)
        self.pos += n
        return n

    def pread(self, offset: int, size: int, /) -> bytes:
        buf = bytearray(max(0, min(size, self.size - offset)))
        n = self._read_at(memoryview(buf), offset)
        return bytes(buf[:n])

    def _read_at(self, view: memoryview, offset: int) -> int:
        if not len(view):
            return 0
        try:
            return os.preadv(self._fd, [view], offset)
        except OSError as exc:
            raise storage_error(exc, self.path, "reading") from exc

    def seek(self, offset: int, /) -> None:
        self.pos = offset

    def finish(self) -> None:
        return None

    def fail(self, exc: AzaionError, /) -> None:
        return None  # the caller drops the cache entry

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> CachedBigPart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
