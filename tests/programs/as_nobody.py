"""Send JSON-RPC lines as user ``nobody``: tests/test_access.py runs this as root.

    as_nobody.py SOCKET GID UID < lines

It drops to GID/UID at once, then sends each stdin line on its own connection and prints the
replies as one JSON list. json and socket are imported while still root, so nothing needs
reading from root-only paths afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any


def ask(path: str, line: str) -> Any:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(line.encode())
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf)


def main() -> None:
    path, gid, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    print(json.dumps([ask(path, line) for line in sys.stdin]))


if __name__ == "__main__":
    main()
