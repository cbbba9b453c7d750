"""Format v2's sealed stream as pure functions, against an independent derivation.

The expected bytes are built here from hmac, hashlib and AESGCM directly (HKDF written out as
RFC 5869 says), so a wrong derivation in azaiond.sealed cannot be mirrored by the test.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from azaiond import sealed
from azaiond.errors import IntegrityError


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def reference_seal(magic: bytes, root: bytes, generation: int, plain: bytes, log2: int, salt: bytes) -> bytes:
    """header || sealed chunks, written straight from the format's definition."""
    okm = hkdf_sha256(root, salt, b"azaion v2 " + magic, 64)
    dek, mac_key = okm[:32], okm[32:]
    fixed = magic + bytes([log2]) + b"\0" * 7 + generation.to_bytes(8, "big") + len(plain).to_bytes(8, "big") + salt
    header = fixed + hmac.new(mac_key, fixed, hashlib.sha256).digest()[:16]
    size = 1 << log2
    n = max(1, (len(plain) + size - 1) // size)
    out = [header]
    for i in range(n):
        nonce = i.to_bytes(8, "big") + (1 if i == n - 1 else 0).to_bytes(4, "big")
        out.append(AESGCM(dek).encrypt(nonce, plain[i * size : (i + 1) * size], header))
    return b"".join(out)


def test_rfc5869_case_1_checks_the_reference_hkdf() -> None:
    ikm = bytes([0x0B] * 22)
    salt = bytes(range(13))
    info = bytes(range(0xF0, 0xFA))
    okm = hkdf_sha256(ikm, salt, info, 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def seal_bytes(header: sealed.Header, plain: bytes) -> bytes:
    out = io.BytesIO()
    sealed.seal_stream(header, io.BytesIO(plain), out)
    return out.getvalue()


def open_bytes(header: sealed.Header, stream: bytes) -> bytes:
    out = bytearray()
    buf = memoryview(bytearray(header.chunk + 16))
    sealed.open_chunks(
        header, io.BytesIO(stream), 0, out.extend, opener=sealed.Opener(header), buffer=buf
    )
    return bytes(out)


@pytest.mark.parametrize("magic", [sealed.MAGIC_SPLIT, sealed.MAGIC_IMAGES])
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_matches_independent_vector(magic: bytes, size: int) -> None:
    root, salt = hashlib.sha256(b"resource secret").digest(), bytes(range(32))
    plain = os.urandom(size)
    header = sealed.make_header(magic, root, 0x0102030405060708, size, chunk_log2=12, salt=salt)
    ours = header.raw + seal_bytes(header, plain)
    assert ours == reference_seal(magic, root, 0x0102030405060708, plain, 12, salt)
    assert len(ours) == 80 + size + 16 * max(1, -(-size // 4096))
    assert ours[:8] == magic and ours[8] == 12 and ours[9:16] == bytes(7)
    assert struct.unpack(">QQ", ours[16:32]) == (0x0102030405060708, size)
    parsed = sealed.open_header(ours[:80], root, magic)
    assert (parsed.generation, parsed.size, parsed.chunk_log2) == (0x0102030405060708, size, 12)
    assert open_bytes(parsed, ours[80:]) == plain


def test_publishers_write_one_mib_chunks_and_fresh_salt() -> None:
    root = os.urandom(32)
    a = sealed.make_header(sealed.MAGIC_SPLIT, root, 1, 10)
    b = sealed.make_header(sealed.MAGIC_SPLIT, root, 1, 10)
    assert a.raw[8] == 20 and a.chunk == 1 << 20
    assert a.raw[32:64] != b.raw[32:64]


def test_header_checks() -> None:
    root = os.urandom(32)
    header = sealed.make_header(sealed.MAGIC_SPLIT, root, 7, 100, chunk_log2=12)
    raw = header.raw
    with pytest.raises(IntegrityError):
        sealed.open_header(raw, os.urandom(32), sealed.MAGIC_SPLIT)  # wrong key
    with pytest.raises(IntegrityError):
        sealed.open_header(raw, root, sealed.MAGIC_IMAGES)  # another magic
    with pytest.raises(IntegrityError):
        sealed.open_header(raw[:79], root, sealed.MAGIC_SPLIT)
    for pos in range(80):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        with pytest.raises(IntegrityError):
            sealed.open_header(bytes(bad), root, sealed.MAGIC_SPLIT)


@pytest.mark.parametrize("log2", [11, 25])
def test_chunk_size_out_of_range_is_refused_even_with_a_valid_tag(log2: int) -> None:
    root, salt = os.urandom(32), os.urandom(32)
    okm = hkdf_sha256(root, salt, b"azaion v2 AZSPLT02", 64)
    fixed = b"AZSPLT02" + bytes([log2]) + bytes(7) + (1).to_bytes(8, "big") + (5).to_bytes(8, "big") + salt
    raw = fixed + hmac.new(okm[32:], fixed, hashlib.sha256).digest()[:16]
    with pytest.raises(IntegrityError):
        sealed.open_header(raw, root, sealed.MAGIC_SPLIT)


def test_nonzero_reserved_bytes_are_refused_even_with_a_valid_tag() -> None:
    root, salt = os.urandom(32), os.urandom(32)
    okm = hkdf_sha256(root, salt, b"azaion v2 AZSPLT02", 64)
    fixed = b"AZSPLT02" + bytes([12]) + b"\0\0\0\x01\0\0\0" + (1).to_bytes(8, "big") + (5).to_bytes(8, "big") + salt
    raw = fixed + hmac.new(okm[32:], fixed, hashlib.sha256).digest()[:16]
    with pytest.raises(IntegrityError):
        sealed.open_header(raw, root, sealed.MAGIC_SPLIT)


def test_every_chunk_is_checked_before_it_is_emitted() -> None:
    root = os.urandom(32)
    header = sealed.make_header(sealed.MAGIC_SPLIT, root, 1, 3 * 4096 + 10, chunk_log2=12)
    plain = os.urandom(header.size)
    stream = seal_bytes(header, plain)
    step = 4096 + 16
    cases = {
        "flip in chunk 1": stream[:step + 5] + bytes([stream[step + 5] ^ 1]) + stream[step + 6 :],
        "flip in last tag": stream[:-1] + bytes([stream[-1] ^ 1]),
        "truncated at a chunk edge": stream[: 2 * step],
        "truncated inside chunk 2": stream[: 2 * step + 100],
        "swapped chunks 0 and 1": stream[step : 2 * step] + stream[:step] + stream[2 * step :],
        "extra byte": stream + b"\0",
        "last chunk dropped": stream[: 3 * step],
    }
    for label, bad in cases.items():
        out = bytearray()
        buf = memoryview(bytearray(step))
        with pytest.raises(sealed.ChunkFailed) as info:
            sealed.open_chunks(
                header, io.BytesIO(bad), 0, out.extend, opener=sealed.Opener(header), buffer=buf
            )
        assert plain.startswith(out), label
        assert len(out) <= info.value.index * 4096, label


def test_seal_refuses_input_of_another_length() -> None:
    header = sealed.make_header(sealed.MAGIC_SPLIT, os.urandom(32), 1, 100, chunk_log2=12)
    with pytest.raises(ValueError, match="ended"):
        seal_bytes(header, os.urandom(99))
    with pytest.raises(ValueError, match="longer"):
        seal_bytes(header, os.urandom(101))


def test_spool_gives_back_the_input_and_keeps_no_plaintext(tmp_path: Path) -> None:
    plain = os.urandom(3 * 1024 * 1024 + 17)
    with sealed.Spool(str(tmp_path)) as spool:
        assert spool.fill(io.BytesIO(plain)) == len(plain)
        spool._file.seek(0)
        on_disk = spool._file.read()
        assert plain[:4096] not in on_disk and len(on_disk) == len(plain)
        spool._file.seek(0)
        back = bytearray()
        buf = memoryview(bytearray(65536))
        while n := spool.readinto(buf):
            back += buf[:n]
    assert bytes(back) == plain


def test_seal_images_cli_format_2_from_a_file_and_from_stdin(tmp_path: Path) -> None:
    import subprocess
    import sys

    fragment = tmp_path / "frag.bin"
    fragment.write_bytes(os.urandom(32))
    tar = tmp_path / "in.tar"
    tar.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    key = hashlib.sha256(fragment.read_bytes()).digest()
    base = [sys.executable, "-m", "azaiond.cli.main", "seal-images", "--fragment-file", str(fragment)]
    for label, args, stdin in (("file", ["--tar", str(tar)], None), ("stdin", ["--tar", "-"], tar.read_bytes())):
        out = tmp_path / f"{label}.enc"
        done = subprocess.run([*base, *args, "-o", str(out), "--format", "2"], input=stdin,
                              capture_output=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        raw = out.read_bytes()
        header = sealed.open_header(raw[:80], key, sealed.MAGIC_IMAGES)
        assert header.chunk_log2 == 20 and header.size == tar.stat().st_size
        assert open_bytes(header, raw[80:]) == tar.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.enc", "frag.bin", "in.tar", "stdin.enc"]


def test_the_cipher_context_path_of_older_cryptography_gives_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's cryptography lacks AESGCM.encrypt_into; the Cipher-context path must agree."""
    root, salt = os.urandom(32), os.urandom(32)
    plain = os.urandom(2 * 4096 + 3)
    header = sealed.make_header(sealed.MAGIC_SPLIT, root, 5, len(plain), chunk_log2=12, salt=salt)
    monkeypatch.setattr(sealed, "_HAS_INTO", False)
    stream = seal_bytes(header, plain)
    assert header.raw + stream == reference_seal(sealed.MAGIC_SPLIT, root, 5, plain, 12, salt)
    assert open_bytes(header, stream) == plain
    bad = stream[:10] + bytes([stream[10] ^ 1]) + stream[11:]
    with pytest.raises(sealed.ChunkFailed):
        open_bytes(header, bad)
    empty = sealed.make_header(sealed.MAGIC_SPLIT, root, 5, 0, chunk_log2=12, salt=salt)
    assert open_bytes(empty, seal_bytes(empty, b"")) == b""


def test_config_format_and_chunk_size_are_validated() -> None:
    from azaiond import config
    from azaiond.errors import ConfigError

    assert config.parse({}).resources.format == 1
    assert config.parse({"resources": {"format": 2, "v2_chunk_log2": 12}}).resources.format == 2
    for bad in ({"format": 3}, {"format": "2"}, {"format": True}, {"v2_chunk_log2": 11}, {"v2_chunk_log2": 25}):
        with pytest.raises(ConfigError, match="resources"):
            config.parse({"resources": bad})


def test_generation_record_is_untrusted_input(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json

    from azaiond.errors import StorageError
    from azaiond.generations import Generations

    path = tmp_path / "generations.json"
    path.write_text(json.dumps({"f/a": 5, "f/b": "7", "f/c": -1, "f/d": True, "f/e": 1 << 64}))
    store = Generations(path)
    assert store.highest("f", "a") == 5
    assert [store.highest("f", n) for n in "bcde"] == [None] * 4
    assert caplog.text.count("ignoring 4 bad entries") == 1
    store.record("f", "a", 4)  # lower: nothing changes
    assert json.loads(path.read_text())["f/b"] == "7"
    store.record("f", "a", 6)
    assert json.loads(path.read_text()) == {"f/a": 6}
    assert path.stat().st_mode & 0o777 == 0o600
    assert Generations(path).highest("f", "a") == 6  # as a restarted daemon reads it

    for garbage in (b"\xff\xfe", b"[1, 2]", b"{"):
        path.write_bytes(garbage)
        assert Generations(path).highest("f", "a") is None
    blocked = Generations(tmp_path / "missing-dir" / "sub" / "g.json")
    (tmp_path / "missing-dir").write_text("a file where a directory should be")
    assert blocked.highest("f", "a") is None
    with pytest.raises(StorageError, match=r"missing-dir"):
        blocked.record("f", "a", 1)
