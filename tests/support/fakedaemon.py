"""A stand-in daemon for what the real one cannot be made to do on demand.

``FakeDaemon`` speaks the wire format of docs/protocol.md on a real Unix socket (one JSON line
per message, SCM_RIGHTS descriptors) and answers from a script: every error kind, replies that
never come, id-less errors, connections closed without a reply, unlock runs that end in a chosen
state or get lost. The client and CLI tests use it only for those cases; everything a real daemon
can do is tested against a real daemon.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from azaiond.errors import ERROR_BY_KIND

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
