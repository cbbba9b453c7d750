"""Bounded under abuse: attacks by a plain member of the socket's group on a real daemon process.

The daemon runs under a 1024-descriptor limit (prlimit), as an unconfigured unit would. The
attacker is ``tests/abuse_client.py`` running as ``nobody`` in the socket's group (``nogroup``),
not an admin. Throughout each attack a probe thread measures root's ``health`` on fresh
connections, and the test measures root's ``load``, the daemon's RSS and its descriptors.
Each test prints its numbers (``pytest -s``) for the record.
"""

from __future__ import annotations

import base64
import contextlib
import grp
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.fixtures_daemon import DaemonHandle, recv_line
from tests.support.devstack import DevStack
from tests.support.polling import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")

FOLDER = "abuse-models"
NOBODY = pwd.getpwnam("nobody")
MEMBERS = grp.getgrgid(NOBODY.pw_gid).gr_name  # the socket's group: nobody is a member, not an admin
HEALTH_BOUND = 0.25  # seconds: root's worst health latency during an attack (measured: 12-21 ms)
LOAD_BOUND = 5.0  # seconds: root's load of a small resource during or right after an attack
Factory = Callable[..., DaemonHandle]


class Probe:
    """Root's health on a fresh connection every 20 ms, on a thread, with the daemon's RSS and fds."""

    def __init__(self, daemon: DaemonHandle) -> None:
        self.daemon = daemon
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.rss_kib = [daemon.rss_kib()]
        self.fds = [daemon.open_fds()]
        self.threads: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                reply = self.daemon.call("health", timeout=10)
                if reply.get("result") != {"status": "healthy"}:
                    self.failures.append(repr(reply))
            except Exception as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - start)
            self.sample()
            self._stop.wait(0.02)

    def sample(self) -> None:
        self.rss_kib.append(self.daemon.rss_kib())
        self.fds.append(self.daemon.open_fds())
        with contextlib.suppress(OSError):
            self.threads.append(len(os.listdir(f"/proc/{self.daemon.proc.pid}/task")))

    def report(self, name: str) -> str:
        worst = max(self.latencies) if self.latencies else float("nan")
        return (f"{name}: health n={len(self.latencies)} worst={worst * 1000:.0f} ms; "
                f"rss {self.rss_kib[0] // 1024}->{max(self.rss_kib) // 1024} MiB; "
                f"fds {self.fds[0]}->{max(self.fds)}; threads max {max(self.threads or [0])}")


