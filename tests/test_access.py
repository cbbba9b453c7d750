"""Access levels from SO_PEERCRED: a process running as `nobody` against admin and open methods.

The caller is a child that drops to nobody (setgroups/setgid/setuid) before it connects,
since the kernel records the credentials at connect(). It runs against an in-process server
with an ADMIN method of our own, and against the daemon process for the open `health`.
"""

from __future__ import annotations

import asyncio
import grp
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from azaiond import wiring
from azaiond.config import SocketConfig
from azaiond.rpc import peer as peer_mod
from azaiond.rpc.table import Access, Call, MethodSpec, Param
from tests.fixtures_daemon import DaemonHandle, call_socket
from tests.support.replies import NOBODY, as_nobody, req


@pytest.fixture(autouse=True)
def _root() -> None:
    """These tests become nobody, which takes root: fail (never skip) without it, as the suite does."""
    if os.geteuid() != 0:
        pytest.fail("run the suite as root (it becomes nobody here)", pytrace=False)




def _whoami(call: Call) -> Mapping[str, Any]:
    return {"uid": call.peer.uid, "gid": call.peer.gid, "pid": call.peer.pid, "admin": call.peer.is_admin}


def _admin_op(call: Call) -> Mapping[str, Any]:
    return {"done": call.params["x"]}


TABLE = {
    "whoami": MethodSpec("whoami", _whoami, Access.OPEN, blocking=False),
    "admin_op": MethodSpec("admin_op", _admin_op, Access.ADMIN, (Param("x", int),)),
}


@pytest.fixture(scope="module")
def server_path() -> Iterator[Path]:
    """An in-process server on a socket nobody can reach: dir 0755, socket 0666."""
    sockdir = Path(tempfile.mkdtemp(prefix="aza", dir="/tmp"))
    sockdir.chmod(0o755)
    path = sockdir / "s.sock"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(path))
    lsock.listen(16)
    path.chmod(0o666)
    rpc = wiring.build_rpc(TABLE, lsock, SocketConfig(max_message_mb=1, admin_groups=("azaion-admin",)), workers=2)
    asyncio.run_coroutine_threadsafe(rpc.server.start(), loop).result(5)
    yield path
    asyncio.run_coroutine_threadsafe(rpc.server.shutdown(5), loop).result(10)
    rpc.close()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()
    shutil.rmtree(sockdir, ignore_errors=True)


FORBIDDEN = {"code": -32002, "message": "forbidden", "data": {"kind": "forbidden"}}


def test_nobody_is_refused_admin_methods_whatever_the_params(server_path: Path) -> None:
    replies = as_nobody(server_path, [
        req("admin_op", {"x": 1}),
        req("admin_op"),  # missing
        req("admin_op", {"x": "one"}),  # wrong type
        req("admin_op", {"x": 1, "y": 2}),  # extra
        req("admin_op", [1]),  # positional
        req("whoami"),
        req("no_such_method"),
    ])
    for reply in replies[:5]:
        assert reply["error"] == FORBIDDEN
    who = replies[5]["result"]
    assert (who["uid"], who["gid"], who["admin"]) == (NOBODY.pw_uid, NOBODY.pw_gid, False)
    assert who["pid"] > 0
    assert replies[6]["error"]["code"] == -32601  # method exists is checked before access


def test_root_gets_params_errors_and_results(server_path: Path) -> None:
    assert call_socket(server_path, "admin_op", {"x": "one"})["error"]["code"] == -32602
    assert call_socket(server_path, "admin_op", {"x": 2})["result"] == {"done": 2}
    who = call_socket(server_path, "whoami")["result"]
    assert who["uid"] == 0 and who["admin"] is True


def test_nobody_can_call_open_methods_on_the_daemon(azaiond: DaemonHandle) -> None:
    azaiond.socket_path.parent.chmod(0o755)
    azaiond.socket_path.chmod(0o666)
    assert as_nobody(azaiond.socket_path, [req("health")])[0]["result"] == {"status": "healthy"}
    assert oct(azaiond.socket_path.stat().st_mode & 0o777) == "0o666"


def test_is_admin_rules() -> None:
    assert peer_mod.is_admin(0, ())
    assert not peer_mod.is_admin(NOBODY.pw_uid, ("azaion-admin",))  # no such group
    # nobody's primary group makes it an admin when that group is named
    primary = grp.getgrgid(NOBODY.pw_gid).gr_name
    assert peer_mod.is_admin(NOBODY.pw_uid, ("azaion-admin", primary))
    assert not peer_mod.is_admin(4_000_000_000 - 7, (primary,))  # a uid with no user


def test_is_admin_uses_the_user_database_grouplist(monkeypatch: pytest.MonkeyPatch) -> None:
    group = grp.getgrgid(0).gr_name  # any existing group with a known gid (0)
    calls: list[tuple[str, int]] = []

    def fake_grouplist(name: str, gid: int) -> list[int]:
        calls.append((name, gid))
        return [gid, 0]

    monkeypatch.setattr(os, "getgrouplist", fake_grouplist)
    assert peer_mod.is_admin(NOBODY.pw_uid, (group,))
    assert calls == [("nobody", NOBODY.pw_gid)]
    monkeypatch.setattr(os, "getgrouplist", lambda name, gid: [gid])
    assert not peer_mod.is_admin(NOBODY.pw_uid, (group,))
