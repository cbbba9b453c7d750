"""The publisher's side of unlock: seal a ``docker save`` tar into ``images.enc``.

Format 1: ``images.enc = IV || AES-256-CBC(SHA-256(key_fragment), IV, PKCS7(tar))``, where the
key fragment is the raw body the Resource API serves at ``/binary-split/key-fragment``. Format 2
(``--format 2``): the ``AZIMGS02`` header and sealed chunks of sealed.py, under the same 32-byte
root key; its header names the tar's size, so a tar of unknown length (stdin, ``--image``) is
first spooled, encrypted under a throwaway key, beside the output. The tar is
streamed through the encryptor in 1 MiB pieces, so sealing a multi-GB archive takes flat
memory, and the output appears under its final name only once it is complete (temp + rename).

Command line (``azaionctl seal-images`` wraps the same function)::

    python -m azaiond.seal --new-fragment --fragment-file frag.bin
    python -m azaiond.seal --fragment-file frag.bin --image azaion/annotations:1.2 -o images.enc
    python -m azaiond.seal --fragment-file frag.bin --tar saved.tar -o images.enc
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import stat
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, cast

from azaiond import crypto, sealed
from azaiond.errors import AzaionError, DockerError
from azaiond.fsutil import atomic_file

FRAGMENT_SIZE = 32  # bytes of a new random key fragment; any length works, 256 bits is plenty


def archive_key(key_fragment: bytes) -> bytes:
    """The AES key of ``images.enc``: SHA-256 of the fragment's raw bytes.

    Not ``crypto.aes_key``: that hashes a UTF-8 *string*, while the fragment is arbitrary bytes
    straight from the API's response body.
    """
    if not key_fragment:
        raise ValueError("the key fragment is empty")
    return hashlib.sha256(key_fragment).digest()


def seal(
    tar_source: BinaryIO | crypto.Source,
    key_fragment: bytes,
    out: Path,
    format: int = 1,
    *,
    size: int | None = None,
    chunk_log2: int = sealed.CHUNK_LOG2,
) -> int:
    """Encrypt ``tar_source`` into ``out`` atomically; returns the size of ``out``.

    The file is written beside ``out`` under a dot-name, fsynced and renamed, so a crash or an
    error never leaves a half archive that an unlock would take for a corrupt one. ``tar_source``
    needs ``readinto`` (every binary file object has it; typing's ``BinaryIO`` does not say so).
    ``size`` (format 2): the bytes ``tar_source`` holds, when known; else it is spooled first.
    """
    key = archive_key(key_fragment)
    source = cast(crypto.Source, tar_source)
    if format == 1:
        # Ciphertext may be world-readable: the key is what is guarded.
        with atomic_file(out.absolute(), mode=0o644) as sink:
            return crypto.encrypt_stream(source, sink, key)
    if format != 2:
        raise ValueError("format must be 1 or 2")
    spool: sealed.Spool | None = None
    plain = cast(sealed.Source, source)
    try:
        if size is None:
            spool = sealed.Spool(str(out.absolute().parent))
            size = spool.fill(plain)
            plain = spool
        # The archive has no rollback guard (unlock.images names the versions a host takes);
        # the generation still records when it was sealed.
        header = sealed.make_header(sealed.MAGIC_IMAGES, key, time.time_ns() // 1000, size, chunk_log2=chunk_log2)
        with atomic_file(out.absolute(), mode=0o644) as sink:
            sink.write(header.raw)
            try:
                return len(header.raw) + sealed.seal_stream(header, plain, sink)
            except ValueError as exc:
                raise AzaionError(f"the tar changed while it was sealed ({exc})") from exc
    finally:
        if spool is not None:
            spool.close()


class ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (docker's ``save`` stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._rest = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        while not self._rest:
            piece = next(self._chunks, None)
            if piece is None:
                return 0
            self._rest = memoryview(piece)
        n = min(len(buf), len(self._rest))
        buf[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


def saved_images(docker_url: str, names: Sequence[str], timeout: float = 3600.0) -> Iterator[bytes]:
    """The ``docker save`` tar of ``names`` (one archive holding all of them), as a stream."""
    import docker
    import docker.errors
    import requests

    try:
        client = docker.DockerClient(base_url=docker_url, timeout=timeout, version="auto")
    except docker.errors.DockerException as exc:
        raise DockerError(f"the Docker engine at {docker_url} is not reachable: {exc}") from exc
    try:
        for name in names:
            client.images.get(name)  # a clear "no such image" before any output is written
        api = client.api
        # /images/get?names=... is what `docker save a b` uses; the SDK (5.0.3 and 7.x) only
        # wraps the one-image form, so the many-image form goes through its request helpers.
        resp = api._get(api._url("/images/get"), params={"names": list(names)}, stream=True)
        yield from api._stream_raw_result(resp, crypto.CHUNK, False)
    except docker.errors.NotFound as exc:
        raise DockerError(f"docker has no such image: {exc.explanation or exc}") from exc
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise DockerError(f"docker save failed: {exc}") from exc
    finally:
        client.close()


def new_fragment(path: Path, size: int = FRAGMENT_SIZE) -> None:
    """Write a fresh random key fragment to ``path`` (0600, refusing to overwrite one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(os.urandom(size))
        handle.flush()
        os.fsync(handle.fileno())


def read_fragment(path: Path) -> bytes:
    data = path.read_bytes()
    if not data:
        raise AzaionError(f"{path}: the key fragment file is empty")
    return data


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Seal docker images into images.enc for azaiond's unlock.",
    )
    p.add_argument("--fragment-file", type=Path, required=True, help="raw key fragment, as the API serves it")
    p.add_argument("--new-fragment", action="store_true", help="first write a new random fragment (0600)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tar", type=Path, help="a tar written by `docker save` ('-' for stdin)")
    src.add_argument("--image", nargs="+", metavar="NAME", help="images to save from the Docker engine")
    p.add_argument("-o", "--output", type=Path, help="where to write the sealed archive")
    p.add_argument("--docker-url", default="unix:///run/docker.sock", help="Docker engine for --image")
    p.add_argument(
        "--format", type=int, choices=(1, 2), default=1,
        help="1: readable by every unlock (default); 2: authenticated chunks, readable by this version on",
    )
    return p


def _seal_from_args(args: argparse.Namespace) -> int:
    """Seal what the arguments name into ``args.output``; returns the sealed size."""
    fragment = read_fragment(args.fragment_file)
    if args.image:
        reader = io.BufferedReader(ChunkReader(saved_images(args.docker_url, args.image)), crypto.CHUNK)
        return seal(reader, fragment, args.output, args.format)
    if str(args.tar) == "-":
        return seal(sys.stdin.buffer, fragment, args.output, args.format, size=_file_size(sys.stdin.buffer))
    with open(args.tar, "rb") as tar:
        return seal(tar, fragment, args.output, args.format, size=_file_size(tar))


def _file_size(handle: BinaryIO) -> int | None:
    """Bytes left in a regular file (from where it stands); None for a pipe."""
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode):
        return None
    return info.st_size - handle.tell()


def main(argv: Sequence[str] | None = None, prog: str = "python -m azaiond.seal") -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    sealing = args.tar is not None or args.image is not None
    if not sealing and not args.new_fragment:
        parser.error("pass --tar FILE or --image NAME... (or --new-fragment)")
    if sealing and args.output is None:
        parser.error("pass -o OUTPUT")
    try:
        if args.new_fragment:
            new_fragment(args.fragment_file)
            print(f"wrote a new key fragment to {args.fragment_file}", file=sys.stderr)
        if sealing:
            size = _seal_from_args(args)
            print(f"sealed {size} bytes into {args.output}", file=sys.stderr)
    except FileExistsError as exc:
        print(f"error: {exc.filename} exists; refusing to replace a key fragment", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    except AzaionError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
