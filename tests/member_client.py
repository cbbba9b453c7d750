"""A client that runs as an unprivileged member: the attacker in the abuse tests.

    member_client.py SOCKET UID GID < message

Drops to UID/GID (with no supplementary groups) before it connects, since the daemon reads
the peer's credentials at connect(); sends stdin's bytes as they are, reads one reply line
and prints a summary as JSON: the reply's size and the count of each outcome
("ok" or the error kind), for a batch reply or a single one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import Counter


def main() -> int:
    path, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    payload = sys.stdin.buffer.read()
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    chunks: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(120)
        sock.connect(path)
        sock.sendall(payload)
        while not chunks or not chunks[-1].endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    data = b"".join(chunks)
    reply = json.loads(data) if data else None
    items = reply if isinstance(reply, list) else [reply] if reply is not None else []
    outcomes = Counter("ok" if "result" in item else item["error"]["data"]["kind"] for item in items)
    json.dump({"reply_bytes": len(data), "batch": isinstance(reply, list), "outcomes": outcomes}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
