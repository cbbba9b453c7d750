"""The JSON-RPC client for azaiond's Unix socket (docs/protocol.md).

One request is one line of JSON; a request may carry one file descriptor (SCM_RIGHTS), sent
with the first bytes of that request, and a reply may carry descriptors back the same way
(``load`` with ``memfd``: a sealed memory file holding the plaintext). The client keeps its
connection for many calls (polling ``unlock_status`` should not reconnect every half second)
and reconnects lazily after the daemon closed it.

This module talks only the wire protocol: it must not import the daemon side (``azaiond.rpc``,
services). It imports ``azaiond.errors`` so a daemon's error reply can be caught as the same
class the daemon raised, e.g. ``except NotAuthenticated``.
"""

from __future__ import annotations

import array
import base64
import contextlib
import errno
import json
import mmap
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Required, Self, TypedDict, cast

from azaiond.errors import ALL_ERRORS, AzaionError, InvalidParams

DEFAULT_SOCKET = "/run/azaiond/azaiond.sock"
SOCKET_ENV = "AZAIOND_SOCKET"

# A reply may carry inline data (base64 of up to inline_limit_mb, 16 MiB by default); far more
# than that means a confused peer, and reading on would only eat memory.
MAX_REPLY_BYTES = 256 * 1024 * 1024

_FD_SIZE = array.array("i").itemsize
_ANC_SIZE = socket.CMSG_SPACE(16 * _FD_SIZE)  # a reply carries one descriptor today; room for more

# Kind strings for the standard JSON-RPC codes, used when a reply carries no data.kind.
STANDARD_KINDS: dict[int, str] = {
    -32700: "parse_error",
    -32600: "invalid_request",
    -32601: "method_not_found",
    -32602: InvalidParams.kind,
    -32603: "internal",
}


# Called with (done, total) for each progress notification of a call; total None when unknown.
ProgressCallback = Callable[[int, "int | None"], None]


def _report(params: Any, request_id: int, progress: ProgressCallback) -> None:
    """Hand a progress notification to the caller's callback, if it is well-formed and ours."""
    if not isinstance(params, dict) or params.get("id") != request_id:
        return
    done, total = params.get("done"), params.get("total")
    if type(done) is not int or not (total is None or type(total) is int):
        return
    progress(done, total)


def default_socket_path() -> str:
    """The socket path: ``$AZAIOND_SOCKET`` if set, else the packaged default."""
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class ClientError(Exception):
    """Base of every error this module raises."""


class DaemonUnavailable(ClientError):
    """The socket could not be reached. ``reason`` tells why; ``hint`` what a person can do.

    reason: ``missing`` (no socket file), ``permission`` (not in the socket's group),
    ``refused`` (a socket file nobody listens on), ``other``.
    """

    def __init__(self, path: str, reason: str, message: str, hint: str) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason
        self.message = message
        self.hint = hint


class ProtocolError(ClientError):
    """The daemon broke off the conversation or answered something that is not a JSON-RPC reply."""


