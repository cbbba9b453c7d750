"""Batch attacks by a plain member (uid nobody) against the daemon process.

Each test runs the attacker as another uid (tests/member_client.py) while root calls
`health` on its own connection throughout, and asserts that every one of root's calls was
answered within a stated bound and that the daemon's peak RSS (VmHWM) grew by no more than a
stated bound. Before batches were sliced and limited, a batch of 900,000 notifications held
the event loop for 38-40 s, and a batch of 100 inline loads of a 16 MiB resource took RSS
from 317 MB to 2.3 GB.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_daemon import DaemonHandle, recv_line, request_line
from tests.support.devstack import DevStack

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")

NOBODY = pwd.getpwnam("nobody")
HELPER = Path(__file__).with_name("member_client.py")
FOLDER = "abuse-models"
HEALTH_BOUND = 0.5  # seconds: the worst of root's health calls while an attack runs
MIB = 1024 * 1024


def as_member(d: DaemonHandle, payload: bytes) -> dict[str, Any]:
    d.socket_path.parent.chmod(0o755)
    d.socket_path.chmod(0o666)
    done = subprocess.run(
        [sys.executable, str(HELPER), str(d.socket_path), str(NOBODY.pw_uid), str(NOBODY.pw_gid)],
        input=payload, capture_output=True, timeout=180, check=True,
    )
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def status_kib(d: DaemonHandle, key: str) -> int:
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key}")


@contextmanager
def root_watch(d: DaemonHandle, extra: Callable[[], None] | None = None) -> Iterator[list[float]]:
    """Root calls health (and ``extra``) in a loop until the block ends; yields the latencies."""
    latencies: list[float] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def loop() -> None:
        try:
            with d.connect(timeout=30) as sock:
                while not stop.is_set():
                    start = time.monotonic()
                    sock.sendall(request_line("health"))
                    assert json.loads(recv_line(sock, 30))["result"] == {"status": "healthy"}
                    if extra is not None:
                        extra()
                    latencies.append(time.monotonic() - start)
                    stop.wait(0.005)
        except BaseException as exc:  # reported in the test's thread
            failures.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(60)
    assert not failures, failures


def test_a_batch_at_the_message_cap(azaiond_factory: Callable[..., DaemonHandle]) -> None:
    d = azaiond_factory()  # the default cap: 32 MiB
    rss_before = status_kib(d, "VmRSS")
    notifications = json.dumps([{"jsonrpc": "2.0", "method": "health"}] * 900_000, separators=(",", ":"))
    # The longest batch allowed (1000 elements), each as long as the cap allows: its reply
    # echoes every id, so it is as big as the request.
    pad = "x" * (32 * MIB // 1000 - 100)
    longest = json.dumps([{"jsonrpc": "2.0", "method": "status", "id": f"{i}{pad}"} for i in range(1000)])
    assert len(notifications) < 32 * MIB and len(longest) < 32 * MIB
    with root_watch(d) as latencies:
        refused = as_member(d, notifications.encode() + b"\n")
        answered = as_member(d, longest.encode() + b"\n")
        time.sleep(0.2)  # a few calls after the attack too
    assert refused["outcomes"] == {"too_large": 1} and not refused["batch"]
    assert answered["outcomes"] == {"ok": 1000} and answered["batch"]
    assert len(latencies) > 10
    assert max(latencies) < HEALTH_BOUND, f"root's health took up to {max(latencies):.3f} s"
    growth = status_kib(d, "VmHWM") - rss_before
    assert growth < 320 * 1024, f"peak RSS grew by {growth // 1024} MiB"
    print(f"health worst {max(latencies) * 1000:.1f} ms over {len(latencies)} calls; peak RSS +{growth // 1024} MiB")


def test_a_batch_of_inline_loads(
    clean_stack: DevStack, azaiond_factory: Callable[..., DaemonHandle], tmp_path: Path
) -> None:
    clean_stack.ensure_bucket(FOLDER)
    d = azaiond_factory(config_writer=clean_stack.write_config)
    assert "result" in d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password})
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(16 * MIB - 1024))
    fd = os.open(big, os.O_RDONLY)
    try:
        assert "result" in d.call("upload", {"name": "big.bin", "folder": FOLDER}, fd=fd, timeout=120)
    finally:
        os.close(fd)
    small = base64.b64encode(b"small").decode()
    assert "result" in d.call("upload", {"name": "small.bin", "folder": FOLDER, "data": small})
    rss_before = status_kib(d, "VmRSS")

    def root_load() -> None:
        reply = d.call("load", {"name": "small.bin", "folder": FOLDER}, timeout=30)
        assert reply["result"]["data"] == small

    batch = [{"jsonrpc": "2.0", "method": "load", "params": {"name": "big.bin", "folder": FOLDER}, "id": i}
             for i in range(100)]
    with root_watch(d, root_load) as latencies:
        summary = as_member(d, json.dumps(batch).encode() + b"\n")
        time.sleep(0.2)
    # The batch's inline budget (32 MiB) holds two 16 MiB replies; the rest are refused at once.
    assert summary["outcomes"] == {"ok": 2, "too_large": 98}
    assert summary["reply_bytes"] < 50 * MIB
    assert max(latencies) < HEALTH_BOUND * 2, f"root's health and load took up to {max(latencies):.3f} s"
    growth = status_kib(d, "VmHWM") - rss_before
    assert growth < 400 * 1024, f"peak RSS grew by {growth // 1024} MiB"
    print(f"health+load worst {max(latencies) * 1000:.1f} ms over {len(latencies)}; peak RSS +{growth // 1024} MiB")
