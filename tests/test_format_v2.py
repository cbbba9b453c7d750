"""Format v2 split resources through a real daemon, the reference Resource API and moto S3.

Daemons here write 4 KiB chunks (``resources.v2_chunk_log2: 12``) so that small resources cross
many chunk boundaries. Tampering is done where an attacker would do it: on the CDN object, in
the cache file, or in the small part the API serves.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_daemon import DaemonHandle
from tests.support.devstack import DevStack
from tests.support.replies import kind, ok

FOLDER = "v2-models"
C = 4096
STEP = C + 16
Factory = Callable[..., DaemonHandle]


@pytest.fixture
def start(clean_stack: DevStack, azaiond_factory: Factory) -> Callable[..., DaemonHandle]:
    clean_stack.ensure_bucket(FOLDER)

    def start(**overrides: Any) -> DaemonHandle:
        base: dict[str, Any] = {"resources": {"format": 2, "v2_chunk_log2": 12}}
        for key, value in overrides.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        d = azaiond_factory(config_writer=clean_stack.write_config, overrides=base)
        ok(d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password}))
        return d

    return start


@pytest.fixture
def daemon(start: Callable[..., DaemonHandle]) -> DaemonHandle:
    return start()


class Io:
    """Upload and load through descriptors, as azaionctl does."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def upload(self, d: DaemonHandle, name: str, data: bytes, **params: Any) -> dict[str, Any]:
        src = self.tmp / f"in-{name}"
        src.write_bytes(data)
        fd = os.open(src, os.O_RDONLY)
        try:
            return d.call("upload", {"name": name, "folder": FOLDER, **params}, fd=fd, timeout=60)
        finally:
            os.close(fd)

    def load(self, d: DaemonHandle, name: str) -> tuple[dict[str, Any], bytes]:
        out = self.tmp / f"out-{name}"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            reply = d.call("load", {"name": name, "folder": FOLDER}, fd=fd, timeout=60)
        finally:
            os.close(fd)
        return reply, out.read_bytes()


@pytest.fixture
def io_(tmp_path: Path) -> Io:
    return Io(tmp_path)


def big_object(stack: DevStack, name: str) -> bytes:
    body: bytes = stack.s3_admin_client().get_object(Bucket=FOLDER, Key=f"{name}.big")["Body"].read()
    return body


def put_big(stack: DevStack, name: str, data: bytes) -> None:
    stack.s3_admin_client().put_object(Bucket=FOLDER, Key=f"{name}.big", Body=data)


def cache_file(d: DaemonHandle, name: str) -> Path:
    return d.state_dir / "cache" / FOLDER / f"{name}.big"


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


@pytest.mark.parametrize("size", [0, 1, C - 1, C, C + 1, 37 * C + 123])
def test_round_trip(daemon: DaemonHandle, io_: Io, clean_stack: DevStack, size: int) -> None:
    data = os.urandom(size)
    name = unique("rt")
    up = ok(io_.upload(daemon, name, data))
    chunks = max(1, -(-size // C))
    assert up == {"size": size, "small_size": 80, "big_size": size + 16 * chunks, "format": 2}
    small = clean_stack.refserver.get_part(FOLDER, f"{name}.small")
    assert small is not None and len(small) == 80 and small[:8] == b"AZSPLT02" and small[8] == 12
    assert struct.unpack(">Q", small[24:32])[0] == size
    assert len(big_object(clean_stack, name)) == up["big_size"]
    reply, got = io_.load(daemon, name)
    result = ok(reply)
    generation = struct.unpack(">Q", small[16:24])[0]
    assert result == {"size": size, "sha256": hashlib.sha256(data).hexdigest(), "format": 2, "generation": generation}
    assert got == data
    cache_file(daemon, name).unlink()  # and once more from the CDN
    reply, got = io_.load(daemon, name)
    assert ok(reply)["sha256"] == hashlib.sha256(data).hexdigest() and got == data


def test_format_param_and_v1_still_reads(daemon: DaemonHandle, io_: Io, clean_stack: DevStack) -> None:
    data = os.urandom(10_000)
    name = unique("v1")
    assert ok(io_.upload(daemon, name, data, format=1))["format"] == 1
    reply, got = io_.load(daemon, name)
    assert ok(reply) == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "format": 1}
    assert got == data
    for bad in (3, 0, True):
        assert kind(io_.upload(daemon, name, data, format=bad)) == "invalid_params"


def test_pipe_upload_is_spooled_without_plaintext(daemon: DaemonHandle, io_: Io) -> None:
    data = os.urandom(5 * C + 7)
    name = unique("pipe")
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    try:
        up = ok(daemon.call("upload", {"name": name, "folder": FOLDER}, fd=r, timeout=60))
    finally:
        os.close(r)
    assert up["size"] == len(data) and up["format"] == 2
    assert io_.load(daemon, name)[1] == data


def flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]


