"""Fuzz the socket: 100,000 random and mutated frames against one daemon process.

Every frame is followed by a well-formed sentinel request, so each exchange ends with a
known reply: the frame itself may earn at most one reply line before it (a batch is one
line), which must be a JSON-RPC response. Well-formed frames must get exactly the right
reply, and every frame that is valid JSON exactly as many replies as it is due (one, or none
for notifications): none loses its connection. Along the way: descriptors on some frames,
connections dropped mid-frame. At the end the daemon is alive, holds no more descriptors
than at the start, and its RSS has not grown by more than 64 MiB.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

from tests.fixtures_daemon import DaemonHandle

FRAMES = 100_000
CONNECTIONS = 4
BURST = 32  # frames sent on a connection before its replies are read (the socket buffers must hold them)
RSS_GROWTH_LIMIT_KIB = 64 * 1024
SEED = 20240611

VALID = b'{"jsonrpc": "2.0", "method": "health", "id": 1}'
TEMPLATES = [
    VALID,
    b'{"jsonrpc": "2.0", "method": "health"}',
    b'[{"jsonrpc": "2.0", "method": "health", "id": "a"}, {"jsonrpc": "2.0", "method": "x", "id": 2}]',
    b'{"jsonrpc": "2.0", "method": "load", "params": {"name": "a", "folder": "b"}, "id": 3}',
    b'{"jsonrpc": "2.0", "method": "status", "id": null}',
]
ALPHABET = b'{}[]",:0123456789.-+eEtrufalsn \\"jsonrpcmethodidparams\x00\xff\xc3'


DAEMON_CONFIG = {"log_level": "warning"}  # read by the daemon fixture


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**70, rng.randrange(-1000, 1000), 1.5, -0.0, 1e300])
    if kind == 3:
        return "".join(rng.choice("ab\u00e9\u4e2d\\\"\t ") for _ in range(rng.randrange(6)))
    if kind == 4:
        return rng.choice(["health", "jsonrpc", "2.0", "method", "id", "params"])
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["jsonrpc", "method", "params", "id", "x"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(3)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            del buf[min(pos, len(buf) - 1)]
        elif op == 1:
            buf.insert(pos, rng.choice(ALPHABET))
        elif buf:
            buf[min(pos, len(buf) - 1)] = rng.choice(ALPHABET)
    return bytes(buf)


def well_formed(rng: random.Random, n: int) -> tuple[bytes, Any]:
    """A valid message and the reply it must get (None: no reply)."""
    choice = rng.randrange(5)
    if choice == 0:
        return json.dumps({"jsonrpc": "2.0", "method": "health", "id": n}).encode(), {
            "jsonrpc": "2.0", "result": {"status": "healthy"}, "id": n}
    if choice == 1:
        return json.dumps({"jsonrpc": "2.0", "method": "health"}).encode(), None
    if choice == 2:
        return json.dumps({"jsonrpc": "2.0", "method": f"m{n}", "id": str(n)}).encode(), {
            "jsonrpc": "2.0", "error": {"code": -32601, "message": "method not found",
                                        "data": {"kind": "method_not_found"}}, "id": str(n)}
    if choice == 3:
        reply = json.dumps({"jsonrpc": "2.0", "method": "health", "params": {"p": n}, "id": n}).encode()
        return reply, {"jsonrpc": "2.0", "error": {"code": -32602, "message": "extra param 'p'",
                                                     "data": {"kind": "invalid_params"}}, "id": n}
    batch = [{"jsonrpc": "2.0", "method": "health", "id": n}, {"jsonrpc": "2.0", "method": "health"}]
    return json.dumps(batch).encode(), [{"jsonrpc": "2.0", "result": {"status": "healthy"}, "id": n}]


def frame(rng: random.Random, n: int) -> tuple[bytes, Any, bool]:
    """(bytes without newline, expected reply, whether the reply is known)."""
    kind = rng.randrange(10)
    if kind < 3:
        data, expected = well_formed(rng, n)
        return data, expected, True
    if kind < 6:
        data = mutate(rng, rng.choice(TEMPLATES))
    elif kind < 8:
        data = json.dumps(random_json(rng)).encode()
    elif kind < 9:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    else:
        data = rng.choice([b"[" * 5000, b"{}" * 1000, b'"\\ud800"', b"[" + b"1," * 3000 + b"1]", b"\r", b"-"])
    return data.replace(b"\n", b" "), None, False


class Conn:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = self._open()
        self.buf = b""

    def _open(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(self.path))
        return s

    def reopen(self) -> None:
        self.sock.close()
        self.sock = self._open()
        self.buf = b""

    def send(self, data: bytes, fds: list[int]) -> None:
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "daemon closed the connection"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def check_response(obj: Any) -> None:
    items = obj if isinstance(obj, list) else [obj]
    assert items, "an empty batch reply"
    for item in items:
        assert item["jsonrpc"] == "2.0"
        assert ("result" in item) != ("error" in item)
        assert "id" in item
        if "error" in item:
            assert isinstance(item["error"]["code"], int)
            assert isinstance(item["error"]["data"]["kind"], str)


def expected_replies(data: bytes) -> int | None:
    """How many reply lines a frame must get when it is valid JSON (None: not JSON)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if isinstance(obj, list):
        return 0 if obj and all(is_notification(item) for item in obj) else 1
    return 0 if is_notification(obj) else 1


