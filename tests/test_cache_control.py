"""Cache control through a real daemon: LRU limit with pinned entries, prefetch, list, drop, access."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_daemon import DaemonHandle
from tests.fixtures_stack import unique_name
from tests.support.devstack import DevStack
from tests.support.replies import NOBODY, as_nobody, err, free_port, ok, req

FOLDER = "cache-models"
MIB = 1024 * 1024
Factory = Callable[..., DaemonHandle]


@pytest.fixture
def start(clean_stack: DevStack, stack_daemon: Callable[..., DaemonHandle]) -> Callable[..., DaemonHandle]:
    clean_stack.ensure_bucket(FOLDER)
    return stack_daemon


def publish(d: DaemonHandle, name: str, data: bytes) -> None:
    params = {"name": name, "folder": FOLDER, "data": base64.b64encode(data).decode()}
    ok(d.call("upload", params, timeout=60))


def load(d: DaemonHandle, name: str) -> bytes:
    return base64.b64decode(ok(d.call("load", {"name": name, "folder": FOLDER}, timeout=60))["data"])


def listed(d: DaemonHandle) -> dict[str, Any]:
    return ok(d.call("cache_list"))


def names(d: DaemonHandle) -> set[str]:
    return {e["name"] for e in listed(d)["entries"] if e["folder"] == FOLDER}


def test_lru_eviction_under_1mib_while_loads_run_and_pinned_entry_stays(
    start: Callable[..., DaemonHandle], tmp_path: Path
) -> None:
    publisher = start()
    data = {unique_name("lru"): os.urandom(300_000) for _ in range(5)}
    for name, body in data.items():
        publish(publisher, name, body)
    d = start(overrides={"resources": {"cache_max_mb": 1}})
    assert listed(d)["limit_bytes"] == MIB
    pinned_name, *others = data

    # A load into a pipe nobody reads yet: it stops mid-way, holding its entry.
    r, w = os.pipe()
    reply: dict[str, Any] = {}
    pinned = threading.Thread(
        target=lambda: reply.update(d.call("load", {"name": pinned_name, "folder": FOLDER}, fd=w, timeout=120))
    )
    pinned.start()
    got = bytearray(os.read(r, 4096))  # the load is decrypting now: its entry is pinned

    errors: list[BaseException] = []

    def churn(name: str) -> None:
        try:
            for _ in range(2):
                assert load(d, name) == data[name]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(n,)) for n in others]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    during = listed(d)
    assert pinned_name in {e["name"] for e in during["entries"]}  # in use: never evicted
    # Everything but the pinned entry fits the limit once the other loads are done.
    assert during["total_bytes"] - next(e["size"] for e in during["entries"] if e["name"] == pinned_name) <= MIB

    while len(got) < len(data[pinned_name]):
        chunk = os.read(r, 1 << 16)
        assert chunk
        got += chunk
    pinned.join(60)
    os.close(w)
    os.close(r)
    assert ok(reply)["sha256"] == hashlib.sha256(data[pinned_name]).hexdigest()
    assert bytes(got) == data[pinned_name]
    after = listed(d)
    assert after["total_bytes"] <= MIB
    assert after["total_bytes"] == sum(e["size"] for e in after["entries"])
    assert len(after["entries"]) < len(data)  # 5 x 300 kB cannot all stay under 1 MiB
    on_disk = sum(p.stat().st_size for p in (d.state_dir / "cache").rglob("*.big"))
    assert on_disk == after["total_bytes"]
    status = ok(d.call("status"))
    assert status["cache_limit_bytes"] == MIB and status["cache_bytes"] == after["total_bytes"]


def test_prefetch_then_load_with_the_cdn_down(start: Callable[..., DaemonHandle], clean_stack: DevStack) -> None:
    publisher = start()
    name, body = unique_name("pf"), os.urandom(250_000)
    publish(publisher, name, body)
    d = start(name="warm")
    result = ok(d.call("prefetch", {"name": name, "folder": FOLDER}, timeout=60))
    entry = d.state_dir / "cache" / FOLDER / f"{name}.big"
    cdn_copy = clean_stack.s3_admin_client().get_object(Bucket=FOLDER, Key=f"{name}.big")["Body"].read()
    assert result == {"big_size": len(cdn_copy), "cached": True}
    assert entry.read_bytes() == cdn_copy  # the ciphertext as on the CDN: no plaintext anywhere
    assert ok(d.call("prefetch", {"name": name, "folder": FOLDER}))["big_size"] == len(cdn_copy)
    d.stop()
    down = start(name="warm", overrides={"cdn": {"endpoint": f"http://127.0.0.1:{free_port()}", "retries": 0}})
    assert load(down, name) == body
    missing = unique_name("pf-missing")
    publish(publisher, missing, os.urandom(10_000))
    err(down.call("load", {"name": missing, "folder": FOLDER}, timeout=60), -32005, "cdn")


def test_prefetch_list_runs_after_login(start: Callable[..., DaemonHandle], clean_stack: DevStack) -> None:
    publisher = start()
    wanted = [unique_name("list") for _ in range(2)]
    for name in wanted:
        publish(publisher, name, os.urandom(50_000))
    prefetch = [{"folder": FOLDER, "name": n} for n in wanted] + [{"folder": FOLDER, "name": "not-there.bin"}]
    d = start(login=False, overrides={"resources": {"prefetch": prefetch}})
    assert names(d) == set()
    ok(d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password}))
    deadline = time.monotonic() + 30
    while names(d) != set(wanted):
        assert time.monotonic() < deadline, listed(d)
        time.sleep(0.05)
    assert f"prefetch of {FOLDER}/not-there.bin failed: not_found" in wait_log(d, "not-there.bin failed")


def wait_log(d: DaemonHandle, text: str) -> str:
    deadline = time.monotonic() + 30
    while text not in d.log_text():
        assert time.monotonic() < deadline, d.log_text()
        time.sleep(0.05)
    return d.log_text()


def test_cache_list_and_drop(start: Callable[..., DaemonHandle]) -> None:
    d = start()
    other = unique_name("other-folder")
    items = {unique_name("ls"): os.urandom(40_000 + i * 1000) for i in range(3)}
    for name, body in items.items():
        publish(d, name, body)
    before = time.time()
    for name in items:
        load(d, name)
    listing = listed(d)
    assert set(listing) == {"entries", "total_bytes", "limit_bytes"}
    assert listing["limit_bytes"] == 0
    mine = [e for e in listing["entries"] if e["folder"] == FOLDER]
    assert {e["name"] for e in mine} == set(items)
    for e in mine:
        assert set(e) == {"folder", "name", "size", "last_used"}
        assert e["size"] == (d.state_dir / "cache" / FOLDER / f"{e['name']}.big").stat().st_size
        assert before - 1 <= e["last_used"] <= time.time() + 1
    assert listing["total_bytes"] == sum(e["size"] for e in listing["entries"])

    first, second, third = items
    size = next(e["size"] for e in mine if e["name"] == first)
    assert ok(d.call("cache_drop", {"folder": FOLDER, "name": first})) == {"dropped": 1, "freed_bytes": size}
    assert not (d.state_dir / "cache" / FOLDER / f"{first}.big").exists()
    assert not (d.state_dir / "cache" / FOLDER / f"{first}.big.meta").exists()
    assert ok(d.call("cache_drop", {"folder": FOLDER, "name": first})) == {"dropped": 0, "freed_bytes": 0}
    assert ok(d.call("cache_drop", {"folder": other})) == {"dropped": 0, "freed_bytes": 0}
    rest = sum(e["size"] for e in mine if e["name"] != first)
    assert ok(d.call("cache_drop", {"folder": FOLDER})) == {"dropped": 2, "freed_bytes": rest}
    assert load(d, second) == items[second]  # fetched again after the drop
    dropped = ok(d.call("cache_drop"))
    assert dropped["dropped"] == 1 and dropped["freed_bytes"] > 0
    assert listed(d)["entries"] == [] and listed(d)["total_bytes"] == 0
    assert ok(d.call("status"))["cache_bytes"] == 0

    err(d.call("cache_drop", {"name": third}), -32602, "invalid_params")
    err(d.call("cache_drop", {"folder": "../etc"}), -32009, "invalid_name")
    err(d.call("cache_drop", {"folder": FOLDER, "name": 5}), -32602, "invalid_params")
    err(d.call("prefetch", {"name": "x/y", "folder": FOLDER}), -32009, "invalid_name")
    err(d.call("prefetch", {"name": unique_name("nothing"), "folder": FOLDER}), -32003, "not_found")
    err(d.call("cache_list", {"x": 1}), -32602, "invalid_params")


def test_access_levels(start: Callable[..., DaemonHandle]) -> None:
    d = start()
    d.socket_path.parent.chmod(0o755)
    d.socket_path.chmod(0o666)
    replies = as_nobody(d.socket_path, [
        req("cache_drop"),
        req("cache_drop", {"folder": FOLDER}),
        req("api_upload", {"name": "a.bin", "folder": FOLDER, "data": ""}),
        req("cache_list"),
        req("prefetch", {"name": "x/y", "folder": FOLDER}),
        req("api_load", {"name": "x/y", "folder": FOLDER}),
    ])
    for reply in replies[:3]:
        assert reply["error"]["data"]["kind"] == "forbidden", reply
    assert set(replies[3]["result"]) == {"entries", "total_bytes", "limit_bytes"}
    for reply in replies[4:]:  # open: the caller gets as far as the name check
        assert reply["error"]["data"]["kind"] == "invalid_name", reply
    assert NOBODY.pw_uid != 0