def tamper_cases(stream: bytes, small: bytes) -> dict[str, tuple[bytes, bytes, int]]:
    """label -> (small part, big part, index of the first chunk that must fail)."""
    cases: dict[str, tuple[bytes, bytes, int]] = {}
    chunks = -(-len(stream) // STEP)
    for i in range(chunks):
        cases[f"byte flipped in chunk {i}"] = (small, flip(stream, i * STEP + 3), i)
    cases["tag of chunk 2"] = (small, flip(stream, 3 * STEP - 1), 2)
    cases["tag of the last chunk"] = (small, flip(stream, len(stream) - 1), chunks - 1)
    cases["truncated at a chunk boundary"] = (small, stream[: 3 * STEP], 0)
    cases["truncated inside a chunk"] = (small, stream[: 3 * STEP + 77], 0)
    cases["one byte added"] = (small, stream + b"\0", 0)
    cases["chunks 1 and 2 swapped"] = (small, stream[:STEP] + stream[2 * STEP : 3 * STEP] + stream[STEP : 2 * STEP]
                                       + stream[3 * STEP :], 1)
    for label, pos in (("magic", 0), ("chunk_log2", 8), ("zero bytes", 12), ("generation", 20),
                       ("size", 30), ("salt", 40), ("header tag", 70)):
        cases[f"header {label}"] = (flip(small, pos), stream, 0)
    return cases


def test_every_tamper_class_is_integrity_and_output_is_a_clean_prefix(
    daemon: DaemonHandle, io_: Io, clean_stack: DevStack
) -> None:
    data = os.urandom(5 * C + 100)
    name = unique("tamper")
    ok(io_.upload(daemon, name, data))
    small = clean_stack.refserver.get_part(FOLDER, f"{name}.small")
    assert small is not None
    stream = big_object(clean_stack, name)
    for label, (bad_small, bad_big, first_bad) in tamper_cases(stream, small).items():
        clean_stack.refserver.put_part(FOLDER, f"{name}.small", bad_small)
        put_big(clean_stack, name, bad_big)
        cache_file(daemon, name).unlink(missing_ok=True)  # the bad part comes from the CDN
        reply, got = io_.load(daemon, name)
        assert kind(reply) == "integrity", label
        assert data.startswith(got), label
        assert len(got) <= first_bad * C, label
        assert not cache_file(daemon, name).exists(), label
        assert not list((daemon.state_dir / "partial").rglob("*.part*")), label  # nor kept to resume
    # Put back, the true parts load again.
    clean_stack.refserver.put_part(FOLDER, f"{name}.small", small)
    put_big(clean_stack, name, stream)
    assert io_.load(daemon, name)[1] == data


def test_wrong_resource_key_is_integrity(start: Callable[..., DaemonHandle], io_: Io) -> None:
    writer = start()
    name = unique("key")
    ok(io_.upload(writer, name, os.urandom(3 * C)))
    reader = start(resources={"key": "another key entirely"})
    reply, got = io_.load(reader, name)
    assert kind(reply) == "integrity" and got == b""


def test_cache_corrupted_mid_file_goes_on_from_the_cdn(
    daemon: DaemonHandle, io_: Io, clean_stack: DevStack
) -> None:
    data = os.urandom(20 * C + 5)
    name = unique("midfile")
    ok(io_.upload(daemon, name, data))
    path = cache_file(daemon, name)
    raw = bytearray(path.read_bytes())
    raw[7 * STEP + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    reply, got = io_.load(daemon, name)
    assert ok(reply)["sha256"] == hashlib.sha256(data).hexdigest()
    assert got == data  # complete, nothing repeated, nothing lost
    assert "fails at chunk 7" in daemon.log_text()
    assert not path.exists() or path.read_bytes() == big_object(clean_stack, name)


def test_cache_of_wrong_length_is_replaced_from_the_cdn(daemon: DaemonHandle, io_: Io) -> None:
    data = os.urandom(4 * C)
    name = unique("short")
    ok(io_.upload(daemon, name, data))
    path = cache_file(daemon, name)
    path.write_bytes(path.read_bytes()[:-10])
    reply, got = io_.load(daemon, name)
    assert ok(reply)["size"] == len(data) and got == data


def test_stale_cached_entry_after_a_republish_from_another_host(
    start: Callable[..., DaemonHandle], io_: Io
) -> None:
    host = start()
    publisher = start()  # another daemon, with its own state dir and cache
    name = unique("stale")
    old, new = os.urandom(6 * C), os.urandom(6 * C)  # same size: only the keys tell them apart
    ok(io_.upload(host, name, old))
    assert io_.load(host, name)[1] == old
    up = ok(io_.upload(publisher, name, new))
    assert up["format"] == 2
    reply, got = io_.load(host, name)
    assert got == new and ok(reply)["sha256"] == hashlib.sha256(new).hexdigest()


def test_rollback_is_refused_also_after_a_restart(
    start: Callable[..., DaemonHandle], io_: Io, clean_stack: DevStack, azaiond_factory: Factory
) -> None:
    host = start()
    name = unique("rollback")
    first = os.urandom(3 * C)
    ok(io_.upload(host, name, first))
    old_small = clean_stack.refserver.get_part(FOLDER, f"{name}.small")
    assert old_small is not None
    old_big = big_object(clean_stack, name)
    second = os.urandom(3 * C)
    newer = ok(io_.upload(host, name, second))
    assert newer["format"] == 2
    reply, _ = io_.load(host, name)
    gen2 = ok(reply)["generation"]
    assert gen2 > struct.unpack(">Q", old_small[16:24])[0]
    record = json.loads((host.state_dir / "generations.json").read_bytes())
    assert record[f"{FOLDER}/{name}"] == gen2

    # The old, perfectly authentic version is served again.
    clean_stack.refserver.put_part(FOLDER, f"{name}.small", old_small)
    put_big(clean_stack, name, old_big)
    cache_file(host, name).unlink()
    reply, got = io_.load(host, name)
    assert kind(reply) == "rollback" and got == b""
    assert not cache_file(host, name).exists()  # nothing was fetched

    host.stop()
    again = azaiond_factory(config_writer=clean_stack.write_config, name=host.state_dir.name.removesuffix("-state"),
                            overrides={"resources": {"format": 2, "v2_chunk_log2": 12}})
    ok(again.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password}))
    reply, got = io_.load(again, name)
    assert kind(reply) == "rollback" and got == b""


