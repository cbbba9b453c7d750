"""The `size` param of upload and cdn_upload, and the per-call log line of byte-moving calls,
against the daemon process, the reference Resource API and moto S3.

A size that disagrees with the bytes read fails with invalid_params and commits nothing: the
old resource loads as before, no CDN object appears, no multipart upload is left open.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_daemon import DaemonHandle
from tests.support.devstack import DevStack
from tests.support.replies import ok

FOLDER = "size-models"


def invalid(reply: dict[str, Any]) -> str:
    assert reply.get("error", {}).get("data") == {"kind": "invalid_params"}, reply
    message: str = reply["error"]["message"]
    return message


@pytest.fixture
def daemon(clean_stack: DevStack, azaiond_factory: Callable[..., DaemonHandle]) -> DaemonHandle:
    clean_stack.ensure_bucket(FOLDER)
    # 5 MiB CDN parts, so the 12 MiB input below goes up as a multipart upload.
    d = azaiond_factory(config_writer=clean_stack.write_config, overrides={"cdn": {"multipart_chunk_mb": 5}})
    ok(d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password}))
    return d


def send_file(d: DaemonHandle, method: str, params: dict[str, Any], path: Path) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return d.call(method, params, fd=fd, timeout=120)
    finally:
        os.close(fd)


def no_open_uploads(stack: DevStack) -> bool:
    listing = stack.s3_admin_client().list_multipart_uploads(Bucket=FOLDER)
    return not listing.get("Uploads")


def test_upload_size_mismatch_commits_nothing(daemon: DaemonHandle, clean_stack: DevStack, tmp_path: Path) -> None:
    old = os.urandom(50_000)
    ok(daemon.call("upload", {"name": "r.bin", "folder": FOLDER, "data": base64.b64encode(old).decode(),
                              "size": len(old)}))
    new = tmp_path / "new.bin"
    new.write_bytes(os.urandom(12 * 1024 * 1024 + 5))
    n = new.stat().st_size
    for wrong in (n - 1, n + 1, 0, 10):
        message = invalid(send_file(daemon, "upload", {"name": "r.bin", "folder": FOLDER, "size": wrong}, new))
        assert str(wrong) in message
    assert invalid(daemon.call("upload", {"name": "r.bin", "folder": FOLDER, "size": -1, "data": ""}))
    inline = daemon.call("upload", {"name": "r.bin", "folder": FOLDER, "size": 4, "data": "YWJj"})
    assert "3" in invalid(inline)
    # The old resource is intact, on the API and the CDN; nothing is left half-sent.
    got = ok(daemon.call("load", {"name": "r.bin", "folder": FOLDER}))
    assert base64.b64decode(got["data"]) == old
    (Path(daemon.state_dir) / "cache").joinpath(FOLDER, "r.bin.big").unlink(missing_ok=True)
    assert base64.b64decode(ok(daemon.call("load", {"name": "r.bin", "folder": FOLDER}))["data"]) == old
    assert no_open_uploads(clean_stack)
    # The right size goes through.
    assert ok(send_file(daemon, "upload", {"name": "r.bin", "folder": FOLDER, "size": n}, new))["size"] == n


def test_cdn_upload_size_mismatch_leaves_no_object(
    daemon: DaemonHandle, clean_stack: DevStack, tmp_path: Path
) -> None:
    src = tmp_path / "c.bin"
    src.write_bytes(os.urandom(11 * 1024 * 1024))
    n = src.stat().st_size
    for key, wrong in (("big-short.bin", n - 7), ("big-long.bin", n + 7)):
        invalid(send_file(daemon, "cdn_upload", {"bucket": FOLDER, "key": key, "size": wrong}, src))
    invalid(daemon.call("cdn_upload", {"bucket": FOLDER, "key": "small.bin", "size": 2, "data": "YWJj"}))
    keys = clean_stack.s3_admin_client().list_objects_v2(Bucket=FOLDER).get("Contents", [])
    assert not {k["Key"] for k in keys} & {"big-short.bin", "big-long.bin", "small.bin"}
    assert no_open_uploads(clean_stack)
    assert ok(send_file(daemon, "cdn_upload", {"bucket": FOLDER, "key": "ok.bin", "size": n}, src)) == {"size": n}


def test_byte_moving_calls_are_logged(daemon: DaemonHandle) -> None:
    data = base64.b64encode(b"x" * 1000).decode()
    ok(daemon.call("upload", {"name": "l.bin", "folder": FOLDER, "data": data}))
    ok(daemon.call("load", {"name": "l.bin", "folder": FOLDER}))
    daemon.call("load", {"name": "gone.bin", "folder": FOLDER})
    deadline = time.monotonic() + 5
    while "load failed" not in daemon.log_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    text = daemon.log_text()
    assert f"upload {FOLDER}/l.bin: 1000 bytes in" in text
    assert f"load {FOLDER}/l.bin: 1000 bytes" in text
    assert text.count(f"load failed: not_found on {FOLDER}/gone.bin") == 1
    assert "uid 0 pid" in text
