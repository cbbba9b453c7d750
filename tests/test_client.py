"""The RPC client against a peer on a real Unix socket.

``FakeDaemon`` is a small JSON-RPC server speaking the wire format of docs/protocol.md (one JSON line per
message, SCM_RIGHTS descriptors): enough to test the client and the CLI on the real wire
without the daemon's services. tests/test_cli.py reuses it.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
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
from azaiond.errors import ALL_ERRORS, ERROR_BY_KIND, AzaionError, NotAuthenticated, TooLarge, UpstreamError

GOOD_PASSWORD = "correct horse battery"


def blob(size: int) -> bytes:
    """Deterministic, non-repeating-looking test content."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


class Fail(Exception):
    def __init__(self, code: int, message: str, kind: str | None) -> None:
        super().__init__(message)
        self.code, self.message, self.kind = code, message, kind


def fail(kind: str, message: str) -> Fail:
    return Fail(ERROR_BY_KIND[kind].code, message, kind)


class FakeDaemon:
    """A threaded Unix-socket JSON-RPC peer. Load names pick behaviour:
    ``blob-N`` writes N bytes, ``err-KIND`` fails with KIND, ``partial`` writes then fails,
    ``slow-N`` writes N bytes slowly."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls: list[dict[str, Any]] = []  # {"method", "params", "id", "fd_mode"}
        self.connections = 0
        self.uploads: dict[str, bytes] = {}
        self.objects: dict[tuple[str, str], bytes] = {}
        self.unlock_script: list[dict[str, Any]] = [{"state": "ready", "error": None, "progress": None}]
        self._unlock_step = 0
        self.unlock_restarts_script = True  # False: a second unlock continues the script
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def methods(self) -> list[str]:
        return [c["method"] for c in self.calls]

    # --- the wire ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        fds: list[int] = []
        conn.settimeout(0.1)
        with conn:
            while not self._stop.is_set():
                try:
                    data, new_fds, _flags, _addr = socket.recv_fds(conn, 65536, 4)
                except TimeoutError:
                    continue
                except OSError:
                    break
                fds += new_fds
                if not data:
                    break
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    fd = fds.pop(0) if fds else None
                    try:
                        if not self._handle(conn, line, fd):
                            return
                    finally:
                        if fd is not None:
                            os.close(fd)
        for fd in fds:
            os.close(fd)

    def _send(self, conn: socket.socket, message: dict[str, Any]) -> None:
        # The client may have given up on this reply (timeout tests); that is not the fake's error.
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(message).encode() + b"\n")

    def _handle(self, conn: socket.socket, line: bytes, fd: int | None) -> bool:
        request = json.loads(line)
        method, params, rid = request["method"], request.get("params", {}), request["id"]
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE if fd is not None else None
        self.calls.append({"method": method, "params": params, "id": rid, "fd_mode": mode})
        if method == "too_large":
            self._send(conn, {"jsonrpc": "2.0", "id": None, "error": _error(fail("too_large", "too long"))})
            return False
        if method == "crash":
            return False
        if method == "notify_first":
            self._send(conn, {"jsonrpc": "2.0", "method": "note", "params": {}})
        if method == "sleep":
            time.sleep(float(params["seconds"]))
        handler = getattr(self, "m_" + method, None)
        try:
            if handler is None and method not in ("notify_first", "sleep"):
                raise Fail(-32601, "Method not found", None)
            result = handler(params, fd) if handler is not None else {}
        except Fail as exc:
            self._send(conn, {"jsonrpc": "2.0", "id": rid, "error": _error(exc)})
        else:
            self._send(conn, {"jsonrpc": "2.0", "id": rid, "result": result})
        return True

    # --- methods ----------------------------------------------------------------------------

    def m_health(self, params: dict[str, Any], fd: int | None) -> dict[str, Any]:
        return {"status": "healthy"}

    def m_status(self, params: dict[str, Any], fd: int | None) -> dict[str, Any]:
        return {
            "authenticated": True,
            "user": {"email": "a@example.com", "role": "Admin"},
            "cache_dir": "/var/lib/azaiond/cache",
            "version": "0.1.0",
            "unlock": {"state": "idle", "error": None, "progress": None},
        }

    def m_login(self, params: dict[str, Any], fd: int | None) -> dict[str, Any]:
        if params.get("password") != GOOD_PASSWORD:
            raise fail("not_authenticated", "the Resource API refused the login")
        return {"user": {"email": params["email"], "role": "Admin"}}

    def m_logout(self, params: dict[str, Any], fd: int | None) -> dict[str, Any]:
        return {}

    def _write_out(self, content: bytes, fd: int | None, slow: bool = False) -> dict[str, Any]:
        digest = hashlib.sha256(content).hexdigest()
        if fd is None:
            if len(content) > 4096:
                raise fail("too_large", "the payload is over the inline limit: pass a descriptor")
            return {"size": len(content), "sha256": digest, "data": base64.b64encode(content).decode()}
        view = memoryview(content)
        step = max(1, len(content) // 8) if slow else 1 << 20
        while view:
            written = os.write(fd, view[:step])
            view = view[written:]
            if slow:
                time.sleep(0.15)
        return {"size": len(content), "sha256": digest}

    def m_load(self, params: dict[str, Any], fd: int | None) -> dict[str, Any]:
        name: str = params["name"]
        if name.startswith("err-"):
            raise fail(name[4:], f"failing on purpose with {name[4:]}")
        if name == "partial":
            assert fd is not None
            os.write(fd, b"x" * 1000)
            raise fail("integrity", "decryption failed")
        if name.startswith("slow-"):
            return self._write_out(blob(int(name[5:])), fd, slow=True)
        if name.startswith("blob-"):
            return self._write_out(blob(int(name[5:])), fd)
        raise fail("not_found", f"no resource {name}")

    def _read_in(self, fd: int | None, slow: bool) -> bytes:
        assert fd is not None
        chunks = []
        while chunk := os.read(fd, 4096 if slow else 1 << 20):
            chunks.append(chunk)
            if slow:
                time.sleep(0.05)
        return b"".join(chunks)

    def m_upload(self, params: dict[str, Any], fd: int | None) -> dict[str, Any]:
        data = self._read_in(fd, params["name"].startswith("slow"))
        self.uploads[f"{params['folder']}/{params['name']}"] = data
        small = min(3072, len(data) * 3 // 10)
        return {"size": len(data), "small_size": small, "big_size": len(data) - small}

    def m_cdn_upload(self, params: dict[str, Any], fd: int | None) -> dict[str, Any]:
        data = self._read_in(fd, False)
        self.objects[(params["bucket"], params["key"])] = data
        return {"size": len(data)}

    def m_cdn_download(self, params: dict[str, Any], fd: int | None) -> dict[str, Any]:
        key = (params["bucket"], params["key"])
        if key not in self.objects:
            raise fail("not_found", "no such object")
        return self._write_out(self.objects[key], fd)

    def m_unlock(self, params: dict[str, Any], fd: int | None) -> dict[str, Any]:
        if params.get("email") is not None and params.get("password") != GOOD_PASSWORD:
            raise fail("not_authenticated", "the Resource API refused the login")
        if self.unlock_restarts_script or "unlock" not in self.methods()[:-1]:
            self._unlock_step = 0
        return {"state": self.unlock_script[self._unlock_step]["state"]}

    def m_unlock_status(self, params: dict[str, Any], fd: int | None) -> dict[str, Any]:
        self._unlock_step = min(self._unlock_step + 1, len(self.unlock_script) - 1)
        return self.unlock_script[self._unlock_step]


def _error(exc: Fail) -> dict[str, Any]:
    error: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.kind is not None:
        error["data"] = {"kind": exc.kind}
    return error


@contextlib.contextmanager
def fake_daemon() -> Iterator[FakeDaemon]:
    # A short directory of its own: pytest's tmp_path can exceed the 108-byte socket path limit.
    directory = tempfile.mkdtemp(prefix="azc-")
    daemon = FakeDaemon(os.path.join(directory, "azaiond.sock"))
    try:
        yield daemon
    finally:
        daemon.close()
        shutil.rmtree(directory, ignore_errors=True)


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