def is_notification(obj: Any) -> bool:
    """A well-formed request without an id: the only message that earns no reply."""
    return (
        isinstance(obj, dict)
        and "id" not in obj
        and obj.get("jsonrpc") == "2.0"
        and isinstance(obj.get("method"), str)
        and set(obj) <= {"jsonrpc", "method", "params"}
        and isinstance(obj.get("params", []), (dict, list))
    )


def test_fuzz(daemon: DaemonHandle) -> None:
    rng = random.Random(SEED)
    conns = [Conn(daemon.socket_path) for _ in range(CONNECTIONS)]
    null = os.open(os.devnull, os.O_RDONLY)
    fds_before = daemon.open_fds()
    rss_before = 0
    checked = valid_json = 0
    # Frames go out in bursts per connection (each followed by its sentinel) and the replies
    # are read afterwards, in order: the same exchanges as one at a time, far fewer waits.
    pending: dict[int, list[tuple[bytes, Any, bool, bool, str]]] = {i: [] for i in range(CONNECTIONS)}

    def drain(i: int) -> None:
        nonlocal checked, valid_json
        conn = conns[i]
        for data, expected, known, with_fds, sentinel in pending[i]:
            replies = []
            while True:
                obj = json.loads(conn.line())
                if isinstance(obj, dict) and obj.get("id") == sentinel:
                    assert obj["result"] == {"status": "healthy"}
                    break
                replies.append(obj)
            assert len(replies) <= 1, (data, replies)
            for obj in replies:
                check_response(obj)
            count = expected_replies(data)
            if count is not None:
                valid_json += 1
                assert len(replies) == count, (data, replies)
            if known and not with_fds:
                assert replies == ([] if expected is None else [expected]), (data, replies)
                checked += 1
        pending[i] = []

    try:
        for n in range(FRAMES):
            if n == 5000:
                for i in pending:
                    drain(i)
                rss_before = daemon.rss_kib()  # after warm-up: caches and pools exist
            i = rng.randrange(CONNECTIONS)
            conn = conns[i]
            data, expected, known = frame(rng, n)
            if rng.randrange(100) == 0:
                # Leave mid-frame: half a message, maybe with a descriptor, then gone.
                drain(i)
                conn.send(data[: len(data) // 2 + 1], [null] if rng.randrange(2) else [])
                conn.reopen()
                continue
            fds = [null] * rng.choice([1, 1, 2, 3]) if rng.randrange(20) == 0 else []
            sentinel = f"s{n}"
            conn.send(data + b"\n", fds)
            conn.send(json.dumps({"jsonrpc": "2.0", "method": "health", "id": sentinel}).encode() + b"\n", [])
            pending[i].append((data, expected, known, bool(fds), sentinel))
            if len(pending[i]) >= BURST:
                drain(i)
        for i in pending:
            drain(i)
    finally:
        for c in conns:
            c.sock.close()
        os.close(null)
    assert daemon.proc.poll() is None, daemon.log_text()
    assert "Traceback" not in daemon.log_text()
    assert checked > FRAMES // 5
    assert valid_json > FRAMES // 3
    growth = daemon.rss_kib() - rss_before
    assert growth < RSS_GROWTH_LIMIT_KIB, f"RSS grew by {growth} KiB"
    deadline = time.monotonic() + 5
    while daemon.open_fds() > fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.open_fds() <= fds_before, "descriptors leaked"
