"""Call one quick method in a loop on a connection of its own and time each round trip.

    probe.py SOCKET METHOD [KEY=JSON]  (stops when its stdin closes)

A process of its own, so that the round trips measure the daemon and not the test process,
whose fault proxies move data in Python threads that compete for that process's GIL. Each
reply must be a result; with KEY=JSON, its KEY must equal that value, else it counts as a
failure. At the end it prints {"times": [seconds...], "failures": N} on stdout.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from typing import Any


def main(argv: list[str]) -> int:
    path, method = argv[0], argv[1]
    expect: tuple[str, Any] | None = None
    if len(argv) > 2:
        key, _, value = argv[2].partition("=")
        expect = (key, json.loads(value))
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF: the test closed our stdin
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    request = json.dumps({"jsonrpc": "2.0", "method": method, "id": 1}).encode() + b"\n"
    times: list[float] = []
    failures = 0
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(path)
        reader = sock.makefile("rb")
        print("ready", file=sys.stderr, flush=True)
        while not stop.is_set():
            started = time.perf_counter()
            sock.sendall(request)
            reply = json.loads(reader.readline())
            times.append(time.perf_counter() - started)
            result = reply.get("result")
            if not isinstance(result, dict) or (expect is not None and result.get(expect[0]) != expect[1]):
                failures += 1
            stop.wait(0.01)
    json.dump({"times": times, "failures": failures}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
