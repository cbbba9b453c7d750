"""Cold loads through a real daemon whose CDN traffic passes the fault proxy.

The resource is published straight to the reference API and moto (v1 ciphertext, split as an
upload splits it), so only the load's own fetching goes through the proxy, where every byte
is counted: a resumed load must not fetch again what it already had.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from azaiond import crypto
from azaiond.resources import small_size
from tests.faultproxy import Fault, FaultProxy, Match
from tests.fixtures_daemon import DaemonHandle
from tests.support.devstack import DevStack

FOLDER = "cold-models"
MIB = 1024 * 1024
SIZE = 6 * MIB + 12345  # seven 1 MiB ranges, the last one short
HEADS = 64 * 1024  # room for the HTTP response heads the proxy also counts


@pytest.fixture
def proxy(clean_stack: DevStack) -> Iterator[FaultProxy]:
    host, port = clean_stack.s3_url.removeprefix("http://").split(":")
    with FaultProxy(host, int(port)) as p:
        yield p


@pytest.fixture
def start(
    clean_stack: DevStack, proxy: FaultProxy, azaiond_factory: Callable[..., DaemonHandle]
) -> Callable[..., DaemonHandle]:
    clean_stack.ensure_bucket(FOLDER)

    def start(name: str = "cold") -> DaemonHandle:
        cdn = {"endpoint": proxy.url, "range_mb": 1, "parallel": 3, "retries": 1}
        d = azaiond_factory(config_writer=clean_stack.write_config, overrides={"cdn": cdn}, name=name)
        login = {"email": clean_stack.admin.email, "password": clean_stack.admin.password}
        assert "result" in d.call("login", login)
        return d

    return start


def publish(stack: DevStack, name: str) -> str:
    """A v1 resource of SIZE random bytes on the API and the CDN; returns its sha256."""
    plain = os.urandom(SIZE)
    ct = crypto.encrypt_bytes(plain, crypto.aes_key(stack.resource_key))
    cut = small_size(len(ct), 3)
    stack.refserver.put_part(FOLDER, f"{name}.small", ct[:cut])
    stack.s3_admin_client().put_object(Bucket=FOLDER, Key=f"{name}.big", Body=ct[cut:])
    return hashlib.sha256(plain).hexdigest()


def big_size(name: str, stack: DevStack) -> int:
    head = stack.s3_admin_client().head_object(Bucket=FOLDER, Key=f"{name}.big")
    size: int = head["ContentLength"]
    return size


def load(d: DaemonHandle, name: str, out: Path) -> dict[str, Any]:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return d.call("load", {"name": name, "folder": FOLDER}, fd=fd, timeout=120)
    finally:
        os.close(fd)


def gets(name: str) -> Match:
    return Match(method="GET", path_prefix=f"/{FOLDER}/{name}.big")


def cut_at_60_percent(proxy: FaultProxy, name: str) -> None:
    """Four of seven ranges pass; the next three are cut half-way; every later GET gets 503."""
    proxy.set(Fault.passthrough(), gets(name), times=4)
    proxy.add(Fault.cut(after=MIB // 2), gets(name), times=3)
    proxy.add(Fault.answer(503), gets(name))


def test_cut_load_resumes_after_a_restart(
    start: Callable[..., DaemonHandle], clean_stack: DevStack, proxy: FaultProxy, tmp_path: Path
) -> None:
    name = "resume.bin"
    digest = publish(clean_stack, name)
    big = big_size(name, clean_stack)
    d = start()
    cut_at_60_percent(proxy, name)
    reply = load(d, name, tmp_path / "first")
    assert reply["error"]["data"]["kind"] == "cdn", reply
    partial = d.state_dir / "partial" / FOLDER
    assert (partial / f"{name}.big.part.json").exists()
    assert not (d.state_dir / "cache" / FOLDER / f"{name}.big").exists()
    first = proxy.bytes_down
    assert first > 0.5 * big
    d.stop()

    proxy.clear()
    d = start()  # same name: the same state dir
    reply = load(d, name, tmp_path / "second")
    assert reply["result"]["sha256"] == digest
    assert hashlib.sha256((tmp_path / "second").read_bytes()).hexdigest() == digest
    fetched_twice = proxy.bytes_down - big
    assert fetched_twice < 0.1 * big, f"{fetched_twice} bytes fetched twice"
    assert proxy.bytes_down - first < big - first + HEADS + 0.1 * big
    assert list(partial.iterdir()) == []  # the partial file became the cache entry
    assert (d.state_dir / "cache" / FOLDER / f"{name}.big").stat().st_size == big


def test_cut_ranges_are_retried_within_one_load(
    start: Callable[..., DaemonHandle], clean_stack: DevStack, proxy: FaultProxy, tmp_path: Path
) -> None:
    name = "retry.bin"
    digest = publish(clean_stack, name)
    big = big_size(name, clean_stack)
    d = start()
    proxy.set(Fault.cut(after=300_000), gets(name), times=3)
    reply = load(d, name, tmp_path / "out")
    assert reply["result"]["sha256"] == digest, reply
    assert proxy.faulted == 3
    assert proxy.bytes_down < big + HEADS  # each retry asked only for the missing bytes


def test_concurrent_loads_of_a_missing_big_part_fetch_it_once(
    start: Callable[..., DaemonHandle], clean_stack: DevStack, proxy: FaultProxy, tmp_path: Path
) -> None:
    name = "shared.bin"
    digest = publish(clean_stack, name)
    big = big_size(name, clean_stack)
    d = start()
    replies: list[dict[str, Any]] = []
    barrier = threading.Barrier(5)

    def one(i: int) -> None:
        barrier.wait()
        replies.append(load(d, name, tmp_path / f"out{i}"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.get("result", r)["sha256"] for r in replies] == [digest] * 5
    assert proxy.count("GET", f"/{FOLDER}/{name}.big") == 7
    assert proxy.bytes_down < big + HEADS
