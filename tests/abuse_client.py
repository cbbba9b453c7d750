"""An attacker for tests/test_abuse.py: a plain member of the socket's group, in its own process.

Run as root with ``python -m tests.abuse_client MODE SOCKET UID GID [ARGS]``: it imports what
it needs, raises its own descriptor limit, then drops to UID/GID (no supplementary groups),
so the kernel records the member's credentials at connect(). It prints one line per step on
stdout and waits for a line on stdin before the next step, so the test measures the daemon
between steps. Modes:

- ``fifos N NAME FOLDER``: N loads of NAME into pipes it never reads. Step "sent" once the
  daemon is writing into every pipe; then on a line, hang up every connection but keep the
  pipes' read ends open ("closed"); then on a line, exit.
- ``connections N``: open N connections and hold them ("held <accepted> <refused>"); exit on a
  line.
- ``lines N MIB``: N connections, each sending an unfinished line of MIB MiB ("sent <closed>");
  exit on a line.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import socket
import sys
import time


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def wait_line() -> None:
    sys.stdin.readline()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def fifos(path: str, count: int, name: str, folder: str) -> None:
    conns: list[socket.socket] = []
    readers: list[int] = []
    for i in range(count):
        r, w = os.pipe()
        sock = connect(path)
        line = json.dumps({"jsonrpc": "2.0", "method": "load", "params": {"name": name, "folder": folder},
                           "id": i}).encode() + b"\n"
        with contextlib.suppress(OSError):  # refused (too many connections): its pipe reads as ended
            socket.send_fds(sock, [line], [w])
        os.close(w)
        conns.append(sock)
        readers.append(r)
    # The daemon is writing once a pipe has data; nobody ever reads it.
    deadline = time.monotonic() + 20
    waiting = set(readers)
    while waiting and time.monotonic() < deadline:
        ready, _, _ = select.select(list(waiting), [], [], 0.5)
        waiting -= set(ready)
    say(f"sent {count - len(waiting)}")
    wait_line()
    for sock in conns:
        sock.close()
    say("closed")
    wait_line()


def connections(path: str, count: int) -> None:
    held: list[socket.socket] = []
    refused = 0
    for _ in range(count):
        try:
            held.append(connect(path))
        except OSError:
            refused += 1
    # A refused connection is accepted and closed by the daemon (after a one-line reason);
    # find out which of ours were.
    time.sleep(0.5)
    alive: list[socket.socket] = []
    for sock in held:
        sock.setblocking(False)
        try:
            gone = sock.recv(4096)
        except BlockingIOError:
            alive.append(sock)
            continue
        except OSError:
            gone = b""
        refused += 1
        if gone and b'"busy"' not in gone:
            say(f"unexpected {gone!r}")
        sock.close()
    say(f"held {len(alive)} {refused}")
    wait_line()


def lines(path: str, count: int, mib: int) -> None:
    held: list[socket.socket] = []
    closed = 0
    chunk = b"[" + b" " * (1024 * 1024 - 1)
    for _ in range(count):
        sock = connect(path)
        try:
            for _ in range(mib):
                sock.sendall(chunk)
                chunk = b" " * len(chunk)
        except OSError:
            closed += 1
            sock.close()
            continue
        held.append(sock)
    time.sleep(0.5)
    for sock in held:
        sock.setblocking(False)
        try:
            if sock.recv(4096):
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    say(f"sent {closed}")
    wait_line()


def main() -> None:
    mode, path, uid, gid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    args = sys.argv[5:]
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if mode == "fifos":
        fifos(path, int(args[0]), args[1], args[2])
    elif mode == "connections":
        connections(path, int(args[0]))
    elif mode == "lines":
        lines(path, int(args[0]), int(args[1]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
