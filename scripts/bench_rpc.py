#!/usr/bin/env python3
"""Round-trip cost of `health` on azaiond against a bare asyncio line server, in one run.

    python3 -m scripts.bench_rpc [--calls 20000] [--clients 8] [--rounds 3] [--versus DIR]

Starts azaiond (temp config, temp socket) and a bare asyncio server that answers every line
with a fixed reply, then measures, alternating between the two each round: p50/p99 latency
with one client, and calls/s with N concurrent client processes. Prints the ratios the
performance target is stated in (daemon p50 <= 1.8x bare; daemon calls/s >= 0.5x bare).
With ``--versus DIR`` a second daemon runs the code in DIR (another checkout, on PYTHONPATH)
in the same rounds, and the ratios of this code against that one are printed too: how much a
change costs, measured alternately on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUEST = b'{"jsonrpc":"2.0","method":"health","id":1}\n'
FIXED_REPLY = b'{"jsonrpc":"2.0","result":{"status":"healthy"},"id":1}\n'


def bare_server(path: str) -> None:
    """The baseline: asyncio streams, one fixed reply per line, nothing else."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readline():
            writer.write(FIXED_REPLY)
            await writer.drain()
        writer.close()

    async def run() -> None:
        server = await asyncio.start_unix_server(handle, path)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


def wait_for(path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                s.sendall(REQUEST)
                if s.recv(4096):
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{path} did not answer within {timeout} s")


def one_call(sock: socket.socket) -> None:
    sock.sendall(REQUEST)
    data = sock.recv(4096)
    while not data.endswith(b"\n"):
        more = sock.recv(4096)
        if not more:
            raise SystemExit("server closed the connection")
        data += more


def latencies(path: str, calls: int) -> list[float]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        for _ in range(200):
            one_call(sock)
        out = []
        clock = time.perf_counter
        for _ in range(calls):
            start = clock()
            one_call(sock)
            out.append(clock() - start)
        return out


def _client(path: str, calls: int, barrier: mp.synchronize.Barrier) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        for _ in range(100):
            one_call(sock)
        barrier.wait()
        for _ in range(calls):
            one_call(sock)


def throughput(path: str, clients: int, calls: int) -> float:
    """Calls per second with ``clients`` processes, ``calls`` each, started together."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(clients + 1)
    procs = [ctx.Process(target=_client, args=(path, calls, barrier)) for _ in range(clients)]
    for p in procs:
        p.start()
    barrier.wait()
    start = time.perf_counter()
    for p in procs:
        p.join()
    return clients * calls / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000, help="calls per round with one client")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", type=Path, help="use this azaiond config instead of a temp one")
    ap.add_argument("--versus", type=Path, metavar="DIR", help="also run the daemon of another checkout")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="azb", dir="/tmp"))
    daemon_sock = str(tmp / "d.sock")
    bare_sock = str(tmp / "b.sock")
    config = args.config
    if config is None:
        config = tmp / "config.yaml"
        config.write_text(
            f"socket:\n  path: {daemon_sock}\nstate_dir: {tmp / 'state'}\n"
            "hardware: bench\nlog_level: warning\n"
        )
    else:
        import yaml

        daemon_sock = str(yaml.safe_load(config.read_text())["socket"]["path"])
    daemon = subprocess.Popen(
        [sys.executable, "-m", "azaiond.daemon", "--config", str(config)],
        stderr=open(tmp / "daemon.log", "wb"),  # noqa: SIM115 - lives as long as the child
    )
    versus = None
    versus_sock = str(tmp / "v.sock")
    if args.versus is not None:
        vconfig = tmp / "versus.yaml"
        vconfig.write_text(
            f"socket:\n  path: {versus_sock}\nstate_dir: {tmp / 'vstate'}\nhardware: bench\nlog_level: warning\n"
        )
        versus = subprocess.Popen(
            [sys.executable, "-m", "azaiond.daemon", "--config", str(vconfig)],
            stderr=open(tmp / "versus.log", "wb"),  # noqa: SIM115 - lives as long as the child
            env={**os.environ, "PYTHONPATH": str(args.versus.resolve())},
            cwd=args.versus,
        )
    bare = mp.get_context("fork").Process(target=bare_server, args=(bare_sock,), daemon=True)
    bare.start()
    try:
        wait_for(daemon_sock)
        wait_for(bare_sock)
        targets = {"daemon": daemon_sock, "bare": bare_sock}
        if versus is not None:
            wait_for(versus_sock)
            targets["versus"] = versus_sock
        lat: dict[str, list[float]] = {name: [] for name in targets}
        rate: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, path in targets.items():
                lat[name] += latencies(path, args.calls)
                rate[name].append(throughput(path, args.clients, args.calls // args.clients))
        print(f"cores: {os.cpu_count()}, calls per round: {args.calls}, rounds: {args.rounds}")
        for name in targets:
            p50, p99 = pct(lat[name], 0.50) * 1e6, pct(lat[name], 0.99) * 1e6
            one = 1 / statistics.mean(lat[name])
            many = statistics.median(rate[name])
            print(
                f"{name:>6}: p50 {p50:6.1f} us  p99 {p99:6.1f} us  "
                f"1 client {one:8.0f} calls/s  {args.clients} clients {many:8.0f} calls/s"
            )
        p50_ratio = pct(lat["daemon"], 0.5) / pct(lat["bare"], 0.5)
        rate_ratio = statistics.median(rate["daemon"]) / statistics.median(rate["bare"])
        print(f"p50 ratio daemon/bare: {p50_ratio:.2f} (target <= 1.8)")
        print(f"{args.clients}-client calls/s ratio daemon/bare: {rate_ratio:.2f} (target >= 0.5)")
        if "versus" in targets:
            print(f"p50 ratio daemon/versus: {pct(lat['daemon'], 0.5) / pct(lat['versus'], 0.5):.3f}")
            one = statistics.mean(lat["versus"]) / statistics.mean(lat["daemon"])
            print(f"1-client calls/s ratio daemon/versus: {one:.3f}")
            many = statistics.median(rate["daemon"]) / statistics.median(rate["versus"])
            print(f"{args.clients}-client calls/s ratio daemon/versus: {many:.3f}")
        return 0 if p50_ratio <= 1.8 and rate_ratio >= 0.5 else 1
    finally:
        for proc in (daemon, versus):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        bare.terminate()
        bare.join()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
