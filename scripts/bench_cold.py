#!/usr/bin/env python3
"""Cold loads against a real HTTP origin: nginx serving the bucket directory.

moto's S3 is pure Python and far too slow to show the client side, so the big part is served by
Debian's nginx-light from ``<root>/<bucket>/<key>`` (path-style addressing; nginx ignores the
request signature; GET, HEAD, Range and If-Match are all a download needs). The small part sits
on the reference Resource API as usual.

Variants, alternating in every round, every sample printed, medians and ratios of the same run:

- ``cold``: ``load`` through a running, logged-in azaiond with an empty cache, into a pipe that
  this script drains; the daemon writes the cache entry (the object's bytes, once, to disk);
- ``download_file``: boto3's ``download_file`` of the same object from the same origin to a file
  (also the object's bytes, once, to disk), in a child process, default transfer settings;
- ``resume`` (once): a second daemon reaches nginx through a fault proxy that lets about 60 % of
  the ranges through, cuts the next few mid-way and then answers 503; the load fails, the proxy
  is cleared, the load is retried; reported: all bytes the proxy moved / the object's size.

    python3 -m scripts.bench_cold --size-mb 1024 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from scripts.memstate import recycle

FOLDER = "bench"
NAME = "cold.bin"
MIB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """nginx-light on 127.0.0.1 serving ``root``, in its own prefix dir, stopped by its pid."""

    def __init__(self, prefix: Path, root: Path) -> None:
        self.port = _free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n"
            "events { worker_connections 256; }\n"
            "http {\n  access_log off;\n  sendfile on;\n  default_type application/octet-stream;\n"
            f"  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n"
            f"  server {{ listen 127.0.0.1:{self.port}; root {root}; }}\n}}\n"
        )
        subprocess.run(["nginx", "-p", str(prefix), "-c", str(conf)], check=True)
        self.pidfile = prefix / "nginx.pid"
        deadline = time.monotonic() + 10
        while not self.pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.pidfile.exists():
            os.kill(int(self.pidfile.read_text().strip()), signal.SIGTERM)


class Daemon:
    def __init__(self, config: Path, socket_path: Path, login: dict[str, str]) -> None:
        from azaiond.client import Client, wait_until_listening

        self._log = open(config.parent / f"{config.stem}.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "azaiond.daemon", "--config", str(config)]
        self.proc = subprocess.Popen(cmd, stderr=self._log)
        wait_until_listening(str(socket_path), proc=self.proc)
        self.client = Client(str(socket_path), timeout=600)
        self.client.call("login", login)

    def load_into_pipe(self) -> tuple[float, dict[str, Any] | Exception, int]:
        """Time one load into a pipe drained here; returns (seconds, result or error, bytes drained).

        The drain only counts: hashing here too would take a core's worth of CPU from the
        daemon on a 2-core machine, which the baseline does not pay. The bytes are checked by
        the digest the load returns (the daemon hashes what it writes) and by their count.
        """
        r, w = os.pipe()
        drained = 0

        def drain() -> None:
            nonlocal drained
            buf = bytearray(MIB)
            while n := os.readv(r, [buf]):
                drained += n

        t = threading.Thread(target=drain)
        t.start()
        start = time.perf_counter()
        try:
            result: dict[str, Any] | Exception = self.client.call("load", {"name": NAME, "folder": FOLDER}, fd=w)
        except Exception as exc:
            result = exc
        finally:
            os.close(w)
        seconds = time.perf_counter() - start
        t.join()
        os.close(r)
        return seconds, result, drained

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self._log.close()


def child_download(endpoint: str, out: str) -> None:
    import boto3

    from azaiond.cdn import botocore_config

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
        aws_secret_access_key="bench", config=botocore_config(3),
    )
    start = time.perf_counter()
    s3.download_file(FOLDER, f"{NAME}.big", out)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def publish(stack: Any, root: Path, size: int) -> tuple[str, int]:
    """A v1 resource of ``size`` random bytes: small part on the API, big part under ``root``."""
    from azaiond import crypto
    from azaiond.resources import small_size

    enc = crypto.StreamEncryptor(crypto.aes_key(stack.resource_key))
    cut = small_size(crypto.ciphertext_size(size), 3)
    digest = hashlib.sha256()
    head = bytearray()
    (root / FOLDER).mkdir(parents=True, exist_ok=True)
    with open(root / FOLDER / f"{NAME}.big", "wb") as big:
        def emit(data: bytes | memoryview) -> None:
            take = max(0, min(len(data), cut - len(head)))
            head.extend(data[:take])
            big.write(data[take:])

        left = size
        while left:
            chunk = os.urandom(min(MIB, left))
            left -= len(chunk)
            digest.update(chunk)
            emit(enc.update(chunk))
        emit(enc.finalize())
        big_size = big.tell()
    for path in (root, root / FOLDER, root / FOLDER / f"{NAME}.big"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    stack.refserver.put_part(FOLDER, f"{NAME}.small", bytes(head))
    return digest.hexdigest(), big_size


def clear_state(state: Path) -> None:
    for sub in ("cache", "partial"):
        shutil.rmtree(state / sub, ignore_errors=True)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-download":
        child_download(sys.argv[2], sys.argv[3])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir under /var/tmp")
    args = parser.parse_args()

    from tests.faultproxy import Fault, FaultProxy, Match
    from tests.support.devstack import DevStack

    work = Path(tempfile.mkdtemp(prefix="azcold-", dir=args.workdir or "/var/tmp"))
    work.chmod(0o755)  # nginx's worker (nobody) reads the origin directory below
    stack = DevStack.start(work / "stack")
    nginx = Nginx(work / "nginx", work / "origin")
    proxy = FaultProxy("127.0.0.1", nginx.port).start()
    daemons: list[Daemon] = []
    try:
        size = args.size_mb * MIB
        digest, big_size = publish(stack, work / "origin", size)
        login = {"email": stack.admin.email, "password": stack.admin.password}

        def daemon(name: str, endpoint: str) -> Daemon:
            sock = work / f"{name}.sock"
            config = stack.write_config(work / f"{name}.yaml", work / f"{name}-state", sock,
                                        cdn={"endpoint": endpoint})
            d = Daemon(config, sock, login)
            daemons.append(d)
            return d

        direct = daemon("direct", nginx.url)
        rows: dict[str, list[float]] = {"cold": [], "download_file": []}

        def cold() -> None:
            clear_state(work / "direct-state")
            recycle(work / "recycle.bin", args.size_mb + 256)
            seconds, result, got = direct.load_into_pipe()
            if isinstance(result, Exception) or result.get("sha256") != digest or got != size:
                raise SystemExit(f"cold load failed: {result}")
            rows["cold"].append(seconds)

        def baseline() -> None:
            recycle(work / "recycle.bin", args.size_mb + 256)
            out = work / "download.bin"
            proc = subprocess.run([sys.executable, "-m", "scripts.bench_cold", "--child-download", nginx.url, str(out)],
                                  check=True, capture_output=True, text=True)
            rows["download_file"].append(json.loads(proc.stdout)["seconds"])
            out.unlink()

        cold()  # warm-up: nginx's file in the page cache, the daemon's code paths hot
        rows["cold"].clear()
        for i in range(args.repeat):
            for step in (cold, baseline) if i % 2 == 0 else (baseline, cold):
                step()

        # Resume: cut at about 60 % of the ranges, fail, clear, load again; count every byte.
        resumed = daemon("resume", proxy.url)
        ranges = -(-big_size // (8 * MIB))
        match = Match(method="GET", path_prefix=f"/{FOLDER}/{NAME}.big")
        proxy.set(Fault.passthrough(), match, times=int(ranges * 0.6))
        proxy.add(Fault.cut(after=4 * MIB), match, times=4)
        proxy.add(Fault.answer(503), match)
        first_s, first, _ = resumed.load_into_pipe()
        cut_bytes = proxy.bytes_down
        proxy.clear()
        second_s, second, got = resumed.load_into_pipe()
        if isinstance(second, Exception) or second.get("sha256") != digest or got != size:
            raise SystemExit(f"resumed load failed: {second}")

        gib = size / 1024**3
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"\nbench_cold: {args.size_mb} MiB plaintext, big part {big_size} bytes, {args.repeat} rounds")
        for k, v in rows.items():
            samples = " ".join(f"{s:.3f}" for s in v)
            print(f"  {k:14s} median {med[k]:7.3f} s  {gib / med[k]:5.2f} GiB/s  [{samples}]")
        outcome = f"failed ({type(first).__name__})" if isinstance(first, Exception) else "did not fail"
        print(f"  resume: first load {outcome}"
              f" after {first_s:.2f} s having moved {cut_bytes / big_size:.1%} of the object;"
              f" retry {second_s:.2f} s")
        print("ratios (target):")
        print(f"  cold load / download_file     {med['cold'] / med['download_file']:.3f}  (<= 1.15)")
        print(f"  resumed bytes / object bytes  {proxy.bytes_down / big_size:.3f}  (<= 1.10)")
    finally:
        for d in daemons:
            d.stop()
        proxy.stop()
        nginx.stop()
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