def test_a_publisher_whose_clock_is_behind_still_moves_forward(
    daemon: DaemonHandle, io_: Io, clean_stack: DevStack, start: Callable[..., DaemonHandle]
) -> None:
    name = unique("clock")
    ok(io_.upload(daemon, name, b"x" * 100))
    small = clean_stack.refserver.get_part(FOLDER, f"{name}.small")
    assert small is not None
    # A fresh publisher (no memory of this resource) reads the published generation first.
    other = start()
    ok(io_.upload(other, name, b"y" * 100))
    newer = clean_stack.refserver.get_part(FOLDER, f"{name}.small")
    assert newer is not None
    assert struct.unpack(">Q", newer[16:24])[0] > struct.unpack(">Q", small[16:24])[0]
    assert io_.load(daemon, name)[1] == b"y" * 100


def test_garbage_generation_record_is_ignored(
    start: Callable[..., DaemonHandle], io_: Io, clean_stack: DevStack, azaiond_factory: Factory
) -> None:
    d = start()
    name = unique("garbage")
    ok(io_.upload(d, name, b"z" * 10))
    d.stop()
    (d.state_dir / "generations.json").write_bytes(b"\x00not json{")
    again = azaiond_factory(config_writer=clean_stack.write_config, name=d.state_dir.name.removesuffix("-state"),
                            overrides={"resources": {"format": 2, "v2_chunk_log2": 12}})
    ok(again.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password}))
    for _ in range(2):
        reply, got = io_.load(again, name)
        assert ok(reply)["format"] == 2 and got == b"z" * 10
    assert again.log_text().count("ignoring an unreadable generation record") == 1
    assert json.loads((again.state_dir / "generations.json").read_bytes())[f"{FOLDER}/{name}"] > 0


