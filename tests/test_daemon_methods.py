"""The methods of docs/protocol.md through a real daemon process, a real Resource API and real S3."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_daemon import DaemonHandle, recv_line, request_line
from tests.support.devstack import DevStack
from tests.support.replies import err, ok

FOLDER = "daemon-models"
Factory = Callable[..., DaemonHandle]


@pytest.fixture
def start(clean_stack: DevStack, azaiond_factory: Factory) -> Callable[..., DaemonHandle]:
    clean_stack.ensure_bucket(FOLDER)

    def start(login: bool = True, **overrides: Any) -> DaemonHandle:
        d = azaiond_factory(config_writer=clean_stack.write_config, overrides=overrides)
        if login:
            ok(d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password}))
        return d

    return start


@pytest.fixture
def logged_in(start: Callable[..., DaemonHandle]) -> DaemonHandle:
    """A fresh daemon on the dev stack, logged in as its admin (each test may stop or kill it)."""
    return start()


def write_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def upload_fd(d: DaemonHandle, path: Path, name: str) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return d.call("upload", {"name": name, "folder": FOLDER}, fd=fd, timeout=120)
    finally:
        os.close(fd)


def load_fd(d: DaemonHandle, path: Path, name: str, flags: int = os.O_WRONLY) -> dict[str, Any]:
    fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return d.call("load", {"name": name, "folder": FOLDER}, fd=fd, timeout=120)
    finally:
        os.close(fd)


def test_login_status_logout(start: Callable[..., DaemonHandle], clean_stack: DevStack) -> None:
    d = start(login=False)
    status = ok(d.call("status"))
    assert status["authenticated"] is False and status["user"] is None
    assert status["version"] and status["cache_dir"].endswith("cache")
    assert status["unlock"]["state"] in ("idle", "ready", "error")
    refused = d.call("login", {"email": clean_stack.admin.email, "password": "Xq9-not-it"})
    message = err(refused, -32001, "not_authenticated")
    assert "Xq9-not-it" not in message
    user = ok(d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password}))
    assert user == {"user": {"email": clean_stack.admin.email, "role": "Admin"}}
    status = ok(d.call("status"))
    assert status["authenticated"] is True and status["user"] == user["user"]
    assert ok(d.call("logout")) == {}
    assert ok(d.call("status"))["authenticated"] is False
    assert not (d.state_dir / "token.json").exists()


def test_upload_and_load_through_descriptors(logged_in: DaemonHandle, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    src = write_file(tmp_path / "in.bin", data)
    up = ok(upload_fd(logged_in, src, "fd.bin"))
    assert up["size"] == len(data) and up["small_size"] == 3072
    out = tmp_path / "out.bin"
    got = ok(load_fd(logged_in, out, "fd.bin"))
    assert got == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "format": 1}
    assert out.read_bytes() == data


def test_inline_upload_and_load(logged_in: DaemonHandle) -> None:
    data = os.urandom(40_000)
    up = ok(logged_in.call("upload", {"name": "inline.bin", "folder": FOLDER, "data": base64.b64encode(data).decode()}))
    assert up["size"] == len(data)
    got = ok(logged_in.call("load", {"name": "inline.bin", "folder": FOLDER}))
    assert base64.b64decode(got["data"]) == data
    assert got["sha256"] == hashlib.sha256(data).hexdigest() and got["size"] == len(data)


def test_inline_limit(start: Callable[..., DaemonHandle], tmp_path: Path) -> None:
    d = start(resources={"inline_limit_mb": 1})
    data = os.urandom(1024 * 1024 + 1)
    ok(upload_fd(d, write_file(tmp_path / "big.bin", data), "big.bin"))
    message = err(d.call("load", {"name": "big.bin", "folder": FOLDER}), -32008, "too_large")
    assert "descriptor" in message
    ok(load_fd(d, tmp_path / "o.bin", "big.bin"))  # a descriptor has no limit
    payload = base64.b64encode(data).decode()
    err(d.call("upload", {"name": "big2.bin", "folder": FOLDER, "data": payload}), -32008, "too_large")
    err(d.call("cdn_upload", {"bucket": FOLDER, "key": "big3.bin", "data": payload}), -32008, "too_large")


def test_descriptor_opened_the_wrong_way(logged_in: DaemonHandle, tmp_path: Path) -> None:
    ok(logged_in.call("upload", {"name": "ro.bin", "folder": FOLDER, "data": base64.b64encode(b"abc").decode()}))
    target = write_file(tmp_path / "ro.out", b"")
    message = err(load_fd(logged_in, target, "ro.bin", flags=os.O_RDONLY), -32602, "invalid_params")
    assert "not open for writing" in message
    assert target.read_bytes() == b""
    fd = os.open(tmp_path / "wo.in", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        reply = logged_in.call("upload", {"name": "wo.bin", "folder": FOLDER}, fd=fd)
    finally:
        os.close(fd)
    assert "not open for reading" in err(reply, -32602, "invalid_params")
    both = logged_in.call("upload", {"name": "x.bin", "folder": FOLDER, "data": "YQ=="}, fd=0)
    assert "not both" in err(both, -32602, "invalid_params")
    bad64 = logged_in.call("upload", {"name": "x.bin", "folder": FOLDER, "data": "%%%"})
    assert "base64" in err(bad64, -32602, "invalid_params")


def test_cdn_transfer_both_ways(logged_in: DaemonHandle, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = write_file(tmp_path / "c.in", data)
    fd = os.open(src, os.O_RDONLY)
    try:
        assert ok(logged_in.call("cdn_upload", {"bucket": FOLDER, "key": "plain.bin"}, fd=fd)) == {"size": len(data)}
    finally:
        os.close(fd)
    out = tmp_path / "c.out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        got = ok(logged_in.call("cdn_download", {"bucket": FOLDER, "key": "plain.bin"}, fd=fd))
    finally:
        os.close(fd)
    assert got == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert out.read_bytes() == data
    inline = ok(logged_in.call("cdn_download", {"bucket": FOLDER, "key": "plain.bin"}))
    assert base64.b64decode(inline["data"]) == data
    err(logged_in.call("cdn_download", {"bucket": FOLDER, "key": "absent.bin"}), -32003, "not_found")
    err(logged_in.call("cdn_download", {"bucket": "Bad_Bucket", "key": "k"}), -32009, "invalid_name")


def test_errors_by_kind(start: Callable[..., DaemonHandle], clean_stack: DevStack) -> None:
    d = start(login=False, api={"retries": 1})
    # Names are checked before authentication (names -> authentication -> work).
    err(d.call("load", {"name": "../etc/passwd", "folder": FOLDER}), -32009, "invalid_name")
    err(d.call("load", {"name": "a.bin", "folder": "a/b"}), -32009, "invalid_name")
    err(d.call("load", {"name": "a.bin", "folder": FOLDER}), -32001, "not_authenticated")
    err(d.call("cdn_download", {"bucket": FOLDER, "key": "a.bin"}), -32001, "not_authenticated")
    ok(d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password}))
    err(d.call("load", {"name": "missing.bin", "folder": FOLDER}), -32003, "not_found")
    clean_stack.refserver.fail_next(5, "/resources/get")
    message = err(d.call("load", {"name": "missing.bin", "folder": FOLDER}), -32004, "upstream")
    assert "2 attempts" in message
    err(d.call("load", {"name": 5, "folder": FOLDER}), -32602, "invalid_params")


def test_hardware_mismatch(start: Callable[..., DaemonHandle], clean_stack: DevStack) -> None:
    user = clean_stack.user
    first = start(login=False)
    ok(first.call("login", {"email": user.email, "password": user.password}))
    err(first.call("load", {"name": "none.bin", "folder": FOLDER}), -32003, "not_found")  # binds the hardware
    other = start(login=False, hardware="a different machine")
    ok(other.call("login", {"email": user.email, "password": user.password}))
    err(other.call("load", {"name": "none.bin", "folder": FOLDER}), -32010, "hardware_mismatch")
    # a plain User may load but not upload: the API refuses the role
    reply = other.call("upload", {"name": "u.bin", "folder": FOLDER, "data": "YQ=="})
    assert reply["error"]["data"]["kind"] in ("forbidden", "hardware_mismatch")


@pytest.fixture
def big_resource(logged_in: DaemonHandle, tmp_path: Path) -> Iterator[bytes]:
    data = os.urandom(64 * 1024 * 1024)
    ok(upload_fd(logged_in, write_file(tmp_path / "big64.bin", data), "big64.bin"))
    yield data


def _start_load_into_pipe(logged_in: DaemonHandle, name: str) -> tuple[Any, int]:
    """Send a load whose output is a pipe nobody reads yet; returns (connection, read end)."""
    r, w = os.pipe()
    conn = logged_in.connect(timeout=120)
    import socket as socket_mod

    socket_mod.send_fds(conn, [request_line("load", {"name": name, "folder": FOLDER}, 7)], [w])
    os.close(w)
    first = os.read(r, 65536)  # the daemon is writing: the load is in flight
    assert first
    return conn, r


def _drain(r: int) -> int:
    total = 0
    while chunk := os.read(r, 1024 * 1024):
        total += len(chunk)
    os.close(r)
    return total


def test_stuck_load_does_not_delay_health_or_status(logged_in: DaemonHandle, big_resource: bytes) -> None:
    conn, r = _start_load_into_pipe(logged_in, "big64.bin")
    try:
        # The load's thread is blocked on a full pipe; open methods still answer.
        assert ok(logged_in.call("health", timeout=5)) == {"status": "healthy"}
        assert ok(logged_in.call("status", timeout=5))["authenticated"] is True
        assert ok(logged_in.call("unlock_status", timeout=5))["state"] in ("idle", "ready", "error")
    finally:
        total = _drain(r) + 65536
        reply = json.loads(recv_line(conn, 120))
        conn.close()
    assert ok(reply)["sha256"] == hashlib.sha256(big_resource).hexdigest()
    assert total >= len(big_resource)


def test_sigterm_during_a_64mib_load(logged_in: DaemonHandle, big_resource: bytes) -> None:
    conn, r = _start_load_into_pipe(logged_in, "big64.bin")
    logged_in.proc.send_signal(signal.SIGTERM)
    received = _drain(r)
    line = recv_line(conn, 60)
    conn.close()
    assert logged_in.proc.wait(60) == 0
    # The caller always gets an answer: the whole load, or a precise cancellation.
    assert line, "the daemon stopped without answering the load in flight"
    reply = json.loads(line)
    if "error" in reply:
        assert reply["error"]["data"]["kind"] == "cancelled", reply
        assert received < len(big_resource)
    else:
        assert reply["result"]["size"] == len(big_resource), reply
        assert received > 0
    leftovers = [p for p in logged_in.state_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert not logged_in.socket_path.exists()
    assert "Traceback" not in logged_in.log_text()


def test_64_concurrent_clients(logged_in: DaemonHandle) -> None:
    data = os.urandom(200_000)
    ok(logged_in.call("upload", {"name": "many.bin", "folder": FOLDER, "data": base64.b64encode(data).decode()}))
    digest = hashlib.sha256(data).hexdigest()
    failures: list[str] = []
    barrier = threading.Barrier(64)

    def client(i: int) -> None:
        try:
            barrier.wait(30)
            for j in range(6):
                method = ("health", "status", "load")[(i + j) % 3]
                params = {"name": "many.bin", "folder": FOLDER} if method == "load" else None
                reply = logged_in.call(method, params, timeout=60)
                if "error" in reply:
                    failures.append(f"{method}: {reply['error']}")
                elif method == "load" and reply["result"]["sha256"] != digest:
                    failures.append("load: wrong digest")
        except Exception as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []


def test_logs_hold_no_secret(start: Callable[..., DaemonHandle], clean_stack: DevStack, tmp_path: Path) -> None:
    d = start(login=False, log_level="debug")
    admin = clean_stack.admin
    err(d.call("login", {"email": admin.email, "password": "Wr0ng-Secret-Pass"}), -32001, "not_authenticated")
    ok(d.call("login", {"email": admin.email, "password": admin.password}))
    ok(d.call("upload", {"name": "s.bin", "folder": FOLDER, "data": base64.b64encode(b"secret data").decode()}))
    ok(d.call("load", {"name": "s.bin", "folder": FOLDER}))
    clean_stack.refserver.expire_tokens()
    ok(d.call("load", {"name": "s.bin", "folder": FOLDER}))  # a re-login under the hood
    clean_stack.refserver.fail_next(1, "/resources/get")
    ok(d.call("load", {"name": "s.bin", "folder": FOLDER}))
    token = json.loads((d.state_dir / "token.json").read_text())["token"]
    d.stop()
    log = d.log_text()
    assert "logged in as" in log  # the log is there and says things
    for secret in (admin.password, "Wr0ng-Secret-Pass", token, token.split(".")[2], clean_stack.resource_key):
        assert secret not in log
    for key in (clean_stack.read_keys.secret_key, clean_stack.write_keys.secret_key):
        assert key not in log


def _wait_status(d: DaemonHandle, authenticated: bool) -> dict[str, Any]:
    """Poll status until ``authenticated`` has the wanted value (or 20 s pass)."""
    import time

    deadline = time.monotonic() + 20
    status = ok(d.call("status"))
    while status["authenticated"] is not authenticated and time.monotonic() < deadline:
        time.sleep(0.05)
        status = ok(d.call("status"))
    return status


def test_login_credential_is_used_at_start(
    clean_stack: DevStack, azaiond_factory: Factory, tmp_path: Path
) -> None:
    clean_stack.ensure_bucket(FOLDER)
    creds = clean_stack.write_credentials(tmp_path / "creds")
    d = azaiond_factory(config_writer=clean_stack.write_config, env={"CREDENTIALS_DIRECTORY": str(creds)})
    status = _wait_status(d, True)
    assert status["user"] == {"email": clean_stack.admin.email, "role": "Admin"}
    data = base64.b64encode(b"via the credential").decode()
    ok(d.call("upload", {"name": "cred.bin", "folder": FOLDER, "data": data}))
    assert base64.b64decode(ok(d.call("load", {"name": "cred.bin", "folder": FOLDER}))["data"]) == b"via the credential"


def test_refused_login_credential_leaves_status_false(
    clean_stack: DevStack, azaiond_factory: Factory, tmp_path: Path
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    (creds / "login").write_text(f"email: {clean_stack.admin.email}\npassword: Zz-not-the-password\n")
    logins = clean_stack.refserver.calls("/login")
    d = azaiond_factory(config_writer=clean_stack.write_config, env={"CREDENTIALS_DIRECTORY": str(creds)})
    # The start-up login is tried once and refused; status says so, and the log names no secret.
    import time

    deadline = time.monotonic() + 20
    while "login with the 'login' credential failed" not in d.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "login with the 'login' credential failed" in d.log_text()
    assert ok(d.call("status"))["authenticated"] is False
    assert clean_stack.refserver.calls("/login") == logins + 1  # tried once; a 401 is not retried
    assert "Zz-not-the-password" not in d.log_text()
