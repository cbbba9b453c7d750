#!/usr/bin/env python3
"""Benchmark: unlock of a sealed archive against the shell pipeline and the seed's approach.

    python3 -m scripts.bench_unlock [--size-mib 1024] [--repeat 3] [--docker-url URL]

Methods, alternated in every round, each starting from an engine without the image:

- ``job``:   ``UnlockJob`` (the daemon's code: login, key fragment, decrypt, stream into
             ``images.load``) in a child process, against a reference Resource API on loopback.
             The child measures its own RSS before the run and its peak (getrusage).
- ``piped``: ``openssl enc -d ... | docker load`` (the best a shell can do; no file).
- ``seed``:  decrypt to a tar file, ``docker load -i`` it, remove it (what the seed did).
- ``bare``:  the same cryptography streaming loop to /dev/null, no docker (the decrypt ceiling).
- ``job_v2``: ``job`` on the same tar sealed in format v2 (authenticated chunks).

Besides, the first pass of every unlock (reading the tar's metadata for the names it would set,
jumping over layer data) is timed on its own for both formats.

Without ``--docker-url`` a private dockerd is started (tests/fixtures_docker.py). Reports
medians, ratios within the same run, the job's RSS above idle and the extra disk of each method.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from azaiond import crypto
from azaiond.seal import archive_key, seal
from scripts.memstate import recycle
from tests.fixtures_docker import write_rootfs_tar
from tests.support.devdocker import Dockerd, start_dockerd

EMAIL, PASSWORD = "bench@example.com", secrets.token_hex(12)
NAME = "azaion/bench:1"
MIB = 1024 * 1024


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(args: dict[str, Any]) -> None:
    """Run one unlock with the daemon's classes and print timings and RSS as JSON."""

    from azaiond import malloc, wiring
    from azaiond.apiclient import Credentials

    malloc.tune()  # what the daemon does first thing (azaiond/daemon.py)
    from azaiond.config import ApiConfig, Config, DockerConfig, UnlockConfig
    from azaiond.unlock import RUNNING

    config = Config(
        api=ApiConfig(url=args["api"]),
        state_dir=Path(args["state"]),
        hardware="bench",
        unlock=UnlockConfig(archive=Path(args["archive"]), images=(args["image"],)),
        docker=DockerConfig(base_url=args["docker"], timeout=3600),
    )
    creds = Credentials(EMAIL, args["password"])
    services = wiring.build_services(config, wiring.Overrides(login_credentials=lambda: creds))
    job = services.unlock
    services.images.missing([args["image"]])  # connect first, so idle RSS includes the docker client
    idle = _rss_kib()
    started = time.perf_counter()
    job.start(None)
    phases: dict[str, float] = {}  # state -> when it was first seen (polled every 10 ms)
    while (status := job.status())["state"] in RUNNING:
        phases.setdefault(status["state"], time.perf_counter() - started)
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"status": status, "seconds": elapsed, "idle_kib": idle, "peak_kib": usage.ru_maxrss,
                      "cpu": usage.ru_utime + usage.ru_stime, "minflt": usage.ru_minflt, "phases": phases}))