class RpcError(ClientError):
    """An error reply. ``kind`` is the stable string (``data.kind``, or one derived from the code).

    Replies whose kind is one of ``azaiond.errors`` are raised as a subclass of both this class and
    that error class, so ``except NotAuthenticated`` and ``except RpcError`` both catch them.
    """

    def __init__(self, code: int, message: str, kind: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # An instance attribute: it shadows AzaionError.kind in the per-kind subclasses, with the
        # same value, so both views agree.
        self.kind = kind
        self.data = data

    @property
    def error_class(self) -> type[AzaionError] | None:
        """The ``azaiond.errors`` class of this reply's kind, if it has one."""
        for cls in type(self).__mro__:
            if cls in ALL_ERRORS:
                return cls
        return None

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def _remote_class(cls: type[AzaionError]) -> type[RpcError]:
    # RpcError first in the bases: its __init__ takes the reply's fields and hands the message on
    # to the AzaionError branch through super().
    return cast("type[RpcError]", type(f"Remote{cls.__name__}", (RpcError, cls), {"__module__": __name__}))


REMOTE_ERRORS: dict[str, type[RpcError]] = {cls.kind: _remote_class(cls) for cls in ALL_ERRORS}


def error_from_reply(error: Any) -> RpcError:
    """Build the exception for a reply's ``error`` member."""
    if not isinstance(error, dict):
        raise ProtocolError("the daemon sent a malformed error reply")
    code = error.get("code")
    if not isinstance(code, int):
        code = -32603
    message = error.get("message")
    if not isinstance(message, str):
        message = "unknown error"
    data = error.get("data")
    kind = data.get("kind") if isinstance(data, dict) else None
    if not isinstance(kind, str):
        kind = STANDARD_KINDS.get(code, "internal")
    return REMOTE_ERRORS.get(kind, RpcError)(code, message, kind, data)


def wait_until_listening(path: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until a daemon just started as ``proc`` accepts connections on ``path``.

    Raises DaemonUnavailable if ``proc`` exits first or nothing listens within ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise DaemonUnavailable(
                path, "other", f"azaiond exited with status {proc.returncode} before listening", "see its log"
            )
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise _unavailable(path, exc) from exc
            time.sleep(0.05)

def _unavailable(path: str, exc: OSError) -> DaemonUnavailable:
    if isinstance(exc, FileNotFoundError) or exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return DaemonUnavailable(
            path,
            "missing",
            f"no daemon socket at {path}",
            "is azaiond.socket running? systemctl start azaiond.socket",
        )
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return DaemonUnavailable(
            path,
            "permission",
            f"permission denied on {path}",
            "you are not in group azaion: sudo usermod -aG azaion $USER, then log in again",
        )
    if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
        return DaemonUnavailable(
            path,
            "refused",
            f"nothing listens on {path} (stale socket)",
            "the daemon is not running: systemctl restart azaiond.socket",
        )
    return DaemonUnavailable(
        path,
        "other",
        f"cannot connect to {path}: {exc.strerror or exc}",
        "check the daemon: systemctl status azaiond.socket azaiond.service",
    )


class Client:
    """A connection to azaiond. Use as a context manager, or call ``close()``.

    ``timeout`` (seconds) bounds connecting and each wait for a reply; None waits for ever,
    which suits ``load`` of a large resource.
    """

    def __init__(self, socket_path: str | None = None, timeout: float | None = None) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._next_id = 1
        self._fds: list[int] = []  # descriptors received with the reply being read

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self) -> None:
        """Connect now (calls connect on demand); raises DaemonUnavailable."""
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise _unavailable(self.socket_path, exc) from exc
        self._sock = sock
        self._buffer.clear()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()
        self._drop_fds()

    def _drop_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        fd: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Send one request (with ``fd`` passed along, if given) and return its ``result``.

        With ``progress``, the request asks the daemon for progress notifications, and
        ``progress(done, total)`` is called for each one that arrives before the reply (total
        None while unknown). Long methods report bytes moved; others may report nothing.

        Raises RpcError for an error reply, DaemonUnavailable when the socket cannot be reached,
        ProtocolError when the connection breaks or the reply is malformed. Descriptors the
        reply carries are closed: use ``call_with_fds`` for methods that pass some back.
        """
        try:
            return self._call(method, params, fd, progress)
        finally:
            self._drop_fds()

    def call_with_fds(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        fd: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> tuple[dict[str, Any], list[int]]:
        """Like ``call``, and also return the descriptors the reply carried (the caller owns
        and must close them; they are close-on-exec)."""
        try:
            result = self._call(method, params, fd, progress)
        except BaseException:
            self._drop_fds()
            raise
        fds, self._fds = self._fds, []
        return result, fds

    def _call(
        self, method: str, params: dict[str, Any] | None, fd: int | None, progress: ProgressCallback | None
    ) -> dict[str, Any]:
        self._drop_fds()
        self.connect()
        request_id = self._next_id
        self._next_id += 1
        request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": request_id}
        if progress is not None:
            params = {**(params or {}), "progress": True}
        if params is not None:
            request["params"] = params
        line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
        try:
            self._send(line, fd)
            reply = self._read_reply(request_id, progress)
        except BaseException:
            # A half-sent request or a half-read reply leaves the stream out of step; start over
            # on the next call rather than read a stale answer.
            self.close()
            raise
        if "error" in reply:
            error = error_from_reply(reply["error"])
            if reply.get("id") is None:
                # The daemon closes the connection after an id-less error (too_large).
                self.close()
            raise error
        result = reply.get("result")
        if not isinstance(result, dict):
            self.close()
            raise ProtocolError("the daemon's reply has no result object")
        return result

    def _send(self, data: bytes, fd: int | None) -> None:
        assert self._sock is not None
        try:
            if fd is not None:
                # The descriptor rides on the first bytes of this request only.
                sent = socket.send_fds(self._sock, [data], [fd])
                data = data[sent:]
            if data:
                self._sock.sendall(data)
        except TimeoutError as exc:
            raise ProtocolError(f"timed out sending to the daemon after {self.timeout} s") from exc
        except OSError as exc:
            raise ProtocolError(f"lost the connection to the daemon: {exc.strerror or exc}") from exc

    def _read_line(self) -> bytes:
        assert self._sock is not None
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise ProtocolError("the daemon's reply is too long")
            try:
                # Not socket.recv_fds: it drops its flags argument, and these descriptors must
                # arrive close-on-exec (MSG_CMSG_CLOEXEC), never leaking into a child first.
                chunk, ancdata, flags, _ = self._sock.recvmsg(1 << 16, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
                for level, kind, data in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got = array.array("i")
                        got.frombytes(data[: len(data) - len(data) % _FD_SIZE])
                        self._fds.extend(got)
                if flags & socket.MSG_CTRUNC:
                    raise ProtocolError("the daemon's reply carried more descriptors than expected")
            except TimeoutError as exc:
                raise ProtocolError(f"no reply from the daemon within {self.timeout} s") from exc
            except OSError as exc:
                raise ProtocolError(f"lost the connection to the daemon: {exc.strerror or exc}") from exc
            if not chunk:
                raise ProtocolError("the daemon closed the connection without a reply")
            self._buffer += chunk

    def _read_reply(self, request_id: int, progress: ProgressCallback | None = None) -> dict[str, Any]:
        while True:
            line = self._read_line()
            if not line.strip():
                continue
            try:
                reply = json.loads(line)
            except ValueError as exc:
                raise ProtocolError("the daemon sent a line that is not JSON") from exc
            if not isinstance(reply, dict):
                raise ProtocolError("the daemon sent a reply that is not an object")
            if "id" not in reply:
                if progress is not None and reply.get("method") == "progress":
                    _report(reply.get("params"), request_id, progress)
                continue  # a notification we did not ask for: skip it
            if reply["id"] == request_id or (reply["id"] is None and "error" in reply):
                return reply
            raise ProtocolError(f"the daemon answered request {reply['id']!r}, expected {request_id}")


# ---------------------------------------------------------------------------------------------
# The typed API: one method per daemon method. These names, parameters and result keys are
# stable; new keys may appear in results, none disappear.


class User(TypedDict):
    email: str
    role: str


class Progress(TypedDict):
    done: int
    total: int


class UnlockError(TypedDict):
    kind: str
    message: str


class UnlockStatus(TypedDict):
    state: str  # idle, authenticating, downloading_key, decrypting, loading, ready, error
    error: UnlockError | None
    progress: Progress | None


class Status(TypedDict, total=False):
    authenticated: Required[bool]
    user: Required[User | None]
    cache_dir: Required[str]
    version: Required[str]
    unlock: Required[UnlockStatus]
    cache_bytes: int  # the cache's size as last counted
    cache_limit_bytes: int  # resources.cache_max_mb in bytes; 0: no limit


class Loaded(TypedDict, total=False):
    size: Required[int]
    sha256: Required[str]
    format: int  # 1 or 2 (load only)
    generation: int  # format 2 only
    data: str  # base64, only when no descriptor was passed
    memfd: bool  # True when the plaintext came back as a sealed memfd


class Uploaded(TypedDict, total=False):
    size: Required[int]
    small_size: int
    big_size: int
    format: int


class Prefetched(TypedDict):
    big_size: int
    cached: bool


class CacheEntry(TypedDict):
    folder: str
    name: str
    size: int
    last_used: float  # Unix time


class CacheList(TypedDict):
    entries: list[CacheEntry]
    total_bytes: int
    limit_bytes: int


class CacheDropped(TypedDict):
    dropped: int
    freed_bytes: int


class Metrics(TypedDict, total=False):
    calls: dict[str, dict[str, int]]
    bytes: dict[str, int]
    cache: dict[str, int]
    gauges: dict[str, float]
    text: Required[str]  # Prometheus text exposition


@dataclass
class MemoryResource:
    """A resource's plaintext in a sealed memfd: in memory only, and unchangeable.

    ``fd`` is this process's descriptor (close-on-exec); ``mmap()`` maps it read-only. Close it
    (or leave the ``with`` block) to let the memory go once every mapping is gone too.
    """

    fd: int
    size: int
    sha256: str

    def mmap(self) -> mmap.mmap:
        """A read-only mapping of the whole plaintext (an empty resource cannot be mapped)."""
        return mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)

    def read(self) -> bytes:
        """All of it as bytes (a copy: prefer ``mmap`` for big resources)."""
        return os.pread(self.fd, self.size, 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MemoryResource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _payload(data: bytes | None, size: int | None = None) -> dict[str, Any]:
    """An upload's input params: inline ``data`` (base64) and the ``size`` the daemon must read."""
    params: dict[str, Any] = {} if data is None else {"data": base64.b64encode(data).decode("ascii")}
    if size is not None:
        params["size"] = size
    return params


class AzaionClient(Client):
    """``Client`` with one typed method per daemon method (the stable API for applications).

    >>> with AzaionClient() as c:
    ...     with c.load_memory("yolo.bin", "models") as model:
    ...         weights = model.mmap()
    """

    def health(self) -> dict[str, str]:
        return cast("dict[str, str]", self.call("health"))

    def status(self) -> Status:
        return cast(Status, self.call("status"))

    def login(self, email: str, password: str) -> User:
        return cast(User, self.call("login", {"email": email, "password": password})["user"])

    def logout(self) -> None:
        self.call("logout")

    def load(
        self, name: str, folder: str, *, fd: int | None = None, progress: ProgressCallback | None = None
    ) -> Loaded:
        """Into ``fd`` (a writable file or pipe), or inline as base64 ``data`` without one."""
        return cast(Loaded, self.call("load", {"name": name, "folder": folder}, fd=fd, progress=progress))

    def load_bytes(self, name: str, folder: str) -> bytes:
        """Inline (up to the daemon's inline limit): the plaintext as bytes."""
        return base64.b64decode(self.load(name, folder)["data"])

    def load_memory(self, name: str, folder: str) -> MemoryResource:
        """Into a sealed memfd passed back with the reply; no plaintext on any filesystem."""
        result, fds = self.call_with_fds("load", {"name": name, "folder": folder, "memfd": True})
        if len(fds) != 1:
            for extra in fds:
                os.close(extra)
            raise ProtocolError(f"expected one descriptor with the reply, got {len(fds)}")
        return MemoryResource(fds[0], int(result["size"]), str(result["sha256"]))

    def upload(
        self,
        name: str,
        folder: str,
        *,
        fd: int | None = None,
        data: bytes | None = None,
        format: int | None = None,
        size: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> Uploaded:
        """From ``fd`` or ``data``. ``size``: the bytes the daemon must read, or it commits
        nothing (``invalid_params``); ``format``: 1 or 2, else the daemon's default."""
        params: dict[str, Any] = {"name": name, "folder": folder, **_payload(data, size)}
        if format is not None:
            params["format"] = format
        return cast(Uploaded, self.call("upload", params, fd=fd, progress=progress))

    def prefetch(self, name: str, folder: str, *, progress: ProgressCallback | None = None) -> Prefetched:
        """Fetch a big part into the cache; no plaintext anywhere."""
        return cast(Prefetched, self.call("prefetch", {"name": name, "folder": folder}, progress=progress))

    def cache_list(self) -> CacheList:
        return cast(CacheList, self.call("cache_list"))

    def cache_drop(self, folder: str | None = None, name: str | None = None) -> CacheDropped:
        """One entry (folder and name), a folder's entries, or all of them (neither)."""
        params = {k: v for k, v in (("folder", folder), ("name", name)) if v is not None}
        return cast(CacheDropped, self.call("cache_drop", params or None))

    def api_load(self, name: str, folder: str, *, fd: int | None = None) -> Loaded:
        """A whole file kept on the Resource API, into ``fd`` or inline."""
        return cast(Loaded, self.call("api_load", {"name": name, "folder": folder}, fd=fd))

    def api_upload(
        self, name: str, folder: str, *, fd: int | None = None, data: bytes | None = None, size: int | None = None
    ) -> Uploaded:
        """Store bytes as they are on the Resource API as file ``name`` of ``folder``."""
        params = {"name": name, "folder": folder, **_payload(data, size)}
        return cast(Uploaded, self.call("api_upload", params, fd=fd))

    def cdn_upload(
        self, bucket: str, key: str, *, fd: int | None = None, data: bytes | None = None, size: int | None = None
    ) -> Uploaded:
        params = {"bucket": bucket, "key": key, **_payload(data, size)}
        return cast(Uploaded, self.call("cdn_upload", params, fd=fd))

    def cdn_download(self, bucket: str, key: str, *, fd: int | None = None) -> Loaded:
        return cast(Loaded, self.call("cdn_download", {"bucket": bucket, "key": key}, fd=fd))

    def unlock(self, email: str | None = None, password: str | None = None) -> str:
        """Start (or join) an unlock run; its state. Without a login the daemon uses its own."""
        params = None if email is None else {"email": email, "password": password or ""}
        return str(self.call("unlock", params)["state"])

    def unlock_status(self) -> UnlockStatus:
        return cast(UnlockStatus, self.call("unlock_status"))

    def metrics(self) -> Metrics:
        return cast(Metrics, self.call("metrics"))
