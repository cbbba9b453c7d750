"""The images archive in either format, for unlock: random-access plaintext, the v2 stream, names.

Format v1 is ``IV || CBC(tar)``; format v2 is ``header(AZIMGS02) || sealed chunks`` (see
sealed.py). An unlock reads the archive twice, from one open descriptor:

1. ``scan_names``: a first pass that only parses tar headers and keeps the metadata files
   (manifest.json, repositories, index.json), jumping over layer data. Both formats decrypt at
   any offset (a CBC block needs only the one before it; a v2 chunk stands alone), so this pass
   decrypts little more than the headers and the metadata. No plaintext is written anywhere.
2. the streaming pass into docker, which watches the tar again and, before the last piece goes
   out, checks that it saw the very same metadata. A file changed between the passes therefore
   ends in ``integrity`` with docker never having seen the end of the archive.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from azaiond import crypto, sealed
from azaiond.errors import IntegrityError, UnwantedImages
from azaiond.tarcheck import BAD_TAR, TarWatch, normalise

READ = crypto.CHUNK


class Archive(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...
    def read(self, size: int = -1, /) -> bytes | None: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def fileno(self) -> int: ...


def is_v2(archive: Archive) -> bool:
    archive.seek(0)
    head = archive.read(len(sealed.MAGIC_IMAGES)) or b""
    archive.seek(0)
    return sealed.looks_v2(head, sealed.MAGIC_IMAGES, exact=False)


def _pread(archive: Archive, n: int, offset: int) -> bytes:
    return os.pread(archive.fileno(), n, offset)


# -- random-access plaintext (pass 1) ---------------------------------------------------------


def v1_reader(archive: Archive, size: int, key: bytes) -> Callable[[int, int], bytes]:
    """``read(pos, n)``: plaintext from ``pos`` (padding not stripped; the tar ends before it)."""

    def read(pos: int, n: int) -> bytes:
        first = pos - pos % crypto.BLOCK
        start = crypto.IV_SIZE + first  # the ciphertext block holding ``pos``
        if start >= size:
            return b""
        end = min(size, start + n + 2 * crypto.BLOCK)
        end -= (end - start) % crypto.BLOCK
        data = _pread(archive, end - start + crypto.BLOCK, start - crypto.BLOCK)  # with its chaining block
        if len(data) < 2 * crypto.BLOCK:
            return b""
        dec = Cipher(algorithms.AES(key), modes.CBC(data[: crypto.BLOCK])).decryptor()
        plain = dec.update(data[crypto.BLOCK :]) + dec.finalize()
        return plain[pos - first : pos - first + n]

    return read


def v2_reader(archive: Archive, header: sealed.Header) -> Callable[[int, int], bytes]:
    """``read(pos, n)``: plaintext from ``pos``, up to the end of the chunk that holds it."""
    opener = sealed.Opener(header, buffers=1)

    def read(pos: int, n: int) -> bytes:
        index = pos // header.chunk
        if pos >= header.size:
            return b""
        want = header.plain_len(index) + sealed.TAG_SIZE
        data = _pread(archive, want, sealed.HEADER_SIZE + header.offset(index))
        plain = opener.open(index, memoryview(data))
        at = pos - index * header.chunk
        return bytes(plain[at : at + n])

    return read


def scan_names(read: Callable[[int, int], bytes], allowed: list[str]) -> str:
    """Pass 1: refuse names outside ``allowed``; returns the metadata digest for pass 2."""
    watch = TarWatch()
    pos = 0
    while not watch.done:
        skip = watch.skippable()
        if skip:
            watch.skip(skip)
            pos += skip
            continue
        data = read(pos, READ)
        if not data:
            raise IntegrityError(BAD_TAR)
        watch.feed(data)
        pos += len(data)
    check_names(watch.names(), allowed)
    return watch.digest()


def check_names(names: set[str], allowed: list[str]) -> None:
    extra = names - {normalise(name) for name in allowed}
    if extra:
        raise UnwantedImages(
            f"the image archive would tag {', '.join(sorted(extra))}, which unlock.images does not name; "
            "nothing was loaded"
        )


# -- v2 -----------------------------------------------------------------------------------------


def v2_header(archive: Archive, size: int, key: bytes) -> sealed.Header:
    """The verified header, after checking the file's length; ``IntegrityError`` otherwise."""
    header = sealed.open_header(_pread(archive, sealed.HEADER_SIZE, 0), key, sealed.MAGIC_IMAGES)
    if size != sealed.HEADER_SIZE + header.stream_size:
        raise IntegrityError(sealed.FAILED)
    return header


def v2_tar(
    archive: Archive,
    header: sealed.Header,
    expect: str,
    on_progress: Callable[[int], None],
    check_cancel: Callable[[], None],
) -> Iterator[bytes]:
    """Pass 2: each chunk of the tar once its tag verified; the last only once the metadata matches.

    Raises ``IntegrityError`` on any failure, always before the chunk that fails is yielded.
    ``check_cancel`` raising is how a caller stops it.
    """
    if _pread(archive, sealed.HEADER_SIZE, 0) != header.raw:
        raise IntegrityError(sealed.FAILED)  # replaced in place since pass 1
    archive.seek(sealed.HEADER_SIZE)
    opener = sealed.Opener(header, buffers=1)
    buffer = memoryview(bytearray(header.chunk + sealed.TAG_SIZE))
    watch = TarWatch()
    done = sealed.HEADER_SIZE
    for index in range(header.chunks):
        check_cancel()
        want = header.plain_len(index) + sealed.TAG_SIZE
        if sealed.read_exact(archive, buffer[:want]) != want:
            raise IntegrityError(sealed.FAILED)
        plain = opener.open(index, buffer[:want])
        done += want
        on_progress(done)
        watch.feed(plain)
        if index == header.chunks - 1:
            if sealed.read_exact(archive, buffer[:1]):
                raise IntegrityError(sealed.FAILED)
            if not watch.done or watch.digest() != expect:
                raise IntegrityError(BAD_TAR)
        yield bytes(plain)
