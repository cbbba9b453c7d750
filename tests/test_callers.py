"""The caller's side of a call: hang-ups cancel, stalls end, progress is opt-in (real daemon, real stack)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from azaiond.client import Client
from tests.fixtures_daemon import DaemonHandle, recv_lines, request_line
from tests.support.devstack import DevStack
from tests.support.polling import wait_until

FOLDER = "callers-models"
Factory = Callable[..., DaemonHandle]

# An admin client that starts an upload from a pipe, feeds it, and is then killed (-9) by the test.
UPLOADER = r"""
import json, os, socket, sys, time
path, name, folder, mib = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r, w = os.pipe()
s = socket.socket(socket.AF_UNIX)
s.connect(path)
line = json.dumps({"jsonrpc": "2.0", "method": "upload", "params": {"name": name, "folder": folder}, "id": 1})
socket.send_fds(s, [line.encode() + b"\n"], [r])
os.close(r)
chunk = os.urandom(1 << 20)
for _ in range(mib):
    os.write(w, chunk)
print("written", flush=True)
time.sleep(120)
"""


@pytest.fixture
def start(clean_stack: DevStack, azaiond_factory: Factory) -> Callable[..., DaemonHandle]:
    clean_stack.ensure_bucket(FOLDER)

    def start(**overrides: Any) -> DaemonHandle:
        d = azaiond_factory(config_writer=clean_stack.write_config, overrides=overrides)
        admin = clean_stack.admin
        assert "result" in d.call("login", {"email": admin.email, "password": admin.password})
        return d

    return start


def upload_inline(d: DaemonHandle, name: str, data: bytes) -> None:
    reply = d.call("upload", {"name": name, "folder": FOLDER, "data": base64.b64encode(data).decode()}, timeout=60)
    assert "result" in reply, reply


def load_inline(d: DaemonHandle, name: str) -> bytes:
    reply = d.call("load", {"name": name, "folder": FOLDER}, timeout=60)
    assert "result" in reply, reply
    return base64.b64decode(reply["result"]["data"])


def test_upload_whose_caller_dies_commits_nothing(start: Callable[..., DaemonHandle], clean_stack: DevStack) -> None:
    d = start()
    old = os.urandom(2 * 1024 * 1024)
    upload_inline(d, "kept.bin", old)
    s3 = clean_stack.s3_admin_client()
    before = s3.head_object(Bucket=FOLDER, Key="kept.bin.big")
    child = subprocess.Popen([sys.executable, "-c", UPLOADER, str(d.socket_path), "kept.bin", FOLDER, "20"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "written"  # 20 MiB in: CDN parts are on their way
        child.kill()
    finally:
        child.wait(10)

    def settled() -> bool:
        uploads = s3.list_multipart_uploads(Bucket=FOLDER).get("Uploads", [])
        temps = [p for p in d.state_dir.rglob("*") if p.name.endswith(".tmp")]
        return not uploads and not temps

    assert wait_until(settled), "a multipart upload or a temp file was left behind"
    after = s3.head_object(Bucket=FOLDER, Key="kept.bin.big")
    assert (after["ETag"], after["ContentLength"]) == (before["ETag"], before["ContentLength"])
    assert load_inline(d, "kept.bin") == old  # small part and cache entry are the old ones
    # A fresh daemon (no cache) gets the old resource from the API and the CDN too.
    other = start()
    assert load_inline(other, "kept.bin") == old


def test_load_into_a_pipe_nobody_reads_ends_cancelled(start: Callable[..., DaemonHandle]) -> None:
    d = start(socket={"stall_timeout": 1})
    upload_inline(d, "stall.bin", os.urandom(4 * 1024 * 1024))
    r, w = os.pipe()
    try:
        began = time.monotonic()
        reply = d.call("load", {"name": "stall.bin", "folder": FOLDER}, fd=w, timeout=30)
        took = time.monotonic() - began
    finally:
        os.close(r)
        os.close(w)
    assert reply["error"]["data"]["kind"] == "cancelled", reply
    assert "1 s" in reply["error"]["message"]
    assert 0.9 < took < 10


def test_progress_is_opt_in(start: Callable[..., DaemonHandle], tmp_path: Path) -> None:
    d = start()
    data = os.urandom(24 * 1024 * 1024)
    upload_inline(d, "prog.bin", data[: 12 * 1024 * 1024])
    path = tmp_path / "in.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        up = d.call("upload", {"name": "prog.bin", "folder": FOLDER}, fd=fd, timeout=60)
    finally:
        os.close(fd)
    assert "result" in up, up

    def lines_of(params: dict[str, Any]) -> list[dict[str, Any]]:
        out = os.open(tmp_path / "out.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with d.connect(timeout=60) as s:
                socket.send_fds(s, [request_line("load", params, 9)], [out])
                s.shutdown(socket.SHUT_WR)  # a half-close is no hang-up: the call goes on
                return [json.loads(line) for line in recv_lines(s, 60)]
        finally:
            os.close(out)

    plain = lines_of({"name": "prog.bin", "folder": FOLDER})
    assert len(plain) == 1 and plain[0]["result"]["size"] == len(data)  # exactly one line, as before
    noisy = lines_of({"name": "prog.bin", "folder": FOLDER, "progress": True})
    *notes, reply = noisy
    assert reply["id"] == 9 and reply["result"]["size"] == len(data)
    assert notes, "no progress notification"
    for note in notes:
        assert set(note) == {"jsonrpc", "method", "params"} and note["method"] == "progress"
        assert note["params"]["id"] == 9 and set(note["params"]) == {"id", "done", "total"}
    dones = [n["params"]["done"] for n in notes]
    assert dones == sorted(dones) and 0 < dones[-1] <= len(data)
    bad = d.call("load", {"name": "prog.bin", "folder": FOLDER, "progress": 1})
    assert bad["error"]["code"] == -32602 and "progress" in bad["error"]["message"]


def test_client_progress_callback(start: Callable[..., DaemonHandle], tmp_path: Path) -> None:
    d = start()
    data = os.urandom(8 * 1024 * 1024)
    upload_inline(d, "cb.bin", data)
    seen: list[tuple[int, int | None]] = []
    out = os.open(tmp_path / "cb.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    began = time.monotonic()
    try:
        with Client(str(d.socket_path), timeout=60) as client:
            result = client.call("load", {"name": "cb.bin", "folder": FOLDER}, fd=out,
                                 progress=lambda done, total: seen.append((done, total)))
            assert client.call("health") == {"status": "healthy"}  # the stream is still in step
    finally:
        os.close(out)
    took = time.monotonic() - began
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert seen and all(total is None for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert len(seen) <= took / 0.25 + 2  # rate-limited: a few a second
