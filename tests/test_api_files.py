"""Whole-file API resources (api_upload / api_load) through a real daemon and the reference API."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from azaiond.apifiles import MultipartBody
from azaiond.errors import InvalidParams
from tests.fixtures_daemon import DaemonHandle
from tests.fixtures_stack import unique_name
from tests.support.devstack import DevStack
from tests.support.refserver.handler import parse_multipart
from tests.support.replies import kind, ok

FOLDER = "api-files"
Factory = Callable[..., DaemonHandle]


@pytest.fixture
def daemon(clean_stack: DevStack, azaiond_factory: Factory) -> DaemonHandle:
    d = azaiond_factory(config_writer=clean_stack.write_config, overrides={"resources": {"api_max_mb": 1}})
    ok(d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password}))
    return d


def call_with_fd(d: DaemonHandle, method: str, params: dict[str, Any], fd: int) -> dict[str, Any]:
    return d.call(method, params, fd=fd, timeout=60)


def test_inline_round_trip_stores_the_bytes_as_they_are(daemon: DaemonHandle, clean_stack: DevStack) -> None:
    name = unique_name("inl") + ".yaml"
    data = b"model: yolo\n\x00\xff\r\n--not-a-boundary\r\n" + os.urandom(5000)
    params = {"name": name, "folder": FOLDER, "data": base64.b64encode(data).decode()}
    assert ok(daemon.call("api_upload", params)) == {"size": len(data)}
    assert clean_stack.refserver.get_part(FOLDER, name) == data
    got = ok(daemon.call("api_load", {"name": name, "folder": FOLDER}))
    digest = hashlib.sha256(data).hexdigest()
    assert got == {"size": len(data), "sha256": digest, "data": base64.b64encode(data).decode()}


def test_descriptor_round_trip(daemon: DaemonHandle, clean_stack: DevStack, tmp_path: Path) -> None:
    name = unique_name("fd") + ".bin"
    data = os.urandom(1024 * 1024 - 7)  # under api_max_mb (1 MiB here)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        assert ok(call_with_fd(daemon, "api_upload", {"name": name, "folder": FOLDER, "size": len(data)}, fd)) == {
            "size": len(data)
        }
    finally:
        os.close(fd)
    assert clean_stack.refserver.get_part(FOLDER, name) == data
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        reply = d_load = call_with_fd(daemon, "api_load", {"name": name, "folder": FOLDER}, fd)
    finally:
        os.close(fd)
    assert ok(d_load) == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, reply
    assert out.read_bytes() == data
    src.write_bytes(os.urandom(1024 * 1024 + 1))
    fd = os.open(src, os.O_RDONLY)
    try:
        assert kind(call_with_fd(daemon, "api_upload", {"name": name, "folder": FOLDER}, fd)) == "too_large"
    finally:
        os.close(fd)
    assert clean_stack.refserver.get_part(FOLDER, name) == data


def _pipe_upload(d: DaemonHandle, params: dict[str, Any], data: bytes) -> dict[str, Any]:
    r, w = os.pipe()

    def feed() -> None:
        try:
            os.write(w, data)
        except BrokenPipeError:
            pass
        finally:
            os.close(w)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        return d.call("api_upload", params, fd=r, timeout=60)
    finally:
        os.close(r)
        writer.join(10)


def test_pipe_with_and_without_size(daemon: DaemonHandle, clean_stack: DevStack) -> None:
    data = os.urandom(700_000)
    sized = unique_name("pipe") + ".bin"
    assert ok(_pipe_upload(daemon, {"name": sized, "folder": FOLDER, "size": len(data)}, data)) == {"size": len(data)}
    assert clean_stack.refserver.get_part(FOLDER, sized) == data
    unsized = unique_name("pipe") + ".bin"
    assert ok(_pipe_upload(daemon, {"name": unsized, "folder": FOLDER}, data)) == {"size": len(data)}
    assert clean_stack.refserver.get_part(FOLDER, unsized) == data
    # Without a size, a pipe is held in memory, so it is refused past api_max_mb (1 MiB here).
    over = unique_name("pipe") + ".bin"
    assert kind(_pipe_upload(daemon, {"name": over, "folder": FOLDER}, os.urandom(1024 * 1024 + 1))) == "too_large"
    assert clean_stack.refserver.get_part(FOLDER, over) is None


@pytest.mark.parametrize("delta", [-1, 1])
def test_size_mismatch_commits_nothing(daemon: DaemonHandle, clean_stack: DevStack, tmp_path: Path, delta: int) -> None:
    name = unique_name("mis") + ".bin"
    old = b"the old version"
    ok(daemon.call("api_upload", {"name": name, "folder": FOLDER, "data": base64.b64encode(old).decode()}))
    data = os.urandom(200_000)
    announced = len(data) + delta
    assert kind(_pipe_upload(daemon, {"name": name, "folder": FOLDER, "size": announced}, data)) == "invalid_params"
    assert clean_stack.refserver.get_part(FOLDER, name) == old
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        reply = call_with_fd(daemon, "api_upload", {"name": name, "folder": FOLDER, "size": announced}, fd)
    finally:
        os.close(fd)
    assert kind(reply) == "invalid_params"
    inline = {"name": name, "folder": FOLDER, "data": base64.b64encode(data).decode(), "size": announced}
    assert kind(daemon.call("api_upload", inline)) == "invalid_params"
    assert clean_stack.refserver.get_part(FOLDER, name) == old
    assert ok(daemon.call("api_load", {"name": name, "folder": FOLDER}))["size"] == len(old)


def test_errors(daemon: DaemonHandle, clean_stack: DevStack) -> None:
    assert kind(daemon.call("api_load", {"name": unique_name("none"), "folder": FOLDER})) == "not_found"
    assert kind(daemon.call("api_load", {"name": "../x", "folder": FOLDER})) == "invalid_name"
    assert kind(daemon.call("api_upload", {"name": "a.bin", "folder": "a/b", "data": ""})) == "invalid_name"
    assert kind(daemon.call("api_upload", {"name": "a.bin", "folder": FOLDER, "size": "1", "data": ""})) == (
        "invalid_params"
    )
    assert kind(daemon.call("api_upload", {"name": "a.bin", "folder": FOLDER, "size": -1, "data": ""})) == (
        "invalid_params"
    )
    big = unique_name("big") + ".bin"
    clean_stack.refserver.put_part(FOLDER, big, os.urandom(1024 * 1024 + 16))
    assert kind(daemon.call("api_load", {"name": big, "folder": FOLDER})) == "upstream"  # over api_max_mb
    clean_stack.refserver.corrupt_next_get()
    name = unique_name("cor") + ".bin"
    clean_stack.refserver.put_part(FOLDER, name, b"x" * 100)
    assert kind(daemon.call("api_load", {"name": name, "folder": FOLDER})) == "integrity"


def test_multipart_body_is_what_the_reference_server_parses() -> None:
    data = b"\r\n--x\r\n" + os.urandom(100_000)
    body = MultipartBody("f.bin", io.BytesIO(data), len(data))
    raw = b"".join(iter(lambda: body.read(777), b""))
    assert len(raw) == len(body)
    assert parse_multipart(body.content_type, raw)["data"] == ("f.bin", data)
    short = MultipartBody("f.bin", io.BytesIO(data), len(data) + 1)
    with pytest.raises(InvalidParams):
        while short.read(65536):
            pass
