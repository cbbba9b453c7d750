"""The RPC client against a peer on a real Unix socket.

The peer is ``tests.support.fakedaemon.FakeDaemon``, which can be told to fail in every way
the client must handle (every kind, no reply, id-less errors, timeouts); the client against the
real daemon is covered by tests/test_daemon_methods.py and the CLI tests.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from azaiond.client import (
    Client,
    DaemonUnavailable,
    ProtocolError,
    RpcError,
    _unavailable,
    default_socket_path,
)
from azaiond.errors import ALL_ERRORS, AzaionError, NotAuthenticated, TooLarge, UpstreamError
from tests.support.fakedaemon import GOOD_PASSWORD, FakeDaemon, blob, fake_daemon


@pytest.fixture
def fake() -> Iterator[FakeDaemon]:
    with fake_daemon() as daemon:
        yield daemon


# --- tests ------------------------------------------------------------------------------------


def test_calls_reuse_one_connection_with_increasing_ids(fake: FakeDaemon) -> None:
    with Client(fake.path) as client:
        assert client.call("health") == {"status": "healthy"}
        assert client.call("status")["authenticated"] is True
        assert client.call("login", {"email": "a@example.com", "password": GOOD_PASSWORD}) == {
            "user": {"email": "a@example.com", "role": "Admin"}
        }
    assert fake.connections == 1
    assert [c["id"] for c in fake.calls] == [1, 2, 3]
    assert fake.calls[2]["params"] == {"email": "a@example.com", "password": GOOD_PASSWORD}


def test_socket_path_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZAIOND_SOCKET", raising=False)
    assert default_socket_path() == "/run/azaiond/azaiond.sock"
    monkeypatch.setenv("AZAIOND_SOCKET", "/tmp/elsewhere.sock")
    assert Client().socket_path == "/tmp/elsewhere.sock"
    assert Client("/x.sock").socket_path == "/x.sock"


def test_load_writes_into_the_passed_descriptor(fake: FakeDaemon) -> None:
    with tempfile.TemporaryFile() as out, Client(fake.path) as client:
        result = client.call("load", {"name": "blob-100000", "folder": "models"}, fd=out.fileno())
        out.seek(0)
        assert out.read() == blob(100000)
    assert result == {"size": 100000, "sha256": hashlib.sha256(blob(100000)).hexdigest()}
    assert fake.calls[0]["fd_mode"] == os.O_RDWR


def test_upload_reads_from_the_passed_descriptor(fake: FakeDaemon, tmp_path: Any) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(blob(50000))
    fd = os.open(source, os.O_RDONLY)
    try:
        with Client(fake.path) as client:
            result = client.call("upload", {"name": "m", "folder": "f"}, fd=fd)
            # The descriptor travels with its own request only.
            client.call("health")
    finally:
        os.close(fd)
    assert result["size"] == 50000
    assert fake.uploads["f/m"] == blob(50000)
    assert fake.calls[0]["fd_mode"] == os.O_RDONLY
    assert fake.calls[1]["fd_mode"] is None


def test_inline_result_without_descriptor(fake: FakeDaemon) -> None:
    with Client(fake.path) as client:
        result = client.call("load", {"name": "blob-10", "folder": "f"})
        assert base64.b64decode(result["data"]) == blob(10)
        with pytest.raises(TooLarge):
            client.call("load", {"name": "blob-100000", "folder": "f"})


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.kind)
def test_error_kinds_map_to_error_classes(fake: FakeDaemon, cls: type[AzaionError]) -> None:
    with Client(fake.path) as client:
        with pytest.raises(RpcError) as caught:
            client.call("load", {"name": f"err-{cls.kind}", "folder": "f"})
        exc = caught.value
        assert isinstance(exc, cls)
        assert exc.kind == cls.kind
        assert exc.code == cls.code
        assert exc.error_class is cls
        assert exc.message == f"failing on purpose with {cls.kind}"
        # An error reply leaves the connection usable.
        assert client.call("health") == {"status": "healthy"}
    assert fake.connections == 1


def test_subclass_kinds_are_caught_by_their_parents(fake: FakeDaemon) -> None:
    with Client(fake.path) as client, pytest.raises(UpstreamError) as caught:
        client.call("load", {"name": "err-hardware_mismatch", "folder": "f"})
    assert caught.value.kind == "hardware_mismatch"


def test_login_refused_is_not_authenticated(fake: FakeDaemon) -> None:
    with Client(fake.path) as client, pytest.raises(NotAuthenticated) as caught:
        client.call("login", {"email": "a@example.com", "password": "wrong"})
    assert "wrong" not in str(caught.value)


def test_standard_error_without_kind(fake: FakeDaemon) -> None:
    with Client(fake.path) as client, pytest.raises(RpcError) as caught:
        client.call("no_such_method")
    assert caught.value.code == -32601
    assert caught.value.kind == "method_not_found"
    assert caught.value.error_class is None


def test_id_less_error_closes_and_next_call_reconnects(fake: FakeDaemon) -> None:
    with Client(fake.path) as client:
        with pytest.raises(TooLarge):
            client.call("too_large")
        assert client.call("health") == {"status": "healthy"}
    assert fake.connections == 2


def test_notifications_are_skipped(fake: FakeDaemon) -> None:
    with Client(fake.path) as client:
        assert client.call("notify_first") == {}


def test_connection_closed_without_reply(fake: FakeDaemon) -> None:
    with Client(fake.path) as client:
        with pytest.raises(ProtocolError, match="closed the connection"):
            client.call("crash")
        assert client.call("health") == {"status": "healthy"}


def test_timeout_then_recovers(fake: FakeDaemon) -> None:
    with Client(fake.path, timeout=0.3) as client:
        with pytest.raises(ProtocolError, match="no reply"):
            client.call("sleep", {"seconds": 1})
        # A fresh connection, so the late reply to the abandoned request is never mistaken for this one.
        assert client.call("health") == {"status": "healthy"}
    assert fake.connections == 2


def test_missing_socket() -> None:
    with pytest.raises(DaemonUnavailable) as caught, Client("/nonexistent/azaiond.sock") as client:
        client.call("health")
    assert caught.value.reason == "missing"
    assert "systemctl start azaiond.socket" in caught.value.hint


def test_stale_socket_refuses() -> None:
    directory = tempfile.mkdtemp(prefix="azc-")
    path = os.path.join(directory, "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves behind
    try:
        with pytest.raises(DaemonUnavailable) as caught, Client(path) as client:
            client.call("health")
        assert caught.value.reason == "refused"
        assert "stale" in caught.value.message
    finally:
        shutil.rmtree(directory)


def test_permission_error_mapping() -> None:
    # The real EACCES path runs as nobody in tests/test_cli.py; root cannot provoke it in-process.
    exc = _unavailable("/run/azaiond/azaiond.sock", PermissionError(errno.EACCES, "Permission denied"))
    assert exc.reason == "permission"
    assert "sudo usermod -aG azaion $USER" in exc.hint


def test_wait_until_listening(tmp_path: Path) -> None:
    from azaiond.client import wait_until_listening

    path = str(tmp_path / "w.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        wait_until_listening(path, timeout=5)  # returns: something accepts
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(DaemonUnavailable, match="exited with status 3"):
        wait_until_listening(str(tmp_path / "never.sock"), timeout=5, proc=dead)
    with pytest.raises(DaemonUnavailable) as err:
        wait_until_listening(str(tmp_path / "never.sock"), timeout=0.2)
    assert err.value.reason == "missing"
