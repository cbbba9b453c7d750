"""The v1 wire crypto of docs/formats.md: AES-256-CBC with a random IV in front, PKCS7 padding.

Streams never hold a whole payload: ciphertext goes through ``update_into`` with buffers that
are allocated once per stream and reused, which is several times faster than ``update()`` on
big chunks (measured: see docs/performance.md). Every decryption failure raises the same ``IntegrityError`` with the
same message, so a caller cannot tell bad padding from a wrong length or a wrong key.

v1 has no MAC: tampering is caught only where it breaks the padding. ``check_tail`` uses that
to vet a ciphertext from its last two blocks before a single plaintext byte is written.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from azaiond.errors import IntegrityError

BLOCK = 16
IV_SIZE = 16
CHUNK = 1024 * 1024
_FAILED = "decryption failed"


def aes_key(secret: str) -> bytes:
    """SHA-256 of the UTF-8 secret: the 32-byte AES key every v1 payload uses."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def hw_hash(hardware: str) -> str:
    return base64.b64encode(hashlib.sha384(f"Azaion_{hardware}_%$$$)0_".encode()).digest()).decode()


def api_key(email: str, password: str, hardware_hash: str) -> str:
    """The per-user, per-machine secret the Resource API encrypts downloads with."""
    material = f"{email}-{password}-{hardware_hash}-#%@AzaionKey@%#---"
    return base64.b64encode(hashlib.sha384(material.encode("utf-8")).digest()).decode()


