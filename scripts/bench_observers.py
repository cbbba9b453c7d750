"""CPU cost of the call observers (per-call log and metrics) on the dispatcher's hot path, in one run.

    python3 -m scripts.bench_observers [--calls 5000] [--rounds 30]

Serves ``health`` lines in-process as the transport does (``Dispatcher.quick``), through a
Dispatcher with no observers and through the daemon's own (``wiring.build_dispatcher``: the
per-call log, then metrics), alternating, and reports the best CPU time per call of each. CPU
time, because the socket round trip of scripts/bench_rpc.py is too noisy on a shared machine
to resolve a microsecond.

Then it starts a real daemon and measures its own CPU time (utime + stime from /proc) per
``health`` call over its socket. The observers' extra CPU per call, divided by that, is what
they cost the daemon's ``health`` calls/s when it is CPU-bound. The target is <= 5 %.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from azaiond import wiring
from azaiond.metrics import Metrics
from azaiond.rpc.dispatch import Dispatcher
from azaiond.rpc.table import Access, Call, MethodSpec, Peer

LINE = b'{"jsonrpc":"2.0","method":"health","id":1}'


def _health(call: Call) -> dict[str, str]:
    return {"status": "healthy"}


def _per_call(dispatcher: Dispatcher, calls: int) -> float:
    peer = Peer(uid=0, gid=0, pid=1, is_admin=True)
    cancel = threading.Event()
    start = time.process_time()
    for _ in range(calls):
        if dispatcher.quick(LINE, peer, cancel) is None:
            raise SystemExit("health did not take the quick path")
    return (time.process_time() - start) / calls


def _run(calls: int, rounds: int) -> float:
    """The observers' extra CPU per call, in seconds."""
    table = {"health": MethodSpec("health", _health, Access.OPEN, blocking=False)}
    plain = Dispatcher(table, workers=1)
    observed = wiring.build_dispatcher(table, workers=1, observers=[Metrics().observe_call])
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        a.append(_per_call(plain, calls))
        b.append(_per_call(observed, calls))
    best_a, best_b = min(a), min(b)
    print(f"dispatcher CPU per health call: no observers {best_a * 1e6:.2f} us, "
          f"per-call log + metrics {best_b * 1e6:.2f} us (+{(best_b - best_a) * 1e6:.2f} us)")
    plain.close()
    observed.close()
    return best_b - best_a


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_cpu_per_call(calls: int, rounds: int) -> float:
    """The best daemon CPU seconds per health call over its socket (one client, in lockstep)."""
    tmp = Path(tempfile.mkdtemp(prefix="azo", dir="/tmp"))
    path = tmp / "d.sock"
    config = tmp / "config.yaml"
    config.write_text(f"socket:\n  path: {path}\nstate_dir: {tmp / 'state'}\nhardware: bench\nlog_level: warning\n")
    proc = subprocess.Popen([sys.executable, "-m", "azaiond.daemon", "--config", str(config)],
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        best = float("inf")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            reader = sock.makefile("rb")
            for _ in range(rounds):
                before = _cpu_seconds(proc.pid)
                for _ in range(calls):
                    sock.sendall(LINE + b"\n")
                    reader.readline()
                best = min(best, (_cpu_seconds(proc.pid) - before) / calls)
        return best
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    extra = _run(args.calls, args.rounds)
    whole = daemon_cpu_per_call(args.calls * 2, max(3, args.rounds // 5))
    share = extra / whole
    print(f"daemon CPU per health call over its socket: {whole * 1e6:.1f} us; "
          f"the observers' share: {share * 100:.1f} % (target <= 5 %)")
    return 0 if share <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
