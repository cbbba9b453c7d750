"""The socket protocol (docs/protocol.md): framing, JSON-RPC errors, batches, descriptors.

Process-level tests talk raw JSON to one daemon; dispatch rules that need methods the daemon
may not have (params, types, handler errors, descriptors) run in-process on a table of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import termios
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from azaiond import wiring
from azaiond.errors import NotFound
from azaiond.rpc.dispatch import validate_params
from azaiond.rpc.table import Access, Call, MethodSpec, Param, Peer
from tests.fixtures_daemon import DaemonHandle, recv_line, recv_lines, request_line
from tests.support.polling import wait_until

CAP = 1024 * 1024  # socket.max_message_mb: 1
HEALTHY = {"status": "healthy"}


DAEMON_CONFIG = {"socket": {"max_message_mb": 1}}  # read by the daemon fixture


def ask(d: DaemonHandle, data: bytes) -> dict[str, Any] | list[Any]:
    with d.connect() as s:
        s.sendall(data)
        reply = recv_line(s)
    out: dict[str, Any] | list[Any] = json.loads(reply)
    return out


def error_of(reply: Any) -> tuple[int, Any]:
    assert reply["jsonrpc"] == "2.0"
    return reply["error"]["code"], reply["id"]


def test_health(daemon: DaemonHandle) -> None:
    assert daemon.call("health") == {"jsonrpc": "2.0", "result": HEALTHY, "id": 1}


@pytest.mark.parametrize("data", [b"{oops\n", b'{"jsonrpc": "2.0", "method": NaN}\n', b"\xff\xfe{}\n",
                                  b"[" * 100000 + b"\n"])
def test_parse_error(daemon: DaemonHandle, data: bytes) -> None:
    reply = ask(daemon, data)
    assert error_of(reply) == (-32700, None)
    assert isinstance(reply, dict)
    assert reply["error"]["data"] == {"kind": "parse_error"}


@pytest.mark.parametrize("msg", [
    {"jsonrpc": "1.0", "method": "health", "id": 1},
    {"method": "health", "id": 1},
    {"jsonrpc": "2.0", "method": 5, "id": 1},
    {"jsonrpc": "2.0", "method": "health", "id": True},
    {"jsonrpc": "2.0", "method": "health", "id": {}},
    {"jsonrpc": "2.0", "method": "health", "params": "x", "id": 1},
    {"jsonrpc": "2.0", "method": "health", "id": 1, "extra": 1},
    42,
    "health",
])
def test_invalid_request(daemon: DaemonHandle, msg: Any) -> None:
    reply = ask(daemon, json.dumps(msg).encode() + b"\n")
    assert error_of(reply) == (-32600, None)


def test_empty_batch_is_one_error(daemon: DaemonHandle) -> None:
    reply = ask(daemon, b"[]\n")
    assert isinstance(reply, dict)
    assert error_of(reply) == (-32600, None)


def test_mixed_batch(daemon: DaemonHandle) -> None:
    batch = [
        {"jsonrpc": "2.0", "method": "health", "id": 1},
        {"foo": "bar"},
        {"jsonrpc": "2.0", "method": "health"},  # a notification: no entry
        {"jsonrpc": "2.0", "method": "no_such_method", "id": "b"},
        7,
    ]
    reply = ask(daemon, json.dumps(batch).encode() + b"\n")
    assert isinstance(reply, list)
    assert reply[0] == {"jsonrpc": "2.0", "result": HEALTHY, "id": 1}
    assert error_of(reply[1]) == (-32600, None)
    assert error_of(reply[2]) == (-32601, "b")
    assert error_of(reply[3]) == (-32600, None)
    assert len(reply) == 4


def test_notifications_get_no_reply(daemon: DaemonHandle) -> None:
    with daemon.connect() as s:
        s.sendall(request_line("health", id_=None))
        s.sendall(request_line("no_such_method", id_=None))
        s.sendall(b'[{"jsonrpc": "2.0", "method": "health"}, {"jsonrpc": "2.0", "method": "x"}]\n')
        s.sendall(request_line("health", id_=7))
        assert json.loads(recv_line(s))["id"] == 7


def test_unknown_method(daemon: DaemonHandle) -> None:
    reply = daemon.call("no_such_method")
    assert error_of(reply) == (-32601, 1)
    assert reply["error"]["data"] == {"kind": "method_not_found"}


def test_params_on_health_are_extra(daemon: DaemonHandle) -> None:
    reply = daemon.call("health", {"verbose": True})
    assert error_of(reply) == (-32602, 1)
    assert "extra" in reply["error"]["message"] and "verbose" in reply["error"]["message"]
    reply = daemon.call("health", [1])
    assert error_of(reply) == (-32602, 1)


def test_message_at_the_cap_is_served(daemon: DaemonHandle) -> None:
    body = request_line("health")[:-1]
    line = body + b" " * (CAP - len(body)) + b"\n"  # exactly the cap, then the newline
    reply = ask(daemon, line)
    assert isinstance(reply, dict) and reply["result"] == HEALTHY


def test_message_over_the_cap(daemon: DaemonHandle) -> None:
    with daemon.connect() as s:
        s.sendall(b'{"jsonrpc": "2.0", "method": "health", "id": 1, "x": "' + b"a" * CAP)
        reply = json.loads(recv_line(s))
        assert reply["id"] is None
        assert reply["error"]["code"] == -32008
        assert reply["error"]["data"] == {"kind": "too_large"}
        # Closed: EOF, or a reset since the daemon dropped what it had not read.
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(1) == b""
    assert daemon.call("health")["result"] == HEALTHY


def test_request_split_across_many_writes(daemon: DaemonHandle) -> None:
    line = request_line("health", id_="split")
    with daemon.connect() as s:
        for i in range(len(line)):
            s.sendall(line[i:i + 1])
            if i % 7 == 0:
                time.sleep(0.001)
        assert json.loads(recv_line(s)) == {"jsonrpc": "2.0", "result": HEALTHY, "id": "split"}


def test_two_requests_in_one_write_and_order_kept(daemon: DaemonHandle) -> None:
    with daemon.connect() as s:
        s.sendall(request_line("health", id_=1) + request_line("nope", id_=2))
        assert json.loads(recv_line(s))["id"] == 1
        assert json.loads(recv_line(s))["id"] == 2
        s.sendall(b"".join(request_line("health", id_=i) for i in range(500)))
        ids = [json.loads(line)["id"] for _, line in zip(range(500), recv_lines(s), strict=False)]
        assert ids == list(range(500))


def _unread(sock: socket.socket) -> int:
    """Bytes this socket sent that its peer has not read yet (SIOCOUTQ)."""
    out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int.from_bytes(out, "little")


def test_quick_replies_to_a_caller_that_reads_late_all_arrive_in_order(daemon: DaemonHandle) -> None:
    # Quick requests read one at a time are answered in the readiness callback. Once the
    # caller's buffers are full, the rest of a reply goes to the serving task, which stops
    # reading until it is written: every reply must arrive once, whole and in order.
    with daemon.connect() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sent = 0
        while True:
            s.sendall(request_line("health", id_=sent))
            sent += 1
            # Each request alone: wait until the daemon has read it, or stopped reading.
            if not wait_until(lambda: _unread(s) == 0, timeout=1.0, interval=0.0002):
                break
            assert sent < 100_000, "the daemon never stopped reading for a caller that reads nothing"
        assert sent > 10
        ids = [json.loads(line)["id"] for _, line in zip(range(sent), recv_lines(s), strict=False)]
        assert ids == list(range(sent))
        s.sendall(request_line("status", id_="after"))
        assert json.loads(recv_line(s))["id"] == "after"


def test_client_leaving_mid_request_disturbs_nobody(daemon: DaemonHandle) -> None:
    others = [daemon.connect() for _ in range(3)]
    with daemon.connect() as s:
        s.sendall(request_line("health")[:20])  # half a request, then gone
    with daemon.connect() as s:
        s.sendall(b"".join(request_line("health", id_=i) for i in range(200)))  # never reads
    for i, o in enumerate(others):
        o.sendall(request_line("health", id_=i))
    for i, o in enumerate(others):
        assert json.loads(recv_line(o))["id"] == i
        o.close()
    assert daemon.proc.poll() is None


def test_descriptors_are_closed_and_counted(daemon: DaemonHandle) -> None:
    before = daemon.open_fds()
    r, w = os.pipe()
    try:
        assert daemon.call("health", fd=w)["result"] == HEALTHY
        reply = daemon.call("health", fd=[r, w])
        assert error_of(reply) == (-32602, 1)
        assert "descriptor" in reply["error"]["message"]
        # A batch cannot carry one: which request would own it?
        with daemon.connect() as s:
            socket.send_fds(s, [b'[{"jsonrpc": "2.0", "method": "health", "id": 1}]\n'], [r])
            assert error_of(json.loads(recv_line(s))[0]) == (-32602, 1)
        # A descriptor on a continuation chunk belongs to no message: closed, not leaked.
        with daemon.connect() as s:
            line = request_line("health", id_=5)
            s.sendall(line[:10])
            time.sleep(0.05)
            socket.send_fds(s, [line[10:]], [r])
            assert json.loads(recv_line(s))["id"] == 5
    finally:
        os.close(r)
        os.close(w)
    # Earlier tests' connections may still be closing, so "before" can only be an upper bound.
    deadline = time.monotonic() + 5
    while daemon.open_fds() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.open_fds() <= before


# --- in-process: dispatch rules on a table of our own --------------------------------------

ROOT = Peer(uid=0, gid=0, pid=1, is_admin=True)
USER = Peer(uid=1000, gid=1000, pid=2, is_admin=False)


def _echo(call: Call) -> Mapping[str, Any]:
    return dict(call.params)


def _write_fd(call: Call) -> Mapping[str, Any]:
    assert call.fd is not None
    data = call.params["text"].encode()
    os.write(call.fd, data)
    return {"size": len(data)}


def _boom(call: Call) -> Mapping[str, Any]:
    raise RuntimeError("/secret/path password=hunter2")


def _not_found(call: Call) -> Mapping[str, Any]:
    raise NotFound("no such resource")


def _not_an_object(call: Call) -> Mapping[str, Any]:
    return [1, 2]  # type: ignore[return-value]


def _thread_name(call: Call) -> Mapping[str, Any]:
    return {"thread": threading.current_thread().name}


TABLE = {
    spec.name: spec
    for spec in (
        MethodSpec("echo", _echo, Access.OPEN, (Param("name", str), Param("count", int),
                                                Param("ratio", float, required=False),
                                                Param("note", (str, type(None)), required=False)),
                   blocking=False),
        MethodSpec("write_fd", _write_fd, Access.OPEN, (Param("text", str),)),
        MethodSpec("boom", _boom, Access.OPEN, blocking=False),
        MethodSpec("boom_thread", _boom, Access.OPEN),
        MethodSpec("not_found", _not_found, Access.OPEN),
        MethodSpec("not_an_object", _not_an_object, Access.OPEN, blocking=False),
        MethodSpec("where_blocking", _thread_name, Access.OPEN),
        MethodSpec("where_loop", _thread_name, Access.OPEN, blocking=False),
        MethodSpec("admin_echo", _echo, Access.ADMIN, (Param("x", int),), blocking=False),
        MethodSpec("odd_level", _echo, "root-only", blocking=False),  # type: ignore[arg-type]
    )
}


def run(msg: Any, peer: Peer = ROOT, fds: tuple[int, ...] = ()) -> Any:
    line = msg if isinstance(msg, bytes) else json.dumps(msg).encode()

    async def go() -> bytes | None:
        d = wiring.build_dispatcher(TABLE, workers=4)
        try:
            return await d.handle(line, peer, fds)
        finally:
            d.close()

    reply = asyncio.run(go())
    return None if reply is None else json.loads(reply)


def req(method: str, params: Any = None, id_: Any = 1) -> dict[str, Any]:
    return json.loads(request_line(method, params, id_))  # type: ignore[no-any-return]


@pytest.mark.parametrize(("params", "needle"), [
    ({"count": 1}, "missing param 'name'"),
    ({"name": "a"}, "missing param 'count'"),
    ({"name": "a", "count": 1, "colour": "red"}, "extra param 'colour'"),
    ({"name": 1, "count": 1}, "'name' must be string"),
    ({"name": "a", "count": True}, "'count' must be integer"),
    ({"name": "a", "count": 1.5}, "'count' must be integer"),
    ({"name": "a", "count": 1, "ratio": "x"}, "'ratio' must be number"),
    ({"name": "a", "count": 1, "note": 3}, "'note' must be string or null"),
])
def test_invalid_params_name_the_param(params: dict[str, Any], needle: str) -> None:
    reply = run(req("echo", params))
    assert reply["error"]["code"] == -32602
    assert needle in reply["error"]["message"]
    assert reply["error"]["data"] == {"kind": "invalid_params"}


def test_valid_params() -> None:
    ok = {"name": "a", "count": 2, "ratio": 1, "note": None}
    assert run(req("echo", ok))["result"] == ok


def test_validate_params_unit() -> None:
    spec = (Param("flag", bool), Param("n", int, required=False))
    validate_params(spec, {"flag": False})
    validate_params(spec, {"flag": True, "n": 0})
    from azaiond.errors import InvalidParams

    with pytest.raises(InvalidParams, match="'flag' must be boolean"):
        validate_params(spec, {"flag": 1})
    with pytest.raises(InvalidParams, match="'n' must be integer"):
        validate_params(spec, {"flag": True, "n": False})


def test_handler_errors() -> None:
    for method in ("boom", "boom_thread", "not_an_object"):
        reply = run(req(method))
        assert reply["error"] == {"code": -32603, "message": "internal error", "data": {"kind": "internal"}}
    reply = run(req("not_found"))
    assert reply["error"] == {"code": -32003, "message": "no such resource", "data": {"kind": "not_found"}}


def test_handler_exception_is_logged_not_replied(caplog: pytest.LogCaptureFixture) -> None:
    reply = run(req("boom"))
    assert "hunter2" not in json.dumps(reply)
    assert any(r.exc_info for r in caplog.records if r.levelname == "ERROR")


def test_blocking_handlers_run_on_threads_others_on_the_loop() -> None:
    assert run(req("where_blocking"))["result"]["thread"].startswith("azaiond-rpc")
    assert run(req("where_loop"))["result"]["thread"] == threading.current_thread().name


def test_access_before_params() -> None:
    for params in (None, {"x": "bad"}, {"y": 1}, [1]):
        reply = run(req("admin_echo", params), peer=USER)
        assert reply["error"] == {"code": -32002, "message": "forbidden", "data": {"kind": "forbidden"}}
    assert run(req("admin_echo", {"x": "bad"}), peer=ROOT)["error"]["code"] == -32602
    assert run(req("admin_echo", {"x": 1}), peer=ROOT)["result"] == {"x": 1}
    assert run(req("no_such", {"x": "bad"}), peer=USER)["error"]["code"] == -32601


def test_unknown_access_level_refuses_everyone() -> None:
    assert run(req("odd_level"), peer=ROOT)["error"]["code"] == -32002


def test_descriptor_reaches_the_handler_and_is_closed(tmp_path: Path) -> None:
    target = tmp_path / "out"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT)
    reply = run(req("write_fd", {"text": "hello"}), fds=(fd,))
    assert reply["result"] == {"size": 5}
    assert target.read_bytes() == b"hello"
    with pytest.raises(OSError):
        os.fstat(fd)  # the dispatcher closed it


def test_two_descriptors_are_refused_and_closed() -> None:
    r, w = os.pipe()
    reply = run(req("write_fd", {"text": "x"}), fds=(r, w))
    assert reply["error"]["code"] == -32602
    for fd in (r, w):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_batch_in_process() -> None:
    reply = run([req("echo", {"name": "a", "count": 1}), {"x": 1}, req("echo", {"name": "b"}, id_=2),
                 req("echo", {"name": "c", "count": 3}, id_=None)])
    assert reply[0]["result"] == {"name": "a", "count": 1}
    assert reply[1]["error"]["code"] == -32600 and reply[1]["id"] is None
    assert reply[2]["error"]["code"] == -32602 and reply[2]["id"] == 2
    assert len(reply) == 3
    assert run([req("echo", {"name": "a", "count": 1}, id_=None)]) is None
