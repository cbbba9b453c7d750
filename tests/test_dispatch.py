"""The dispatcher in process: batch parsing and limits, per-uid call limits, progress
notifications, per-call observers, and odd ids; plus odd ids and the per-call log line
against the daemon process.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import threading
import time
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from azaiond.errors import NotFound
from azaiond.rpc.calllog import CallLog
from azaiond.rpc.dispatch import Dispatcher, Limits
from azaiond.rpc.table import Access, Call, CallRecord, MethodSpec, Param, Peer
from azaiond.rpc.wire import TooManyElements, parse_batch
from tests.fixtures_daemon import DaemonHandle, recv_line, request_line

ROOT = Peer(uid=0, gid=0, pid=1, is_admin=True)
MEMBER = Peer(uid=1234, gid=1234, pid=2, is_admin=False)
OTHER = Peer(uid=1235, gid=1235, pid=3, is_admin=False)


def _health(call: Call) -> Mapping[str, Any]:
    return {"status": "healthy"}


def _fetch(call: Call) -> Mapping[str, Any]:
    """A blocking byte mover: waits for its gate, reports progress, fills facts."""
    call.facts["resource"] = "f/" + call.params["name"]
    gate = GATES.get(call.params["name"])
    if gate is not None:
        gate.wait(10)
    call.progress(1, 2)
    call.progress(2, 2)
    if call.params["name"] == "missing":
        raise NotFound("no such resource")
    call.facts["bytes"] = 3
    return {"data": "YWJj", "cancel_is_mine": call.cancel is EVENTS.get(call.params["name"])}


def _quick_echo(call: Call) -> Mapping[str, Any]:
    """A quick method with params and every way of failing."""
    what = call.params["what"]
    if what == "missing":
        raise NotFound("no such thing")
    if what == "bug":
        raise RuntimeError("a bug")
    if what == "list":
        return ["not", "an", "object"]  # type: ignore[return-value]
    if what == "mapping":
        return types.MappingProxyType({"a": 1})
    return {"what": what, "n": call.params.get("n")}


GATES: dict[str, threading.Event] = {}
EVENTS: dict[str, threading.Event] = {}

TABLE = {
    "health": MethodSpec("health", _health, Access.OPEN, blocking=False),
    "echo": MethodSpec("echo", _quick_echo, Access.OPEN, (Param("what", str), Param("n", int, required=False)),
                       blocking=False),
    "admin_echo": MethodSpec("admin_echo", _quick_echo, Access.ADMIN, (Param("what", str),), blocking=False),
    "fetch": MethodSpec("fetch", _fetch, Access.OPEN, (Param("name", str), Param("data", str, required=False))),
}


def req(method: str, params: Any = None, id_: Any = 1) -> dict[str, Any]:
    return json.loads(request_line(method, params, id_))  # type: ignore[no-any-return]


def run(d: Dispatcher, msg: Any, peer: Peer = ROOT, **kwargs: Any) -> Any:
    line = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
    reply = asyncio.run(d.handle(line, peer, **kwargs))
    return None if reply is None else json.loads(reply)


@pytest.fixture
def dispatcher() -> Any:
    d = Dispatcher(TABLE, workers=8, limits=Limits(max_batch=100, batch_inline_bytes=10, inline_bytes=4,
                                                    calls_per_uid=2, member_calls=3))
    yield d
    d.close()


@pytest.mark.parametrize("text", [
    "[1, 2 ,3]", "[ ]", " [\t{\"a\": [1, {\"b\": 2}]} , \"x\"]\r\n", "[[]]", "[1,]", "[1 2]", "[1]x", "[",
    "[1,", "[NaN]", "[\"\\ud800\"]", "[1] ", "[-]",
])
def test_parse_batch_agrees_with_json_loads(text: str) -> None:
    start = len(text) - len(text.lstrip(" \t\r\n"))
    try:
        expected: Any = json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    except ValueError:
        expected = ValueError
    try:
        got: Any = asyncio.run(parse_batch(text, start, 10))
    except ValueError:
        got = ValueError
    assert got == expected


def test_parse_batch_stops_past_the_limit() -> None:
    text = "[" + ",".join(["{}"] * 1000) + ",oops"
    with pytest.raises(TooManyElements):
        asyncio.run(parse_batch(text, 0, 999))


@pytest.mark.parametrize("id_", ["1e400", "1.5", "-0.0", "true", "false", "[]", "{}", "[1]", '{"a": 1}'])
def test_odd_ids_get_invalid_request_with_null_id(dispatcher: Dispatcher, id_: str) -> None:
    line = b'{"jsonrpc": "2.0", "method": "health", "id": ' + id_.encode() + b"}"
    reply = run(dispatcher, line)
    assert reply["error"]["code"] == -32600 and reply["id"] is None
    batch = run(dispatcher, b"[" + line + b", " + json.dumps(req("health", id_=7)).encode() + b"]")
    assert batch[0]["error"]["code"] == -32600 and batch[0]["id"] is None
    assert batch[1]["result"] == {"status": "healthy"}


def test_big_integer_and_string_ids_are_echoed(dispatcher: Dispatcher) -> None:
    for id_ in (2**70, -5, "x", None):
        msg = {"jsonrpc": "2.0", "method": "health", "id": id_}
        assert run(dispatcher, msg) == {"jsonrpc": "2.0", "result": {"status": "healthy"},
                                                           "id": id_}


def test_a_batch_over_the_element_limit_is_refused_whole(dispatcher: Dispatcher) -> None:
    reply = run(dispatcher, [req("health", id_=i) for i in range(101)])
    assert reply["error"]["data"] == {"kind": "too_large"} and reply["id"] is None
    assert len(run(dispatcher, [req("health", id_=i) for i in range(100)])) == 100


def test_a_long_batch_keeps_order_across_slices() -> None:
    dispatcher = Dispatcher(TABLE, workers=4)
    items: list[Any] = []
    for i in range(200):
        items.append(req("health", id_=i) if i % 3 else {"bad": i})
        if i % 7 == 0:
            items.append(req("fetch", {"name": f"n{i}", "data": ""}, id_=f"f{i}"))
    try:
        reply = run(dispatcher, items)
    finally:
        dispatcher.close()
    assert len(reply) == len(items)
    for item, answer in zip(items, reply, strict=True):
        if "bad" in item:
            assert answer["error"]["code"] == -32600
        else:
            assert answer["id"] == item["id"] and "result" in answer


def test_batch_inline_budget(dispatcher: Dispatcher) -> None:
    # inline_bytes 4 (each reply may carry 4 bytes), batch budget 10: two fetches fit, then
    # too_large at once; input data counts its decoded size.
    reply = run(dispatcher, [req("fetch", {"name": f"n{i}"}, id_=i) for i in range(4)])
    kinds = [r.get("error", {}).get("data", {}).get("kind") for r in reply]
    assert kinds == [None, None, "too_large", "too_large"]
    reply = run(dispatcher, [req("fetch", {"name": "a", "data": "A" * 16}, id_=1)])  # 12 bytes decoded
    assert reply[0]["error"]["data"]["kind"] == "too_large"
    # A single request is held to the inline limit by its handler, not by the batch budget.
    assert "result" in run(dispatcher, req("fetch", {"name": "a", "data": "A" * 16}))


def test_member_calls_are_limited_per_uid_and_in_total(dispatcher: Dispatcher) -> None:
    gate = GATES.setdefault("gate", threading.Event())
    gate.clear()

    async def go() -> list[Any]:
        held = [asyncio.ensure_future(dispatcher.handle(json.dumps(req("fetch", {"name": "gate"})).encode(), p))
                for p in (MEMBER, MEMBER, OTHER)]
        await asyncio.sleep(0.2)
        quick = [
            await dispatcher.handle(json.dumps(req("fetch", {"name": "x"})).encode(), MEMBER),  # per uid
            await dispatcher.handle(json.dumps(req("fetch", {"name": "x"})).encode(), OTHER),  # in total
            await dispatcher.handle(json.dumps(req("fetch", {"name": "x"})).encode(), ROOT),  # admin: free
            await dispatcher.handle(json.dumps(req("health")).encode(), MEMBER),  # quick: no limit
        ]
        gate.set()
        await asyncio.gather(*held)
        quick.append(await dispatcher.handle(json.dumps(req("fetch", {"name": "x"})).encode(), MEMBER))
        return [json.loads(r) for r in quick if r is not None]

    replies = asyncio.run(go())
    assert replies[0]["error"]["data"]["kind"] == "busy" and "uid 1234" in replies[0]["error"]["message"]
    assert replies[1]["error"]["data"]["kind"] == "busy"
    assert "result" in replies[2] and "result" in replies[3]
    assert "result" in replies[4]  # the slots came back


def test_progress_is_opt_in_and_stripped(dispatcher: Dispatcher) -> None:
    lines: list[bytes] = []
    plain = run(dispatcher, req("fetch", {"name": "p"}, id_=9), notify=lines.append)
    assert "result" in plain and lines == []
    asked = run(dispatcher, req("fetch", {"name": "p", "progress": True}, id_=9), notify=lines.append)
    assert "result" in asked
    notes = [json.loads(line) for line in lines]
    assert all(line.endswith(b"\n") for line in lines)
    assert notes[-1] == {"jsonrpc": "2.0", "method": "progress", "params": {"id": 9, "done": 2, "total": 2}}
    bad = run(dispatcher, req("fetch", {"name": "p", "progress": 1}), notify=lines.append)
    assert bad["error"]["code"] == -32602 and "progress" in bad["error"]["message"]


def test_cancel_event_reaches_the_call(dispatcher: Dispatcher) -> None:
    mine = EVENTS.setdefault("c", threading.Event())
    assert run(dispatcher, req("fetch", {"name": "c"}), cancel=mine)["result"]["cancel_is_mine"] is True
    assert run(dispatcher, req("fetch", {"name": "c"}))["result"]["cancel_is_mine"] is False


def test_observers_get_one_record_per_call() -> None:
    records: list[CallRecord] = []
    d = Dispatcher(TABLE, workers=2, observers=[records.append])
    try:
        run(d, req("health"))
        run(d, req("fetch", {"name": "r"}), peer=MEMBER)
        run(d, req("fetch", {"name": "missing"}), peer=MEMBER)
        run(d, req("fetch", {"nome": "x"}))
        run(d, req("no_such"))  # not a call: no record
        run(d, {"id": 1})  # not a request: no record
    finally:
        d.close()
    assert [(r.method, r.kind) for r in records] == [
        ("health", None), ("fetch", None), ("fetch", "not_found"), ("fetch", "invalid_params")]
    assert records[1].facts == {"resource": "f/r", "bytes": 3} and records[1].peer == MEMBER
    assert records[2].facts == {"resource": "f/missing"}
    assert all(r.seconds >= 0 for r in records)


def test_call_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="azaiond.calls")
    observer = CallLog(burst=3)
    observer(CallRecord("health", ROOT, None, 0.001, {}))
    observer(CallRecord("load", MEMBER, None, 1.5, {"resource": "m/a.bin", "bytes": 10, "cache": "hit"}))
    for _ in range(5):
        observer(CallRecord("load", MEMBER, "not_found", 0.01, {"resource": "m/b.bin"}))
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == ("INFO", "load m/a.bin: 10 bytes, cache hit in 1.500 s (uid 1234 pid 2)")
    assert lines[1] == ("WARNING", "load failed: not_found on m/b.bin after 0.010 s (uid 1234 pid 2)")
    assert len(lines) == 4  # health is not logged; past the burst, failures are only counted


def test_a_long_batch_lets_the_loop_run() -> None:
    """Another task gets the loop between slices of one long batch."""
    d = Dispatcher(TABLE, workers=2, limits=Limits(max_batch=20_000))
    line = json.dumps([req("health", id_=None)] * 20_000).encode()
    ticks: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0)

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(ticker(stop))
        await asyncio.sleep(0)
        assert await d.handle(line, ROOT) is None
        stop.set()
        await task

    try:
        asyncio.run(go())
    finally:
        d.close()
    assert len(ticks) > 20_000 // 256  # at least one turn per parse and per dispatch slice


def test_jsonrpcserver_is_used_through_its_public_names_only() -> None:
    import jsonrpcserver

    public = set(jsonrpcserver.__all__)
    for path in Path(__file__).parents[1].joinpath("azaiond").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
                assert not [n for n in names if n.startswith(("jsonrpcserver.", "oslash"))], path
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("jsonrpcserver.", "oslash")), (path, node.module)
                if node.module == "jsonrpcserver":
                    assert {alias.name for alias in node.names} <= public, path


# -- against the daemon process ----------------------------------------------------------

ODD_IDS = [b"1e400", b"1.5", b"true", b"[]", b"{}", b"-1e-400"]


def test_odd_ids_on_the_daemon(azaiond: DaemonHandle) -> None:
    with azaiond.connect() as s:
        for id_ in ODD_IDS:
            s.sendall(b'{"jsonrpc": "2.0", "method": "health", "id": ' + id_ + b"}\n")
            reply = json.loads(recv_line(s))
            assert reply["error"]["code"] == -32600 and reply["id"] is None, (id_, reply)
            s.sendall(b'[{"jsonrpc": "2.0", "method": "status", "id": ' + id_ + b"}]\n")
            assert json.loads(recv_line(s))[0]["id"] is None
        s.sendall(request_line("health", id_=5))
        assert json.loads(recv_line(s))["id"] == 5  # the connection stayed open
    assert "Traceback" not in azaiond.log_text()


def test_failed_calls_are_logged_once(azaiond: DaemonHandle) -> None:
    azaiond.call("load", {"name": "a.bin", "folder": "nowhere", "x": 1})
    azaiond.call("login", {"email": "e@example.com"})
    azaiond.call("health")
    deadline = time.monotonic() + 5
    while "login failed" not in azaiond.log_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    text = azaiond.log_text()
    assert text.count("load failed: invalid_params") == 1
    assert text.count("login failed: invalid_params") == 1
    assert "health" not in text
    assert "e@example.com" not in text


QUICK_LINES = [
    b'{"jsonrpc":"2.0","method":"health","id":1}',
    b'{"jsonrpc":"2.0","method":"health","params":{},"id":"x"}',
    b'{"jsonrpc":"2.0","method":"health","params":{"extra":1},"id":2}',
    b'{"jsonrpc":"2.0","method":"health","params":{"progress":"yes"},"id":3}',
    b'{"jsonrpc":"2.0","method":"echo","params":{"what":"hi","n":7},"id":null}',
    b'{"jsonrpc":"2.0","method":"echo","params":{"what":"hi","n":"7"},"id":4}',
    b'{"jsonrpc":"2.0","method":"echo","params":{"n":1},"id":5}',
    b'{"jsonrpc":"2.0","method":"echo","params":{"what":"missing"},"id":6}',
    b'{"jsonrpc":"2.0","method":"echo","params":{"what":"bug"},"id":7}',
    b'{"jsonrpc":"2.0","method":"echo","params":{"what":"list"},"id":8}',
    b'{"jsonrpc":"2.0","method":"echo","params":{"what":"mapping"},"id":9}',
    b'{"jsonrpc":"2.0","method":"echo","params":{"what":"\\u00e9\\ud83d\\ude00","progress":true},"id":10}',
    b'{"jsonrpc":"2.0","method":"admin_echo","params":{"what":"hi"},"id":11}',
    b'{"jsonrpc":"2.0","method":"admin_echo","params":{"nope":1},"id":12}',
    b'{"jsonrpc":"2.0","method":"echo","params":["hi"],"id":13}',
    b'{"jsonrpc":"2.0","method":"echo","params":{"what":"hi"}}',
]


# Lines the quick path leaves to the full one: it answers None and handle() decides.
NOT_QUICK_LINES = [
    b'{"jsonrpc":"2.0","method":"echo","params":["hi"],"id":13}',  # positional params
    b'{"jsonrpc":"2.0","method":"echo","params":{"what":"hi"}}',  # a notification
    b' {"jsonrpc":"2.0","method":"health","id":1}',  # leading whitespace
    b'{"jsonrpc":"2.0","method":"health","id":1} ',  # trailing whitespace
    b'{"jsonrpc":"2.0","method":"health","params":null,"id":1}',
    b'{"jsonrpc":"2.0","method":"health","id":1.5}',
    b'{"jsonrpc":"2.0","method":"health","id":true}',
    b'{"jsonrpc":"2.0","method":"health","id":1,"x":2}',
    b'{"jsonrpc":"1.0","method":"health","id":1}',
    b'{"jsonrpc":"2.0","method":["health"],"id":1}',
    b'{"jsonrpc":"2.0","method":"nope","id":1}',
    b'{"jsonrpc":"2.0","method":"fetch","params":{"name":"a"},"id":1}',  # runs on a worker
    b'[{"jsonrpc":"2.0","method":"health","id":1}]',
    b'{"jsonrpc":"2.0","method":"health","id":1',
    b'{"jsonrpc":"2.0","method":"health","id":1}{}',
    b'{"jsonrpc":"2.0","method":"health","params":{"x":"' + b"a" * 2000 + b'"},"id":1}',  # long
    b"\xff",
]


@pytest.mark.parametrize("peer", [ROOT, MEMBER])
def test_the_quick_path_answers_the_bytes_of_the_full_one(peer: Peer) -> None:
    # The transport answers quick requests through Dispatcher.quick and everything else
    # through handle(), whose quick methods go through jsonrpcserver's dispatch: same bytes.
    d = Dispatcher(TABLE, workers=1)
    try:
        replies = []
        for line in QUICK_LINES[:14]:  # the last two (positional params, a notification) are not quick
            quick = d.quick(line, peer, threading.Event())
            assert quick is not None, line
            assert quick == asyncio.run(d.handle(line, peer)), line
            replies.append(json.loads(quick))
        for line in NOT_QUICK_LINES:
            assert d.quick(line, peer, threading.Event()) is None, line
        assert replies[0] == {"jsonrpc": "2.0", "result": {"status": "healthy"}, "id": 1}
        assert replies[1]["id"] == "x" and replies[4]["id"] is None
        assert replies[5]["error"]["data"]["kind"] == "invalid_params"
        assert replies[7]["error"]["data"]["kind"] == "not_found"
        assert replies[8]["error"]["data"]["kind"] == replies[9]["error"]["data"]["kind"] == "internal"
        assert replies[10]["result"] == {"a": 1}
        assert replies[12].get("error", {}).get("data", {}).get("kind") == (None if peer.is_admin else "forbidden")
    finally:
        d.close()


def test_quick_calls_are_observed_the_same_on_both_paths() -> None:
    seen: dict[bool, list[tuple[str, str | None]]] = {True: [], False: []}
    for quick in (True, False):
        out = seen[quick]

        def observe(record: CallRecord, out: list[tuple[str, str | None]] = out) -> None:
            out.append((record.method, record.kind))

        d = Dispatcher(TABLE, workers=1, observers=[observe])
        try:
            for line in QUICK_LINES:
                if not quick or d.quick(line, MEMBER, threading.Event()) is None:
                    asyncio.run(d.handle(line, MEMBER))
        finally:
            d.close()
    assert seen[True] == seen[False]
    assert ("echo", "not_found") in seen[True] and ("admin_echo", "forbidden") in seen[True]