def ciphertext_size(plain_size: int) -> int:
    """Length of ``encrypt(plain)`` for a plaintext of ``plain_size`` bytes."""
    return IV_SIZE + (plain_size // BLOCK + 1) * BLOCK


def _cipher(key: bytes, iv: bytes) -> Cipher[modes.CBC]:
    return Cipher(algorithms.AES(key), modes.CBC(iv))


def _pad(tail: bytes) -> bytes:
    n = BLOCK - len(tail) % BLOCK
    return tail + bytes([n]) * n


def _unpad_block(block: bytes) -> bytes:
    """Strip PKCS7 from the final plaintext block, or fail without saying why."""
    n = block[-1]
    # Fold every check into one flag so each failure takes the same path.
    ok = 1 <= n <= BLOCK
    for b in block[BLOCK - n if ok else 0 :]:
        ok = ok and b == n
    if not ok:
        raise IntegrityError(_FAILED)
    return block[: BLOCK - n]


def encrypt_bytes(plain: bytes, key: bytes, iv: bytes | None = None) -> bytes:
    """Encrypt a small payload in one go (key fragments, small parts, cdn.yaml)."""
    iv = os.urandom(IV_SIZE) if iv is None else iv
    enc = _cipher(key, iv).encryptor()
    return iv + enc.update(_pad(plain)) + enc.finalize()


def decrypt_bytes(data: bytes, key: bytes) -> bytes:
    """Decrypt a small payload in one go; any failure is the one ``IntegrityError``."""
    if len(data) < IV_SIZE + BLOCK or len(data) % BLOCK:
        raise IntegrityError(_FAILED)
    dec = _cipher(key, data[:IV_SIZE]).decryptor()
    plain = dec.update(data[IV_SIZE:]) + dec.finalize()
    return plain[:-BLOCK] + _unpad_block(plain[-BLOCK:])


def check_tail(last_two_blocks: bytes, key: bytes) -> None:
    """Vet a ciphertext's padding from its last 32 bytes (IV or previous block, then last block).

    In CBC the final plaintext block depends only on the last two ciphertext blocks, so a
    truncated or tail-tampered ciphertext is caught here without decrypting the rest.
    """
    if len(last_two_blocks) != 2 * BLOCK:
        raise IntegrityError(_FAILED)
    dec = _cipher(key, last_two_blocks[:BLOCK]).decryptor()
    _unpad_block(dec.update(last_two_blocks[BLOCK:]) + dec.finalize())


class Sink(Protocol):
    def write(self, data: memoryview | bytes, /) -> object: ...


class Source(Protocol):
    def readinto(self, buffer: memoryview | bytearray, /) -> int | None: ...


class StreamEncryptor:
    """Encrypts a stream chunk by chunk; the IV comes out with the first chunk."""

    def __init__(self, key: bytes, iv: bytes | None = None, chunk: int = CHUNK) -> None:
        self._iv = os.urandom(IV_SIZE) if iv is None else iv
        self._ctx: CipherContext = _cipher(key, self._iv).encryptor()
        self._out = bytearray(IV_SIZE + chunk + 2 * BLOCK)
        self._view = memoryview(self._out)
        self._chunk = chunk
        self._pending = b""  # plaintext bytes short of a whole block
        self._started = False

    def update(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Ciphertext for ``data`` (the view is valid until the next call)."""
        data = memoryview(data)
        if len(data) > self._chunk:
            raise ValueError("chunk larger than the encryptor's buffer")
        start = 0
        if not self._started:
            self._out[:IV_SIZE] = self._iv
            start = IV_SIZE
            self._started = True
        if self._pending:
            head = self._pending + bytes(data[: BLOCK - len(self._pending)])
            data = data[BLOCK - len(self._pending) :]
            if len(head) < BLOCK:
                self._pending = head
                return self._view[:start]
            start += self._ctx.update_into(head, self._view[start:])
            self._pending = b""
        whole = len(data) - len(data) % BLOCK
        n = self._ctx.update_into(data[:whole], self._view[start:]) if whole else 0
        self._pending = bytes(data[whole:])
        return self._view[: start + n]

    def finalize(self) -> bytes:
        prefix = b"" if self._started else self._iv
        self._started = True
        return prefix + self._ctx.update(_pad(self._pending)) + self._ctx.finalize()


class StreamDecryptor:
    """Decrypts an ``IV || CBC`` stream chunk by chunk and holds back the padded final block.

    ``update`` returns plaintext that is certain not to be padding; ``finalize`` checks the
    padding and returns the last few bytes. Failures all raise the same ``IntegrityError``.
    """

    def __init__(self, key: bytes, chunk: int = CHUNK, buffers: int = 1) -> None:
        self._key = key
        self._ctx: CipherContext | None = None
        self._iv = b""
        self._chunk = chunk
        # Layout of each buffer: [held-back block][fresh plaintext ...]; the held-back block is
        # emitted first next time, so update() never copies more than one block. With several
        # buffers they take turns, so a view stays valid for ``buffers`` calls (for a consumer
        # that hashes on another thread while the next chunk is decrypted).
        self._bufs = [bytearray(BLOCK + chunk + 2 * BLOCK) for _ in range(buffers)]
        self._views = [memoryview(b) for b in self._bufs]
        self._turn = 0
        self._held = 0
        self._last = b""
        self._total = 0

    def update(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Plaintext that is certain not to be padding; valid until the next call."""
        data = memoryview(data)
        if len(data) > self._chunk:
            raise ValueError("chunk larger than the decryptor's buffer")
        self._total += len(data)
        if self._ctx is None:
            need = IV_SIZE - len(self._iv)
            self._iv += bytes(data[:need])
            data = data[need:]
            if len(self._iv) < IV_SIZE:
                return self._views[0][:0]
            self._ctx = _cipher(self._key, self._iv).decryptor()
        self._turn = (self._turn + 1) % len(self._bufs)
        buf, view = self._bufs[self._turn], self._views[self._turn]
        n = self._ctx.update_into(data, view[BLOCK:])
        if n == 0:
            return view[:0]
        if self._held:
            buf[:BLOCK] = self._last  # the block held back last time goes out first
        out = view[BLOCK - self._held : n]
        self._last = bytes(view[n : BLOCK + n])
        self._held = BLOCK
        return out

    def finalize(self) -> bytes:
        if self._ctx is None or self._total < IV_SIZE + BLOCK or (self._total - IV_SIZE) % BLOCK:
            raise IntegrityError(_FAILED)
        try:
            self._ctx.finalize()
        except ValueError as exc:
            raise IntegrityError(_FAILED) from exc
        if not self._held:
            raise IntegrityError(_FAILED)
        return _unpad_block(self._last)


def encrypt_stream(src: Source, sink: Sink, key: bytes, chunk: int = CHUNK) -> int:
    """Encrypt ``src`` to ``sink``; returns the ciphertext length."""
    enc = StreamEncryptor(key, chunk=chunk)
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    while True:
        n = src.readinto(buf)
        if not n:
            break
        out = enc.update(view[:n])
        sink.write(out)
        total += len(out)
    last = enc.finalize()
    sink.write(last)
    return total + len(last)


class BackgroundHash:
    """SHA-256 on a worker thread, one chunk in flight at a time.

    SHA-256 runs several times slower than CBC decryption here, and hashlib releases the GIL,
    so hashing chunk i while chunk i+1 is decrypted and written keeps a load near the speed of
    decrypt-and-write alone. ``update`` waits for the previous chunk's hash before queueing the
    next one, which is what makes two alternating plaintext buffers enough.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._pending: Future[None] | None = None

    def update(self, data: memoryview) -> None:
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._digest.update, data)

    def hexdigest(self, last: bytes) -> str:
        self.close()
        self._digest.update(last)
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        self._pool.shutdown(wait=True)


def decrypt_chunks(
    chunks: Callable[[memoryview], int], sink: Sink, key: bytes, chunk: int = CHUNK
) -> tuple[int, str]:
    """Decrypt what ``chunks(buffer) -> n`` reads (0 at the end) into ``sink``.

    Returns the plaintext size and its SHA-256 hex digest.
    """
    dec = StreamDecryptor(key, chunk=chunk, buffers=2)
    digest = BackgroundHash()
    buf = bytearray(chunk)
    view = memoryview(buf)
    size = 0
    try:
        while True:
            n = chunks(view)
            if not n:
                break
            out = dec.update(view[:n])
            if out:
                digest.update(out)
                sink.write(out)
                size += len(out)
        last = dec.finalize()
    finally:
        digest.close()
    sink.write(last)
    return size + len(last), digest.hexdigest(last)


def decrypt_stream(src: Source, sink: Sink, key: bytes, chunk: int = CHUNK) -> tuple[int, str]:
    """Decrypt the whole of ``src`` into ``sink``; returns (plaintext size, sha256 hex)."""
    return decrypt_chunks(lambda buf: src.readinto(buf) or 0, sink, key, chunk)