def test_azaionctl_upload_format_2_and_rollback_exit_status(
    start: Callable[..., DaemonHandle], clean_stack: DevStack, tmp_path: Path
) -> None:
    from azaiond.cli import exitcodes

    d = start(resources={"format": 1})  # the call's --format wins over the config
    cli = [sys.executable, "-m", "azaiond.cli.main", "--socket", str(d.socket_path)]
    name = unique("ctl")
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(3 * C + 1))
    done = subprocess.run([*cli, "--json", "upload", str(src), name, "--folder", FOLDER, "--format", "2"],
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["format"] == 2
    old_small = clean_stack.refserver.get_part(FOLDER, f"{name}.small")
    assert old_small is not None and old_small[:8] == b"AZSPLT02"
    old_big = big_object(clean_stack, name)
    done = subprocess.run([*cli, "upload", str(src), name, "--folder", FOLDER, "--format", "2"],
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    clean_stack.refserver.put_part(FOLDER, f"{name}.small", old_small)
    put_big(clean_stack, name, old_big)
    out = tmp_path / "out.bin"
    done = subprocess.run([*cli, "load", name, "--folder", FOLDER, "-o", str(out)],
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == exitcodes.exit_code_for_kind("rollback"), done.stderr
    assert not out.exists()


def test_fallback_fetches_only_the_chunks_after_the_bad_one(
    start: Callable[..., DaemonHandle], io_: Io, clean_stack: DevStack
) -> None:
    from urllib.parse import urlsplit

    from tests.faultproxy import FaultProxy

    s3 = urlsplit(clean_stack.s3_url)
    assert s3.hostname is not None and s3.port is not None
    with FaultProxy(s3.hostname, s3.port) as proxy:
        d = start(cdn={"endpoint": proxy.url})
        data = os.urandom(64 * C)
        name = unique("ranged")
        ok(io_.upload(d, name, data))
        path = cache_file(d, name)
        raw = bytearray(path.read_bytes())
        raw[48 * STEP + 5] ^= 0x01
        path.write_bytes(bytes(raw))
        proxy.reset_counters()
        reply, got = io_.load(d, name)
        assert ok(reply)["size"] == len(data) and got == data
        assert proxy.count("GET", f"/{FOLDER}/{name}.big") == 1
        rest = 16 * STEP  # chunks 48..63
        assert rest <= proxy.bytes_down < rest + 4096  # the tail of the object and one response head


def test_inline_upload_and_load_in_v2(daemon: DaemonHandle) -> None:
    import base64

    data = os.urandom(3 * C + 17)
    name = unique("inline")
    up = ok(daemon.call("upload", {"name": name, "folder": FOLDER, "data": base64.b64encode(data).decode()}))
    assert up["format"] == 2 and up["size"] == len(data)
    got = ok(daemon.call("load", {"name": name, "folder": FOLDER}))
    assert base64.b64decode(got["data"]) == data
    assert got["format"] == 2 and isinstance(got["generation"], int) and got["generation"] > 0
