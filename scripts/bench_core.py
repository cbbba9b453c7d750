"""Benchmark of the core engine and of load through the daemon, with baselines from the same run.

    python3 -m scripts.bench_core [--size-mb 1024] [--repeat 3]

Load (warm cache) of SIZE into a file, against:
  - openssl:   ``openssl enc -d -aes-256-cbc`` on the same ciphertext;
  - bare loop: the same cryptography calls (update_into, reused buffers) with nothing around them;
  - sha256: the SHA-256 of the plaintext alone, which every load computes for its result.
Upload of SIZE, against ``openssl enc`` to a file plus a boto3 ``upload_file`` of it to the same S3.
Uploads go to scripts/s3sink.py (a fast S3-compatible origin on loopback, which counts the bodies
and drops them), not to moto: moto's pure-Python S3 moves about 0.05 GiB/s and would be most of
every upload's time.
Load through the daemon into a descriptor, against the in-process load.
Format v2 (sealed AES-GCM chunks) against v1: warm load, upload, and the encryption alone (the
plaintext file sealed or CBC-encrypted into a file, nothing else), since the upload's time is
a check that the transfer is not what decides the upload ratio.

Every variant runs in its own child process under ``/usr/bin/time -v`` for its peak RSS; an
"idle" child that builds the same services and does no transfer is the RSS baseline. Variants
alternate and the medians are reported, with ratios taken within this run. Every variant starts
from the same memory state: no dirty pages of another (``os.sync``), outputs overwritten in
place, and recycled page cache before each upload (scripts/memstate.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The children run this file as a script (sys.path[0] is scripts/), and an editable install of
# azaiond elsewhere on the machine would otherwise be what they import and measure.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.memstate import overwrite, recycle

CHUNK = 1024 * 1024
FOLDER = "bench"


def _services(config_path: str) -> Any:
    from azaiond import config as cfg
    from azaiond import malloc, wiring
    from azaiond.apiclient import Credentials

    malloc.tune()  # what the daemon does first thing (azaiond/daemon.py)

    services = wiring.build_services(cfg.load(Path(config_path)))
    creds = json.loads(os.environ["BENCH_LOGIN"])
    services.account.login(Credentials(creds["email"], creds["password"]))
    return services


def child(args: list[str]) -> None:
    """One measured operation; prints {"seconds": ...} on stdout."""
    kind = args[0]
    seconds = 0.0
    if kind == "idle":
        _services(args[1])
    elif kind == "load":
        daemon = _services(args[1])
        for _ in range(2):  # the first load warms connections and pools, as a running daemon has them
            os.sync()  # the timed load must not wait on the writeback of the one before (see _measure)
            with overwrite(args[3], buffering=0) as out:
                t = time.perf_counter()
                daemon.resources.load(args[2], FOLDER, out)
                seconds = time.perf_counter() - t
                out.truncate()
    elif kind == "upload":
        daemon = _services(args[1])
        fmt = int(args[4]) if len(args) > 4 else 1
        with open(args[3], "rb") as src:
            t = time.perf_counter()
            daemon.resources.upload(args[2], FOLDER, src, format=fmt, size=os.fstat(src.fileno()).st_size)
            seconds = time.perf_counter() - t
    elif kind == "encrypt":
        from azaiond import crypto, sealed

        key, fmt = bytes.fromhex(args[1]), int(args[4])
        t = time.perf_counter()
        with open(args[2], "rb", buffering=0) as src, overwrite(args[3]) as dst:
            if fmt == 1:
                crypto.encrypt_stream(src, dst, key)
            else:
                header = sealed.make_header(sealed.MAGIC_SPLIT, key, 1, os.fstat(src.fileno()).st_size)
                sealed.seal_stream(header, src, dst)
            dst.truncate()
        seconds = time.perf_counter() - t
    elif kind == "sha256":
        import hashlib

        digest, buf = hashlib.sha256(), bytearray(CHUNK)
        view = memoryview(buf)
        t = time.perf_counter()
        with open(args[1], "rb", buffering=0) as src:
            while n := src.readinto(buf):
                digest.update(view[:n])
        seconds = time.perf_counter() - t
    elif kind == "bare":
        from cryptography.hazmat.primitives import padding
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        key = bytes.fromhex(args[1])
        t = time.perf_counter()
        with open(args[2], "rb", buffering=0) as src, overwrite(args[3], buffering=0) as dst:
            dec = Cipher(algorithms.AES(key), modes.CBC(src.read(16))).decryptor()
            inbuf, outbuf = bytearray(CHUNK), bytearray(CHUNK + 16)
            inview, outview = memoryview(inbuf), memoryview(outbuf)
            held = b""
            while n := src.readinto(inbuf):
                m = dec.update_into(inview[:n], outbuf)
                if held:
                    dst.write(held)
                dst.write(outview[: m - 16])
                held = bytes(outview[m - 16 : m])
            unpad = padding.PKCS7(128).unpadder()
            dst.write(unpad.update(held) + unpad.finalize())
            dst.truncate()
        seconds = time.perf_counter() - t
    elif kind == "s3put":
        import boto3

        from azaiond.cdn import botocore_config

        t = time.perf_counter()
        s3 = boto3.client(
            "s3",
            endpoint_url=args[1],
            aws_access_key_id=args[2],
            aws_secret_access_key=args[3],
            region_name="us-east-1",
            config=botocore_config(1),  # the daemon's settings, as the stack's own clients use them
        )
        s3.upload_file(args[4], FOLDER, args[5])
        seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds}))


def _measure(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(seconds, peak RSS KiB) of one child run under /usr/bin/time -v.

    Dirty pages of the variant before are written back first: every variant writes hundreds
    of MiB, and whichever ran next otherwise paid for some of that writeback (truncating or
    rewriting a file waits for its pages under writeback), which made samples bimodal.
    """
    os.sync()
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"bench child failed: {argv}\n{proc.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))  # type: ignore[union-attr]
    try:
        seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"] or wall
    except (ValueError, IndexError):
        seconds = wall  # a plain command: its wall time
    return seconds, rss


