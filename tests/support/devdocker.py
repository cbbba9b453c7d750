"""A private Docker engine for the tests, the benchmarks and the demo (NOTES.md's recipe).

``dockerd`` runs with its own socket, data-root and exec-root under a short temp dir (a Unix
socket path must stay under 108 bytes), no networking, overlay2, and is stopped by its PID.
It needs root and Debian's docker.io.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class Dockerd:
    url: str  # unix:///... for DockerClient(base_url=...) and `docker -H`
    root: Path
    pid: int

    def cli(self, *args: str, input: bytes | None = None, check: bool = True) -> str:
        """Run the docker CLI against this engine; returns stdout."""
        proc = subprocess.run(
            ["docker", "-H", self.url, *args], input=input, capture_output=True, check=False, timeout=600
        )
        if check and proc.returncode:
            raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode()

    def all_images(self) -> set[str]:
        """Every image ID the engine holds, dangling and intermediate ones included."""
        return set(self.cli("images", "-a", "-q", "--no-trunc").split())

    def remove_images(self, *names: str) -> None:
        for name in names:
            self.cli("rmi", "-f", name, check=False)
        self.cli("image", "prune", "-f", check=False)


def _unmount_below(root: Path) -> None:
    """Undo mounts a killed dockerd may leave under ``root`` (overlay, shm), deepest first."""
    mounts: list[str] = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as handle:
        for line in handle:
            point = line.split()[4]
            if point == str(root) or point.startswith(f"{root}/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"dockerd exited with status {proc.returncode}:\n{tail}")
        try:
            client = docker.DockerClient(base_url=url, timeout=5, version="auto")
            try:
                client.ping()
                return
            finally:
                client.close()
        except docker.errors.DockerException as exc:
            last = str(exc)
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"dockerd did not answer within {READY_TIMEOUT:.0f}s ({last}):\n{tail}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def start_dockerd() -> Iterator[Dockerd]:
    """A private dockerd for as long as the context lasts (also used by scripts/bench_unlock.py)."""
    if shutil.which("dockerd") is None:
        raise RuntimeError("dockerd is not installed: apt-get install -y --no-install-recommends docker.io")
    root = Path(tempfile.mkdtemp(prefix="dk", dir="/tmp"))
    sock = root / "d.sock"
    log = root / "dockerd.log"
    cmd = [
        "dockerd",
        "--iptables=false",
        "--ip6tables=false",
        "--bridge=none",
        "--storage-driver=overlay2",
        f"--host=unix://{sock}",
        f"--data-root={root / 'data'}",
        f"--exec-root={root / 'x'}",
        f"--pidfile={root / 'd.pid'}",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(f"unix://{sock}", proc, log)
        yield Dockerd(url=f"unix://{sock}", root=root, pid=proc.pid)
    finally:
        _stop(proc)
        _unmount_below(root)
        shutil.rmtree(root, ignore_errors=True)
