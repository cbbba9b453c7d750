"""Format v2: an 80-byte authenticated header and a stream of AES-256-GCM sealed chunks.

Layout (integers big-endian; docs/formats.md has the full picture)::

    header  = magic(8) chunk_log2(1) zero(7) generation(8) size(8) salt(32) tag(16)
    tag     = HMAC-SHA256(mac_key, header[0:64])[0:16]
    okm     = HKDF-SHA256(ikm=root, salt=salt, info=b"azaion v2 " + magic, length=64)
    dek     = okm[0:32], mac_key = okm[32:64]
    chunk i = GCM(dek, nonce=u64(i) || u32(last), plain_i, aad=header) || tag_i(16)

A split resource keeps the header as its small part and the chunks as its big part; an images
archive is the header followed by the chunks, in one file.

Chunks are sealed and opened into buffers allocated once per stream. Every failure of any
check, in the header or in a chunk, raises the one ``IntegrityError`` with the one message, so
a caller learns nothing about which check failed. A chunk's plaintext is handed out only after
its tag has verified.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from azaiond.errors import Cancelled, IntegrityError

MAGIC_SPLIT = b"AZSPLT02"
MAGIC_IMAGES = b"AZIMGS02"
HEADER_SIZE = 80
TAG_SIZE = 16
CHUNK_LOG2 = 20  # what publishers write: 1 MiB chunks
MIN_CHUNK_LOG2 = 12
MAX_CHUNK_LOG2 = 24
FAILED = "verification failed"
_FIXED = struct.Struct(">8sB7sQQ32s")  # the 64 bytes the header's tag covers

# cryptography >= 44 seals into a caller's buffer; older releases (Debian's 38) lack it, and the
# Cipher contexts with update_into do the same work a little slower (measured in bench_core).
_HAS_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")


def derive_keys(root: bytes, salt: bytes, magic: bytes) -> tuple[bytes, bytes]:
    """``(dek, mac_key)`` of one sealed stream."""
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=b"azaion v2 " + magic).derive(root)
    return okm[:32], okm[32:]


def chunk_count(size: int, chunk: int) -> int:
    return max(1, -(-size // chunk))


def stream_size(size: int, chunk: int) -> int:
    """Length of the sealed stream of a ``size``-byte plaintext."""
    return size + TAG_SIZE * chunk_count(size, chunk)


def looks_v2(data: bytes, magic: bytes, exact: bool) -> bool:
    """Does ``data`` carry a v2 magic? ``exact``: a small part must be the header and nothing else."""
    return data[:8] == magic and (len(data) == HEADER_SIZE or not exact)


@dataclass(frozen=True)
class Header:
    """A verified (or freshly made) header and the data key it unlocks."""

    raw: bytes
    magic: bytes
    chunk_log2: int
    generation: int
    size: int
    dek: bytes

    @property
    def chunk(self) -> int:
        return 1 << self.chunk_log2

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk)

    @property
    def stream_size(self) -> int:
        return stream_size(self.size, self.chunk)

    def plain_len(self, index: int) -> int:
        """Plaintext bytes in chunk ``index``."""
        return min(self.chunk, self.size - index * self.chunk)

    def offset(self, index: int) -> int:
        """Where chunk ``index`` starts in the sealed stream."""
        return index * (self.chunk + TAG_SIZE)

    def nonce(self, index: int) -> bytes:
        return struct.pack(">QI", index, 1 if index == self.chunks - 1 else 0)


def make_header(
    magic: bytes,
    root: bytes,
    generation: int,
    size: int,
    *,
    chunk_log2: int = CHUNK_LOG2,
    salt: bytes | None = None,
) -> Header:
    """A new header for a stream of ``size`` plaintext bytes (a fresh random salt unless given)."""
    if magic not in (MAGIC_SPLIT, MAGIC_IMAGES):
        raise ValueError("unknown magic")
    if not MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2:
        raise ValueError("chunk_log2 out of range")
    if not (0 <= generation < 1 << 64 and 0 <= size < 1 << 64):
        raise ValueError("generation or size out of range")
    salt = os.urandom(32) if salt is None else salt
    dek, mac_key = derive_keys(root, salt, magic)
    fixed = _FIXED.pack(magic, chunk_log2, bytes(7), generation, size, salt)
    tag = hmac.new(mac_key, fixed, hashlib.sha256).digest()[:TAG_SIZE]
    return Header(fixed + tag, magic, chunk_log2, generation, size, dek)


def open_header(data: bytes, root: bytes, magic: bytes) -> Header:
    """Parse and verify a header; any failure is the one ``IntegrityError``."""
    if len(data) != HEADER_SIZE:
        raise IntegrityError(FAILED)
    got_magic, log2, zero, generation, size, salt = _FIXED.unpack(data[:64])
    dek, mac_key = derive_keys(root, salt, magic)
    want = hmac.new(mac_key, data[:64], hashlib.sha256).digest()[:TAG_SIZE]
    ok = hmac.compare_digest(want, data[64:])
    ok = ok and got_magic == magic and zero == bytes(7) and MIN_CHUNK_LOG2 <= log2 <= MAX_CHUNK_LOG2
    if not ok:
        raise IntegrityError(FAILED)
    return Header(bytes(data), magic, log2, generation, size, dek)


class _Gcm:
    """AES-256-GCM into caller-owned buffers, with whichever API this cryptography has."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._aes = algorithms.AES(key)

    def seal_into(self, nonce: bytes, plain: memoryview, aad: bytes, out: memoryview) -> None:
        """``out`` (len(plain) + 16 bytes) gets ciphertext || tag."""
        if _HAS_INTO:
            self._aead.encrypt_into(nonce, plain, aad, out)
            return
        enc = Cipher(self._aes, modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        n = enc.update_into(plain, out) if len(plain) else 0
        enc.finalize()
        out[n : n + TAG_SIZE] = enc.tag

    def open_into(self, nonce: bytes, sealed: memoryview, aad: bytes, room: memoryview) -> memoryview:
        """The plaintext, in ``room`` (at least len(sealed) bytes); raises ``IntegrityError``.

        On failure ``room`` may hold unauthenticated bytes: the caller must not use them.
        """
        n = len(sealed) - TAG_SIZE
        try:
            if _HAS_INTO:
                self._aead.decrypt_into(nonce, sealed, aad, room[:n])
                return room[:n]
            # update_into of older releases wants 15 bytes of room beyond the input.
            tag = bytes(sealed[n:])
            dec = Cipher(self._aes, modes.GCM(nonce, tag)).decryptor()
            dec.authenticate_additional_data(aad)
            if n:
                dec.update_into(sealed[:n], room)
            dec.finalize()
            return room[:n]
        except (InvalidTag, ValueError) as exc:
            raise IntegrityError(FAILED) from exc


class Sealer:
    """Seals the chunks of one stream, in order, into one reused buffer."""

    def __init__(self, header: Header) -> None:
        self.header = header
        self._gcm = _Gcm(header.dek)
        self._out = memoryview(bytearray(header.chunk + TAG_SIZE))

    def seal(self, index: int, plain: memoryview) -> memoryview:
        """The sealed chunk ``index``; the view is valid until the next call."""
        h = self.header
        if not 0 <= index < h.chunks or len(plain) != h.plain_len(index):
            raise ValueError("chunk out of place")
        out = self._out[: len(plain) + TAG_SIZE]
        self._gcm.seal_into(h.nonce(index), plain, h.raw, out)
        return out


class Opener:
    """Opens the chunks of one stream into ``buffers`` plaintext buffers that take turns.

    With two buffers a view stays valid for one more call, so a consumer can hash chunk i on
    another thread while chunk i+1 is opened.
    """

    def __init__(self, header: Header, buffers: int = 2) -> None:
        self.header = header
        self._gcm = _Gcm(header.dek)
        self._bufs = [memoryview(bytearray(header.chunk + TAG_SIZE)) for _ in range(buffers)]
        self._turn = 0

    def open(self, index: int, sealed: memoryview) -> memoryview:
        """Plaintext of chunk ``index`` once its tag verified; ``IntegrityError`` otherwise."""
        h = self.header
        if not 0 <= index < h.chunks or len(sealed) != h.plain_len(index) + TAG_SIZE:
            raise IntegrityError(FAILED)
        self._turn = (self._turn + 1) % len(self._bufs)
        return self._gcm.open_into(h.nonce(index), sealed, h.raw, self._bufs[self._turn])


class Source(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Sink(Protocol):
    def write(self, data: memoryview | bytes, /) -> object: ...


class ChunkFailed(IntegrityError):
    """A chunk was short or did not open; ``index`` says which, so a reader can resume there."""

    def __init__(self, index: int) -> None:
        super().__init__(FAILED)
        self.index = index


def read_exact(source: Source, view: memoryview) -> int:
    """Fill ``view`` from ``source``; returns how much arrived before the end."""
    got = 0
    while got < len(view):
        n = source.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def open_chunks(
    header: Header,
    source: Source,
    first: int,
    emit: Callable[[memoryview], None],
    *,
    opener: Opener,
    buffer: memoryview,
    cancel: threading.Event | None = None,
) -> None:
    """Open chunks ``first``.. from ``source`` (positioned at chunk ``first``) and ``emit`` each.

    ``buffer`` holds one sealed chunk (chunk + 16 bytes). A short read, a chunk that does not
    open, or bytes after the last chunk raise ``ChunkFailed`` naming the chunk; nothing of that
    chunk has been emitted then.
    """
    for index in range(first, header.chunks):
        if cancel is not None and cancel.is_set():
            raise Cancelled("the daemon is shutting down; the load was stopped")
        want = header.plain_len(index) + TAG_SIZE
        sealed = buffer[:want]
        try:
            if read_exact(source, sealed) != want:
                raise IntegrityError(FAILED)
            plain = opener.open(index, sealed)
            if index == header.chunks - 1 and read_exact(source, buffer[:1]):
                raise IntegrityError(FAILED)  # the last chunk must end the stream
        except IntegrityError as exc:
            raise ChunkFailed(index) from exc
        emit(plain)


def seal_stream(
    header: Header,
    source: Source,
    sink: Sink,
    cancel: threading.Event | None = None,
    on_chunk: Callable[[], None] = lambda: None,
) -> int:
    """Seal exactly ``header.size`` bytes of ``source`` into ``sink``; returns the bytes written.

    ``ValueError`` if the source ends early or holds more than ``header.size`` bytes.
    """
    sealer = Sealer(header)
    buf = memoryview(bytearray(header.chunk))
    written = 0
    for index in range(header.chunks):
        if cancel is not None and cancel.is_set():
            raise Cancelled("the daemon is shutting down; the upload was stopped")
        want = header.plain_len(index)
        if read_exact(source, buf[:want]) != want:
            raise ValueError("the input ended before its announced size")
        out = sealer.seal(index, buf[:want])
        sink.write(out)
        written += len(out)
        on_chunk()
    if read_exact(source, buf[:1]):
        raise ValueError("the input is longer than its announced size")
    return written


class Spool:
    """An input of unknown length, held on disk under a key that lives only in this object.

    A header names the plaintext size before the first chunk is sealed, and a pipe does not
    tell its length. So such an input is first read to its end into an unnamed temp file, as
    AES-256-CTR ciphertext under a random key, and then read back through the decryption. No
    plaintext reaches the disk, and the file vanishes when it is closed (or the process dies).
    """

    def __init__(self, directory: str) -> None:
        self._dec: CipherContext | None = None
        self._raw = memoryview(bytearray(0))
        self._plain = memoryview(bytearray(16))
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed by close())
        self._key = os.urandom(32)
        self._nonce = os.urandom(16)
        self.size = 0

    def fill(self, source: Source, chunk: int = 1 << 20, cancel: threading.Event | None = None) -> int:
        enc = Cipher(algorithms.AES(self._key), modes.CTR(self._nonce)).encryptor()
        buf = memoryview(bytearray(chunk))
        out = memoryview(bytearray(chunk + 16))  # update_into of older releases wants the room
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("the daemon is shutting down; the upload was stopped")
            n = source.readinto(buf)
            if not n:
                break
            enc.update_into(buf[:n], out)
            self._file.write(out[:n])
            self.size += n
        self._file.flush()
        self._file.seek(0)
        return self.size

    def readinto(self, buffer: memoryview, /) -> int:
        """The plaintext back, in order (after ``fill``)."""
        if self._dec is None:
            self._dec = Cipher(algorithms.AES(self._key), modes.CTR(self._nonce)).decryptor()
        if len(self._raw) < len(buffer):
            self._raw = memoryview(bytearray(len(buffer)))
            self._plain = memoryview(bytearray(len(buffer) + 16))
        n = self._file.readinto(self._raw[: len(buffer)])
        if not n:
            return 0
        self._dec.update_into(self._raw[:n], self._plain)
        buffer[:n] = self._plain[:n]
        return n

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
