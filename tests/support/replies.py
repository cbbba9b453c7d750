"""Small helpers the daemon tests share: building requests, unpacking replies, a free port, and
running requests as the unprivileged user ``nobody``."""

from __future__ import annotations

import json
import pwd
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

NOBODY = pwd.getpwnam("nobody")
AS_NOBODY = Path(__file__).resolve().parent.parent / "programs" / "as_nobody.py"


def req(method: str, params: Any = None, id_: int = 1) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id_}
    if params is not None:
        msg["params"] = params
    return msg


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    """The result of a reply that must have succeeded."""
    assert "error" not in reply, reply
    result: dict[str, Any] = reply["result"]
    return result


def kind(reply: dict[str, Any]) -> str:
    """The error kind of a reply that must have failed."""
    assert "result" not in reply and "error" in reply, reply
    value: str = reply["error"]["data"]["kind"]
    return value


def err(reply: dict[str, Any], code: int, kind: str) -> str:
    """The message of a reply that must have failed with this code and kind."""
    assert "result" not in reply, reply
    assert reply["error"]["code"] == code and reply["error"]["data"]["kind"] == kind, reply
    message: str = reply["error"]["message"]
    return message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_nobody(path: Path, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send ``requests`` on one connection to the socket at ``path`` as nobody; the replies in order."""
    lines = "".join(json.dumps(r) + "\n" for r in requests)
    done = subprocess.run(
        [sys.executable, str(AS_NOBODY), str(path), str(NOBODY.pw_gid), str(NOBODY.pw_uid)],
        input=lines, capture_output=True, text=True, timeout=30, check=True,
    )
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result