def _cpu() -> tuple[float, float]:
    """CPU seconds (user + system) so far of (this process, its waited-for children).

    During an upload variant this process runs only the S3 origin (moto idles), so the deltas
    around one variant are the client's CPU (children: the child, openssl) and the origin's.
    """
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _py(*args: str) -> list[str]:
    return [sys.executable, __file__, "--child", *args]


class _Daemon:
    """One azaiond process for the whole run, logged in, as it would be in service."""

    def __init__(self, config: Path, socket_path: Path, env: dict[str, str]) -> None:
        from azaiond.client import Client, wait_until_listening

        self._log = open(config.parent / "daemon.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "azaiond.daemon", "--config", str(config)]
        self.proc = subprocess.Popen(cmd, stderr=self._log, env=env)
        wait_until_listening(str(socket_path), proc=self.proc)
        creds = json.loads(env["BENCH_LOGIN"])
        self.client = Client(str(socket_path))
        self.client.call("login", {"email": creds["email"], "password": creds["password"]})

    def load(self, name: str, out: Path) -> float:
        with overwrite(str(out), buffering=0) as f:
            t = time.perf_counter()
            self.client.call("load", {"name": name, "folder": FOLDER}, fd=f.fileno())
            seconds = time.perf_counter() - t
            f.truncate()  # at the daemon's end: its copy of the descriptor shares this offset
            return seconds

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self._log.close()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("all", "upload"), default="all",
                        help="upload: only the upload, encrypt and idle variants (quicker)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir under /var/tmp")
    args = parser.parse_args()

    from azaiond import crypto
    from azaiond.resources import small_size
    from scripts.s3sink import S3Sink
    from tests.support.devstack import DevStack

    work = Path(tempfile.mkdtemp(prefix="azbench-", dir=args.workdir or "/var/tmp"))
    stack = DevStack.start(work / "stack")
    # Every upload (ours in both formats and boto3's baseline) goes to this origin; loads run
    # from the warm cache and never reach the CDN. moto stays up only as the stack's S3.
    # Bodies go to /dev/null: a CDN's storage is not on the uploading host, and on these VMs
    # the origin writing (and later freeing) another GiB of page cache per upload made the
    # uploads' samples vary by a second (scripts/memstate.py).
    sink = S3Sink(work / "sink", discard=True)
    daemon: _Daemon | None = None
    try:
        socket_path = work / "d.sock"
        config = stack.write_config(work / "config.yaml", work / "state", socket_path, cdn={"endpoint": sink.url})
        env = dict(os.environ, BENCH_LOGIN=json.dumps({"email": stack.admin.email, "password": stack.admin.password}))
        plain = work / "plain.bin"
        with open(plain, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(CHUNK))
        key = crypto.aes_key(stack.resource_key)
        s3 = (sink.url, stack.write_keys.access_key, stack.write_keys.secret_key)
        out = work / "out.bin"
        rows: dict[str, list[tuple[float, int]]] = {}
        cpu: dict[str, list[tuple[float, float]]] = {}  # (client, origin) CPU seconds per sample

        def record(name: str, result: tuple[float, int]) -> None:
            rows.setdefault(name, []).append(result)

        def with_cpu(name: str, step: Any) -> Any:
            def run() -> None:
                origin0, client0 = _cpu()
                step()
                origin1, client1 = _cpu()
                cpu.setdefault(name, []).append((client1 - client0, origin1 - origin0))
            return run

        for i in range(args.repeat):
            # Upload: ours and the baseline (openssl enc to a file + boto3 upload_file), taking
            # turns at going first so neither always meets the S3 server in the same state.
            def ours() -> None:
                record("upload", _measure(_py("upload", str(config), "res.bin", str(plain)), env))

            def baseline(i: int = i) -> None:
                enc = work / "enc.bin"  # kept across rounds and overwritten (scripts/memstate.py)
                iv = os.urandom(16)
                os.sync()  # as _measure does before every other variant
                t = time.perf_counter()
                with overwrite(str(enc)) as f:
                    subprocess.run(
                        ["openssl", "enc", "-aes-256-cbc", "-K", key.hex(), "-iv", iv.hex(), "-in", str(plain)],
                        stdout=f,
                        check=True,
                    )
                    f.truncate()  # at openssl's end: it wrote through this descriptor's offset
                ossl_enc = time.perf_counter() - t
                put, put_rss = _measure(_py("s3put", *s3, str(enc), f"baseline-{i}.bin"), env)
                record("upload_baseline", (ossl_enc + put, put_rss))
                sink.store.delete(FOLDER, f"baseline-{i}.bin")

            def ours_v2() -> None:
                record("upload_v2", _measure(_py("upload", str(config), "res2.bin", str(plain), "2"), env))

            steps = [with_cpu("upload", ours), with_cpu("upload_v2", ours_v2), with_cpu("upload_baseline", baseline)]
            for step in steps if i % 2 == 0 else steps[::-1]:
                recycle(work / "recycle.bin", args.size_mb + 256)
                step()
            enc_out = work / "enc-only.bin"  # kept across rounds and overwritten (scripts/memstate.py)
            for fmt in (1, 2) if i % 2 == 0 else (2, 1):
                record(f"encrypt_v{fmt}", _measure(_py("encrypt", key.hex(), str(plain), str(enc_out), str(fmt)), env))
            if args.only == "upload":
                record("idle", _measure(_py("idle", str(config)), env))
                continue

            # The same ciphertext as one file for the decrypt baselines: small part + cached big part.
            small = stack.refserver.get_part(FOLDER, "res.bin.small")
            assert small is not None and len(small) == small_size(crypto.ciphertext_size(plain.stat().st_size), 3)
            ct = work / "ct.bin"
            with open(ct, "wb") as f:
                f.write(small)
                with open(work / "state/cache" / FOLDER / "res.bin.big", "rb") as big:
                    shutil.copyfileobj(big, f, CHUNK)
            body = work / "ct_body.bin"
            with open(ct, "rb") as src, open(body, "wb") as dst:
                src.seek(16)
                shutil.copyfileobj(src, dst, CHUNK)

            # Load (warm cache), openssl, bare loop; alternating, same output path.
            for name, label in (("res.bin", "load"), ("res2.bin", "load_v2")) if i % 2 == 0 else (
                ("res2.bin", "load_v2"), ("res.bin", "load")):
                record(label, _measure(_py("load", str(config), name, str(out)), env))
            record(
                "openssl",
                _measure(
                    ["openssl", "enc", "-d", "-aes-256-cbc", "-K", key.hex(), "-iv", small[:16].hex(),
                     "-in", str(body), "-out", str(out)],
                    env,
                ),
            )
            record("bare", _measure(_py("bare", key.hex(), str(ct), str(out)), env))
            record("sha256", _measure(_py("sha256", str(plain)), env))
            record("idle", _measure(_py("idle", str(config)), env))
            if daemon is None:
                daemon = _Daemon(config, socket_path, env)
                daemon.load("res.bin", out)  # warm-up, like the in-process child's first load
            record("daemon_load", (daemon.load("res.bin", out), 0))
            body.unlink()
            ct.unlink()

        med = {k: statistics.median(s for s, _ in v) for k, v in rows.items()}
        rss = {k: max(r for _, r in v) for k, v in rows.items()}
        size_gib = args.size_mb / 1024
        print(f"\nbench_core: {args.size_mb} MiB, {args.repeat} runs, medians (peak RSS in MiB)")
        for k in ("load", "load_v2", "bare", "sha256", "openssl", "daemon_load", "upload", "upload_v2",
                  "upload_baseline", "encrypt_v1", "encrypt_v2", "idle"):
            if k not in rows:
                continue
            extra = f"  rss {rss[k] / 1024:7.1f}" if rss[k] else ""
            samples = " ".join(f"{s:.3f}" for s, _ in rows[k])
            print(f"  {k:16s} {med[k]:8.3f} s  {size_gib / med[k] if med[k] else 0:6.2f} GiB/s{extra}  [{samples}]")
        idle = rss["idle"]
        print("CPU seconds per upload (medians; 2 cores give at most 2 per second of wall time):")
        for k, v in cpu.items():
            client, origin = statistics.median(c for c, _ in v), statistics.median(o for _, o in v)
            print(f"  {k:16s} client {client:6.2f}  origin {origin:6.2f}  sum/wall {(client + origin) / med[k]:4.2f}")
        print("ratios (target):")
        if args.only == "upload":
            print(f"  upload / baseline        {med['upload'] / med['upload_baseline']:.3f}  (<= 1.10)")
            print(f"  v2 upload / v1 upload    {med['upload_v2'] / med['upload']:.3f}  (<= 0.7)")
            print(f"  v2 upload / baseline     {med['upload_v2'] / med['upload_baseline']:.3f}")
            print(f"  v2 encrypt / v1 encrypt  {med['encrypt_v2'] / med['encrypt_v1']:.3f}  (the upload's own work)")
            for k in ("upload", "upload_v2"):
                print(f"  {k + ' peak RSS above idle':30s} {(rss[k] - idle) / 1024:.1f} MiB  (<= 64)")
            return 0
        print(f"  load / bare loop         {med['load'] / med['bare']:.3f}  (<= 1.10)")
        print(f"  load / SHA-256 alone     {med['load'] / med['sha256']:.3f}  (the digest a load returns)")
        print(f"  load / openssl           {med['load'] / med['openssl']:.3f}")
        print(f"  bare / openssl           {med['bare'] / med['openssl']:.3f}  (0.60 on a trial machine)")
        print(f"  upload / baseline        {med['upload'] / med['upload_baseline']:.3f}  (<= 1.10)")
        print(f"  daemon load / in-process {med['daemon_load'] / med['load']:.3f}  (<= 1.10)")
        print(f"  v2 load / v1 load        {med['load_v2'] / med['load']:.3f}  (<= 1.0)")
        print(f"  v2 upload / v1 upload    {med['upload_v2'] / med['upload']:.3f}  (<= 0.7)")
        print(f"  v2 encrypt / v1 encrypt  {med['encrypt_v2'] / med['encrypt_v1']:.3f}  (the upload's own work)")
        for k in ("load", "load_v2", "upload", "upload_v2"):
            print(f"  {k + ' peak RSS above idle':30s} {(rss[k] - idle) / 1024:.1f} MiB  (<= 64)")
    finally:
        if daemon is not None:
            daemon.stop()
        sink.stop()
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
