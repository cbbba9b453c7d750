"""Fixtures: azaiond as a separate process on a temp socket, and a minimal raw-socket client.

    def test_x(azaiond_factory):
        d = azaiond_factory(overrides={"socket": {"max_message_mb": 1}})
        assert d.call("health")["result"] == {"status": "healthy"}
        d.stop()  # SIGTERM; asserts exit status 0

``config_writer`` takes ``(path, state_dir, socket_path, **overrides)`` and writes the YAML,
so DevStack.write_config can stand in for the default writer. Unix socket paths are at most
107 bytes, so sockets live in a short directory under /tmp, not in pytest's tmp_path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

ConfigWriter = Callable[..., None]
CommandBuilder = Callable[[Path], Sequence[str]]

# Variables a test process may have inherited that would change how the daemon starts.
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                 "LISTEN_FDNAMES", "JOURNAL_STREAM", "AZAIOND_CONFIG")


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_config(path: Path, state_dir: Path, socket_path: Path, **overrides: Any) -> None:
    """The default config writer: a daemon on ``socket_path`` with nothing remote configured."""
    data: dict[str, Any] = {
        "socket": {"path": str(socket_path)},
        "state_dir": str(state_dir),
        "hardware": "test-hardware",
        "log_level": "info",
    }
    path.write_text(yaml.safe_dump(merge(data, overrides)))


def request_line(method: str, params: Any = None, id_: Any = 1) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = params
    if id_ is not None:
        msg["id"] = id_
    return json.dumps(msg).encode() + b"\n"


def recv_line(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One reply line (newline stripped); b"" if the peer closed first. Reads byte-exact, so
    later lines stay in the socket for the next call."""
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        b = sock.recv(1)
        if not b:
            return bytes(out)
        if b == b"\n":
            return bytes(out)
        out += b


def recv_lines(sock: socket.socket, timeout: float = 10.0) -> Iterator[bytes]:
    """Reply lines as they come, buffered (faster than recv_line for many replies)."""
    sock.settimeout(timeout)
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line
        chunk = sock.recv(65536)
        if not chunk:
            if buf:
                yield buf
            return
        buf += chunk


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def call_socket(
    path: Path, method: str, params: Any = None, fd: int | Sequence[int] | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """One request on a fresh connection, with an optional descriptor (or several)."""
    with connect(path, timeout) as sock:
        line = request_line(method, params)
        if fd is None:
            sock.sendall(line)
        else:
            fds = [fd] if isinstance(fd, int) else list(fd)
            socket.send_fds(sock, [line], fds)
        # A connection of its own: reading ahead is safe, and far faster than recv_line's
        # byte-at-a-time reads for big inline replies.
        reply = next(recv_lines(sock, timeout), b"")
    if not reply:
        raise ConnectionError(f"no reply to {method}")
    result: dict[str, Any] = json.loads(reply)
    return result


@dataclass
class DaemonHandle:
    socket_path: Path
    config_path: Path
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    _log: IO[bytes] = field(repr=False)
    stopped: bool = False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return connect(self.socket_path, timeout)

    def call(self, method: str, params: Any = None, fd: int | Sequence[int] | None = None,
             timeout: float = 10.0) -> dict[str, Any]:
        return call_socket(self.socket_path, method, params, fd, timeout)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait, and assert a clean exit (status 0)."""
        code = self.terminate(timeout)
        assert code == 0, f"azaiond exited {code}:\n{self.log_text()}"
        return code

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.stopped = True
        self._log.close()
        return code


def daemon_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}
    env.update(extra or {})
    return env


def wait_for_health(handle: DaemonHandle, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.proc.poll() is not None:
            raise RuntimeError(f"azaiond exited {handle.proc.returncode}:\n{handle.log_text()}")
        with contextlib.suppress(OSError, ValueError):
            if handle.call("health", timeout=2.0).get("result") == {"status": "healthy"}:
                return
        time.sleep(0.02)
    raise TimeoutError(f"azaiond did not answer health in {timeout} s:\n{handle.log_text()}")


def start_daemon(
    workdir: Path,
    sockdir: Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    config_writer: ConfigWriter | None = None,
    env: Mapping[str, str] | None = None,
    command: CommandBuilder | None = None,
    pass_fds: Sequence[int] = (),
    wait: bool = True,
    name: str = "azaiond",
) -> DaemonHandle:
    """Write a config under ``workdir`` and start the daemon on ``sockdir/<name>.sock``."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{name}.yaml"
    state_dir = workdir / f"{name}-state"
    socket_path = sockdir / f"{name}.sock"
    (config_writer or write_config)(config_path, state_dir, socket_path, **dict(overrides or {}))
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    argv = (
        list(command(config_path))
        if command
        else [sys.executable, "-m", "azaiond.daemon", "--config", str(config_path)]
    )
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            env=daemon_env(env), pass_fds=tuple(pass_fds))
    handle = DaemonHandle(socket_path, config_path, state_dir, log_path, proc, log)
    if wait:
        try:
            wait_for_health(handle)
        except BaseException:
            handle.terminate(5)
            raise
    return handle


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path, for Unix sockets."""
    path = Path(tempfile.mkdtemp(prefix="az", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def azaiond_factory(tmp_path: Path, short_tmp: Path) -> Iterator[Callable[..., DaemonHandle]]:
    """Start daemons; any still running at teardown get SIGTERM (then SIGKILL)."""
    handles: list[DaemonHandle] = []
    count = 0

    def factory(**kwargs: Any) -> DaemonHandle:
        nonlocal count
        count += 1
        kwargs.setdefault("name", f"azaiond{count}")
        handle = start_daemon(tmp_path, short_tmp, **kwargs)
        handles.append(handle)
        return handle

    yield factory
    for handle in handles:
        if not handle.stopped:
            handle.terminate(10)


@pytest.fixture
def azaiond(azaiond_factory: Callable[..., DaemonHandle]) -> DaemonHandle:
    """One daemon with the default test config."""
    return azaiond_factory()


@pytest.fixture(scope="module")
def daemon(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonHandle]:
    """One daemon per test module, with nothing remote configured; shared by the module's tests.

    A module lays config over the default with a ``DAEMON_CONFIG`` mapping of its own.
    """
    overrides: Mapping[str, Any] = getattr(request.module, "DAEMON_CONFIG", {})
    sockdir = Path(tempfile.mkdtemp(prefix="azd", dir="/tmp"))
    handle = start_daemon(tmp_path_factory.mktemp("daemon"), sockdir, overrides=overrides)
    try:
        yield handle
    finally:
        handle.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