class Attacker:
    """tests/abuse_client.py as nobody; ``step()`` lets it go on and returns its next line."""

    def __init__(self, daemon: DaemonHandle, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.abuse_client", args[0], str(daemon.socket_path),
             str(NOBODY.pw_uid), str(NOBODY.pw_gid), *args[1:]],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
        )

    def read(self, timeout: float = 60) -> str:
        out: IO[str] | None = self.proc.stdout
        assert out is not None
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(out.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        assert got and got[0], f"the attacker said nothing (exit {self.proc.poll()})"
        return got[0].strip()

    def step(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self.read()

    def finish(self) -> None:
        """Let the attacker go on to its end, and wait for it to exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.wait(30) == 0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def target(clean_stack: DevStack, azaiond_factory: Factory, short_tmp: Path) -> Iterator[Callable[..., Any]]:
    """A logged-in daemon under a 1024-descriptor limit whose socket nobody's group may use."""
    clean_stack.ensure_bucket(FOLDER)
    short_tmp.chmod(0o755)
    root_group = grp.getgrgid(0).gr_name
    attackers: list[Attacker] = []

    def start(**overrides: Any) -> tuple[DaemonHandle, bytes]:
        socket_conf = {"group": MEMBERS, "admin_groups": [root_group], **overrides.pop("socket", {})}
        d = azaiond_factory(
            config_writer=clean_stack.write_config,
            overrides={"socket": socket_conf, **overrides},
            # As the unit runs it: uid 0 with no capabilities at all (so a member's 0600 pipe
            # cannot be reopened), under the default descriptor limit.
            command=lambda path: ["prlimit", "--nofile=1024:1024", "setpriv", "--bounding-set=-all",
                                  "--inh-caps=-all", sys.executable, "-m", "azaiond.daemon", "--config", str(path)],
        )
        # Without CAP_CHOWN the daemon cannot hand its socket to the group; systemd does that.
        os.chown(d.socket_path, -1, NOBODY.pw_gid)
        admin = clean_stack.admin
        assert "result" in d.call("login", {"email": admin.email, "password": admin.password})
        data = os.urandom(4 * 1024 * 1024)  # far more than a pipe holds
        up = d.call("upload", {"name": "m.bin", "folder": FOLDER, "data": base64.b64encode(data).decode()},
                    timeout=60)
        assert "result" in up, up
        return d, data

    def attack(d: DaemonHandle, *args: str) -> Attacker:
        a = Attacker(d, *args)
        attackers.append(a)
        return a

    start.attack = attack  # type: ignore[attr-defined]
    yield start
    for a in attackers:
        a.close()


def root_load(d: DaemonHandle, data: bytes, timeout: float = 30) -> float:
    """Root's inline load of the test resource: its latency, or inf if it failed or timed out."""
    start = time.monotonic()
    try:
        reply = d.call("load", {"name": "m.bin", "folder": FOLDER}, timeout=timeout)
    except OSError:
        return float("inf")
    took = time.monotonic() - start
    if "result" not in reply or base64.b64decode(reply["result"]["data"]) != data:
        return float("inf")
    return took


def test_fifos_never_read_then_callers_hang_up(target: Any) -> None:
    d, data = target()
    attacker = target.attack(d, "fifos", "40", "m.bin", FOLDER)
    loads: list[float] = []
    with Probe(d) as probe:
        try:
            # 40 departed callers: every pipe has data (a member's 8 workers) or was let go (busy).
            assert attacker.read() == "sent 40"
            assert attacker.step() == "closed"  # the callers hang up; the pipes' readers stay
            loads = [root_load(d, data) for _ in range(3)]
            probe.sample()
        finally:
            print(probe.report("fifos"), f"root load after hang-up worst={max(loads or [0]) * 1000:.0f} ms")
    assert probe.failures == []
    assert max(probe.latencies) < HEALTH_BOUND
    assert max(loads) < LOAD_BOUND
    assert max(probe.fds) < 200
    assert "Traceback" not in d.log_text()
    # The departed calls were cancelled, and SIGTERM stops the daemon at once.
    started = time.monotonic()
    d.stop(timeout=30)
    assert time.monotonic() - started < 10


def test_fifos_held_by_connected_callers_stall_out_and_sigterm_is_prompt(target: Any) -> None:
    d, data = target(socket={"stall_timeout": 2})
    before = d.open_fds()
    attacker = target.attack(d, "fifos", "36", "m.bin", FOLDER)
    with Probe(d) as probe:
        assert attacker.read() == "sent 36"
        # The callers stay connected and never read: after stall_timeout their calls end.
        took = root_load(d, data)
    print(probe.report("fifos-connected"), f"root load {took * 1000:.0f} ms")
    assert probe.failures == []
    assert max(probe.latencies) < HEALTH_BOUND
    assert took < 2 + LOAD_BOUND
    # Let the first attacker go, then fill the workers again and stop the daemon while they
    # are stuck.
    assert attacker.step() == "closed"
    attacker.finish()
    # (32 connections and their pipes, if still open; a few more are the HTTP pools' own.)
    assert wait_until(lambda: d.open_fds() <= before + 16), "the attacker's connections are still open"
    again = target.attack(d, "fifos", "36", "m.bin", FOLDER)
    assert again.read() == "sent 36"
    started = time.monotonic()
    d.stop(timeout=60)
    stopped = time.monotonic() - started
    print(f"sigterm with 36 stuck loads: {stopped:.2f} s")
    assert stopped < 10  # TimeoutStopSec is 30 s


def test_a_thousand_connections_from_one_uid(target: Any) -> None:
    d, data = target()
    attacker = target.attack(d, "connections", "1000")
    loads: list[float] = []
    held = ["?"]
    with Probe(d) as probe:
        try:
            held = attacker.read().split()
            loads = [root_load(d, data, timeout=10) for _ in range(3)]
            probe.sample()
            attacker.finish()
        finally:
            print(probe.report("connections"), f"attacker {held}; root load worst={max(loads or [0]) * 1000:.0f} ms",
                  f"refusal log lines {d.log_text().count('refusing a connection')}",
                  f"accept log lines {d.log_text().count('cannot accept')}")
    assert held[0] == "held" and int(held[1]) == 32 and int(held[2]) == 968  # max_connections_per_uid
    assert probe.failures == []
    assert max(probe.latencies) < HEALTH_BOUND
    assert max(loads) < LOAD_BOUND
    assert max(probe.fds) < 200
    # Refusals are logged, but a few lines at most whatever their number.
    assert 1 <= d.log_text().count("refusing a connection") <= 3


def test_unfinished_long_lines_on_many_connections(target: Any) -> None:
    d, data = target()
    attacker = target.attack(d, "lines", "12", "31")
    loads: list[float] = []
    closed = -1
    with Probe(d) as probe:
        try:
            closed = int(attacker.read().split()[1])
            loads = [root_load(d, data) for _ in range(3)]
            probe.sample()
            attacker.finish()
        finally:
            grown = (max(probe.rss_kib) - probe.rss_kib[0]) // 1024
            print(probe.report("long lines"),
                  f"{closed} of 12 closed; rss +{grown} MiB; root load {max(loads or [0]):.2f} s")
    assert closed >= 9  # 96 MiB (max_buffered_mb) holds three 31 MiB lines
    assert probe.failures == []
    assert max(probe.latencies) < HEALTH_BOUND
    assert max(loads) < LOAD_BOUND
    assert grown < 200  # 12 x 31 MiB = 372 MiB without the cap


def test_idle_and_trickling_connections_are_closed(target: Any) -> None:
    d, _ = target(socket={"idle_timeout": 1})
    idle = d.connect()
    trickle = d.connect()
    busy = d.connect()  # a connection that keeps sending complete messages stays
    started = time.monotonic()
    trickle.sendall(b'{"jsonrpc"')
    while time.monotonic() - started < 6 and not (_closed(idle) and _closed(trickle)):
        with contextlib.suppress(OSError):
            trickle.sendall(b" ")  # bytes, but never a complete message
        busy.sendall(b'{"jsonrpc":"2.0","method":"health","id":1}\n')
        assert json.loads(recv_line(busy))["id"] == 1
        time.sleep(0.2)
    took = time.monotonic() - started
    print(f"idle connections closed after {took:.2f} s (idle_timeout 1 s)")
    assert _closed(idle) and _closed(trickle), "idle connections still open"
    assert 0.9 < took < 4
    for sock in (idle, trickle, busy):
        sock.close()


def _closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def test_sigterm_with_a_caller_that_never_reads_its_reply(target: Any) -> None:
    d, _ = target()
    s = d.connect()
    # Requests whose replies fill the socket buffers: the daemon blocks writing a reply.
    line = b'{"jsonrpc":"2.0","method":"status","id":1}\n'
    s.setblocking(False)
    sent = 0
    try:
        while sent < 64 * 1024 * 1024:
            sent += s.send(line * 1000)
    except BlockingIOError:
        pass
    time.sleep(0.5)
    started = time.monotonic()
    os.kill(d.proc.pid, signal.SIGTERM)
    code = d.proc.wait(30)
    took = time.monotonic() - started
    s.close()
    print(f"sigterm with a reader that never reads: {took:.2f} s")
    assert code == 0
    assert took < 5


def test_out_of_descriptors_backs_off_and_logs_little(azaiond_factory: Factory) -> None:
    # root is not counted against the connection limits, so root can drive the daemon into
    # EMFILE: here under a 64-descriptor limit.
    d = azaiond_factory(command=lambda path: ["prlimit", "--nofile=64:64", sys.executable, "-m",
                                              "azaiond.daemon", "--config", str(path)])
    held = [d.connect() for _ in range(90)]  # they wait in the backlog once accept fails
    time.sleep(1.5)
    log_lines = d.log_text().count("cannot accept a connection")
    for sock in held:
        sock.close()
    assert wait_until(lambda: "result" in _health(d))  # accepting again once descriptors are free
    print(f"EMFILE for 1.5 s: {log_lines} log line(s)")
    assert 1 <= log_lines <= 2
    assert d.proc.poll() is None


def _health(d: DaemonHandle) -> dict[str, Any]:
    try:
        return d.call("health", timeout=2)
    except OSError:
        return {}