def _reset(engine: Dockerd) -> None:
    engine.remove_images(NAME)
    engine.cli("image", "prune", "-af")
    # The previous method's 1 GiB of layer data is still being written back; without this the
    # method that runs next pays for it, and with a fixed order that is always the same method.
    os.sync()


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far; 0 when it is not ours to read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _disk_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class DiskPeak:
    """Peak growth of the file system's used bytes while the block runs (sampled every 10 ms).

    Docker's data-root is on the same file system, so every method pays for docker's own copy
    of the layer; the differences between methods are the extra disk of each.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stop = threading.Event()
        self._base = 0
        self.peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _disk_used(self._path) - self._base)

    def __enter__(self) -> DiskPeak:
        self._base = _disk_used(self._path)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _disk_used(self._path) - self._base)


def run_job(engine: Dockerd, api_url: str, enc: Path, work: Path) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(dir=work))
    spec = {"api": api_url, "state": str(state), "archive": str(enc), "image": NAME,
            "docker": engine.url, "password": PASSWORD}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    shutil.rmtree(state)
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["status"]["state"] != "ready":
        raise RuntimeError(f"unlock failed: {result['status']}")
    return result


def _openssl_args(enc: Path, fragment: bytes) -> list[str]:
    with open(enc, "rb") as f:
        iv = f.read(16)
    return ["openssl", "enc", "-d", "-aes-256-cbc", "-K", archive_key(fragment).hex(), "-iv", iv.hex()]


def run_piped(engine: Dockerd, enc: Path, fragment: bytes) -> float:
    started = time.perf_counter()
    ossl = " ".join(_openssl_args(enc, fragment))
    subprocess.run(f"tail -c +17 {enc} | {ossl} | docker -H {engine.url} load -q",
                   shell=True, check=True, capture_output=True)
    return time.perf_counter() - started


def run_seed(engine: Dockerd, enc: Path, fragment: bytes, work: Path) -> float:
    tar = work / "decrypted.tar"
    started = time.perf_counter()
    ossl = " ".join(_openssl_args(enc, fragment))
    subprocess.run(f"tail -c +17 {enc} | {ossl} -out {tar}", shell=True, check=True)
    engine.cli("load", "-q", "-i", str(tar))
    tar.unlink()
    return time.perf_counter() - started


def run_bare(enc: Path, fragment: bytes) -> float:
    started = time.perf_counter()
    with open(enc, "rb", buffering=0) as src, open(os.devnull, "wb") as sink:
        crypto.decrypt_stream(src, sink, archive_key(fragment))
    return time.perf_counter() - started


def prepare(engine: Dockerd, work: Path, size_mib: int, fragment: bytes) -> tuple[Path, str]:
    rootfs = work / "rootfs.tar"
    write_rootfs_tar(rootfs, {"etc/hello": b"bench\n"}, size_mib * MIB)
    engine.cli("import", str(rootfs), NAME)
    rootfs.unlink()
    image_id = engine.cli("image", "inspect", "--format", "{{.Id}}", NAME).strip()
    saved = work / "saved.tar"
    engine.cli("save", "-o", str(saved), NAME)
    enc = work / "images.enc"
    with open(saved, "rb") as src:
        seal(src, fragment, enc)
    with open(saved, "rb") as src:
        seal(src, fragment, work / "images-v2.enc", 2, size=saved.stat().st_size)
    saved.unlink()
    return enc, image_id


def run_names(enc: Path, fragment: bytes) -> float:
    """The unlock's first pass alone (metadata only), whichever format ``enc`` has."""
    from azaiond import archives

    key = archive_key(fragment)
    started = time.perf_counter()
    with open(enc, "rb", buffering=0) as archive:
        size = os.fstat(archive.fileno()).st_size
        if archives.is_v2(archive):
            read = archives.v2_reader(archive, archives.v2_header(archive, size, key))
        else:
            read = archives.v1_reader(archive, size, key)
        archives.scan_names(read, [NAME])
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--docker-url", help="an engine to use instead of a private dockerd")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0

    from tests.support.refserver import RefServer, User

    fragment = secrets.token_bytes(32)
    methods = ["job", "job_v2", "piped", "seed", "bare"]
    times: dict[str, list[float]] = {m: [] for m in [*methods, "names_v1", "names_v2"]}
    rss: dict[str, list[int]] = {"job": [], "job_v2": []}
    idle: list[int] = []
    disk: dict[str, list[int]] = {m: [] for m in methods}
    cpu: dict[str, list[tuple[float, float]]] = {"job": [], "job_v2": []}  # (the job's own, dockerd's)
    # Seconds from the start to the first sight of each state, and to the end ("ready").
    phases: dict[str, list[dict[str, float]]] = {"job": [], "job_v2": []}
    with ExitStack() as stack:
        if args.docker_url:
            engine = Dockerd(args.docker_url, Path("/nonexistent"), 0)
        else:
            engine = stack.enter_context(start_dockerd())
        work = Path(tempfile.mkdtemp(prefix="bench-unlock-", dir=args.workdir))
        stack.callback(shutil.rmtree, work, True)
        ref = stack.enter_context(RefServer([User(EMAIL, PASSWORD, "Operator")], key_fragment=fragment))
        print(f"preparing a {args.size_mib} MiB image and sealing it ...", file=sys.stderr)
        enc, image_id = prepare(engine, work, args.size_mib, fragment)
        stack.callback(_reset, engine)
        print(f"archive {enc.stat().st_size / MIB:.0f} MiB, image {image_id[:19]}", file=sys.stderr)

        # Warm-up: page cache and docker's first-load costs, not measured.
        _reset(engine)
        run_bare(enc, fragment)
        run_piped(engine, enc, fragment)
        for round_ in range(args.repeat):
            order = methods[round_ % len(methods) :] + methods[: round_ % len(methods)]  # who goes first
            if round_ % 2:
                order.reverse()  # so job and job_v2 each run right after the other as often
            for method in order:
                _reset(engine)
                # Every method then finds recently freed memory for the layer data dockerd writes
                # (twice the archive: the tar stream and the unpacked layer), whatever ran before.
                recycle(work / "recycle.bin", 2 * args.size_mib + 256)
                engine_cpu = _proc_cpu(engine.pid)
                with DiskPeak(work) as peak:
                    if method in ("job", "job_v2"):
                        archive = enc if method == "job" else work / "images-v2.enc"
                        result = run_job(engine, ref.url, archive, work)
                        times[method].append(result["seconds"])
                        rss[method].append(result["peak_kib"] - result["idle_kib"])
                        cpu[method].append((result["cpu"], _proc_cpu(engine.pid) - engine_cpu))
                        phases[method].append({**result["phases"], "ready": result["seconds"]})
                        idle.append(result["idle_kib"])
                        got = engine.cli("image", "inspect", "--format", "{{.Id}}", NAME).strip()
                        assert got == image_id, got
                    elif method == "piped":
                        times["piped"].append(run_piped(engine, enc, fragment))
                    elif method == "seed":
                        times["seed"].append(run_seed(engine, enc, fragment, work))
                    else:
                        times["bare"].append(run_bare(enc, fragment))
                disk[method].append(peak.peak)
                print(f"round {round_ + 1} {method}: {times[method][-1]:.2f}s", file=sys.stderr)
            times["names_v1"].append(run_names(enc, fragment))
            times["names_v2"].append(run_names(work / "images-v2.enc", fragment))

    med = {k: statistics.median(v) for k, v in times.items()}
    paired = [v2 / v1 for v1, v2 in zip(times["job"], times["job_v2"], strict=True)]
    gib = args.size_mib / 1024
    report = {
        "archive_mib": args.size_mib,
        "repeat": args.repeat,
        "median_seconds": {k: round(v, 2) for k, v in med.items()},
        "throughput_gib_s": {k: round(gib / v, 2) for k, v in med.items()},
        "ratio_job_to_piped": round(med["job"] / med["piped"], 3),
        "ratio_job_to_seed": round(med["job"] / med["seed"], 3),
        "ratio_job_v2_to_job": round(med["job_v2"] / med["job"], 3),
        # Within each round the two ran minutes apart at most; the median of those ratios is
        # less exposed to the machine's drift than the ratio of the medians.
        "ratio_job_v2_to_job_per_round": {
            "median": round(statistics.median(paired), 3), "min": round(min(paired), 3), "max": round(max(paired), 3)},
        "samples": {k: [round(x, 2) for x in v] for k, v in times.items() if k in methods},
        "names_pass_share_of_job": {"v1": round(med["names_v1"] / med["job"], 4),
                                    "v2": round(med["names_v2"] / med["job_v2"], 4)},
        # Where an unlock's time goes besides waiting: the job process's CPU (its whole life, login
        # and imports included) and the engine's during the method (dockerd only, not containerd).
        "cpu_seconds_median": {k: {"job": round(statistics.median(c for c, _ in v), 2),
                                   "dockerd": round(statistics.median(d for _, d in v), 2)} for k, v in cpu.items()},
        "phase_start_seconds_median": {
            k: {p: round(statistics.median(r[p] for r in v if p in r), 2) for p in v[0]} for k, v in phases.items()},
        "job_rss_idle_mib": round(statistics.median(idle) / 1024, 1),
        "job_rss_above_idle_mib": {k: round(max(v) / 1024, 1) for k, v in rss.items()},
        "peak_disk_growth_mib": {k: round(max(v) / MIB) for k, v in disk.items()},
        "targets": {
            "job <= 1.05 x piped": med["job"] <= 1.05 * med["piped"],
            "job <= 0.8 x seed": med["job"] <= 0.8 * med["seed"],
            "job_v2 <= 1.0 x job": med["job_v2"] <= med["job"],
            "rss <= 64 MiB above idle": all(max(v) <= 64 * 1024 for v in rss.values()),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
