"""Cold loads through a real daemon whose CDN traffic passes the fault proxy.

The resource is published straight to the reference API and moto (v1 ciphertext, split as an
upload splits it), so only the load's own fetching goes through the proxy, where every byte
is counted: a resumed load must not fetch again what it already had. A downloaded big part
joins the cache as every entry does: bound to its small part, counted for the LRU limit, and a
CDN object of another version is refused before a byte of it moves.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from azaiond import crypto
from azaiond.cdn import SMALL_SHA256
from azaiond.client import Client
from azaiond.resources import small_size
from tests.faultproxy import Fault, FaultProxy, Match
from tests.fixtures_daemon import DaemonHandle
from tests.support.devstack import DevStack

FOLDER = "cold-models"
MIB = 1024 * 1024
SIZE = 6 * MIB + 12345  # seven 1 MiB ranges, the last one short
HEADS = 64 * 1024  # room for the HTTP response heads the proxy also counts
BOUND = b"the small part itself"  # publish(bound_to=BOUND): the big part names its own small part


@pytest.fixture
def start(
    clean_stack: DevStack, s3_proxy: FaultProxy, azaiond_factory: Callable[..., DaemonHandle]
) -> Callable[..., DaemonHandle]:
    clean_stack.ensure_bucket(FOLDER)

    def start(name: str = "cold", **overrides: Any) -> DaemonHandle:
        cdn = {"endpoint": s3_proxy.url, "range_mb": 1, "parallel": 3, "retries": 1}
        overrides = {"cdn": cdn, **overrides}
        d = azaiond_factory(config_writer=clean_stack.write_config, overrides=overrides, name=name)
        login = {"email": clean_stack.admin.email, "password": clean_stack.admin.password}
        assert "result" in d.call("login", login)
        return d

    return start


def publish(stack: DevStack, name: str, bound_to: bytes | None = None) -> str:
    """A v1 resource of SIZE random bytes on the API and the CDN; returns its sha256.

    With ``bound_to``, the big part carries that small part's fingerprint as an upload sets it
    (pass the real small part via ``BOUND``, or any other bytes for a big part of another version).
    """
    plain = os.urandom(SIZE)
    ct = crypto.encrypt_bytes(plain, crypto.aes_key(stack.resource_key))
    cut = small_size(len(ct), 3)
    small = ct[:cut]
    stack.refserver.put_part(FOLDER, f"{name}.small", small)
    metadata = {}
    if bound_to is not None:
        metadata[SMALL_SHA256] = hashlib.sha256(small if bound_to is BOUND else bound_to).hexdigest()
    stack.s3_admin_client().put_object(Bucket=FOLDER, Key=f"{name}.big", Body=ct[cut:], Metadata=metadata)
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


def cut_at_60_percent(s3_proxy: FaultProxy, name: str) -> None:
    """Four of seven ranges pass; the next three are cut half-way; every later GET gets 503."""
    s3_proxy.set(Fault.passthrough(), gets(name), times=4)
    s3_proxy.add(Fault.cut(after=MIB // 2), gets(name), times=3)
    s3_proxy.add(Fault.answer(503), gets(name))


def test_cut_load_resumes_after_a_restart(
    start: Callable[..., DaemonHandle], clean_stack: DevStack, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    name = "resume.bin"
    digest = publish(clean_stack, name)
    big = big_size(name, clean_stack)
    d = start()
    cut_at_60_percent(s3_proxy, name)
    reply = load(d, name, tmp_path / "first")
    assert reply["error"]["data"]["kind"] == "cdn", reply
    partial = d.state_dir / "partial" / FOLDER
    assert (partial / f"{name}.big.part.json").exists()
    assert not (d.state_dir / "cache" / FOLDER / f"{name}.big").exists()
    first = s3_proxy.bytes_down
    assert first > 0.5 * big
    d.stop()

    s3_proxy.clear()
    d = start()  # same name: the same state dir
    reply = load(d, name, tmp_path / "second")
    assert reply["result"]["sha256"] == digest
    assert hashlib.sha256((tmp_path / "second").read_bytes()).hexdigest() == digest
    fetched_twice = s3_proxy.bytes_down - big
    assert fetched_twice < 0.1 * big, f"{fetched_twice} bytes fetched twice"
    assert s3_proxy.bytes_down - first < big - first + HEADS + 0.1 * big
    assert list(partial.iterdir()) == []  # the partial file became the cache entry
    assert (d.state_dir / "cache" / FOLDER / f"{name}.big").stat().st_size == big


def test_cut_ranges_are_retried_within_one_load(
    start: Callable[..., DaemonHandle], clean_stack: DevStack, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    name = "retry.bin"
    digest = publish(clean_stack, name)
    big = big_size(name, clean_stack)
    d = start()
    s3_proxy.set(Fault.cut(after=300_000), gets(name), times=3)
    reply = load(d, name, tmp_path / "out")
    assert reply["result"]["sha256"] == digest, reply
    assert s3_proxy.faulted == 3
    assert s3_proxy.bytes_down < big + HEADS  # each retry asked only for the missing bytes


def test_concurrent_loads_of_a_missing_big_part_fetch_it_once(
    start: Callable[..., DaemonHandle], clean_stack: DevStack, s3_proxy: FaultProxy, tmp_path: Path
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
    assert s3_proxy.count("GET", f"/{FOLDER}/{name}.big") == 7
    assert s3_proxy.bytes_down < big + HEADS


# -- the downloaded big part is a cache entry like any other ----------------------------------


def test_cold_load_is_bound_accounted_and_reports_the_cdn_phase(
    start: Callable[..., DaemonHandle], clean_stack: DevStack, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    name = "bound.bin"
    digest = publish(clean_stack, name, bound_to=BOUND)
    big = big_size(name, clean_stack)
    small = clean_stack.refserver.get_part(FOLDER, f"{name}.small")
    assert small is not None
    d = start()
    seen: list[tuple[int, int | None]] = []
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with Client(str(d.socket_path), timeout=60) as client:
            result = client.call("load", {"name": name, "folder": FOLDER}, fd=out,
                                 progress=lambda done, total: seen.append((done, total)))
    finally:
        os.close(out)
    assert result["sha256"] == digest
    # Progress covered the CDN phase: the big part's size as total, rising to it.
    assert seen and all(total == big for _, total in seen), seen
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert seen[-1] == (big, big)
    # Installed bound to the small part, and counted.
    side = json.loads((d.state_dir / "cache" / FOLDER / f"{name}.big.meta").read_text())
    assert side == {"small_sha256": hashlib.sha256(small).hexdigest(), "big_size": big}
    listed = d.call("cache_list")["result"]
    assert [(e["folder"], e["name"], e["size"]) for e in listed["entries"]] == [(FOLDER, name, big)]
    assert d.call("status")["result"]["cache_bytes"] == big
    # The next load is a hit: no GET, and progress counts bytes written again.
    gets_before = s3_proxy.count("GET", f"/{FOLDER}/{name}.big")
    reply = load(d, name, tmp_path / "again")
    assert reply["result"]["sha256"] == digest
    assert s3_proxy.count("GET", f"/{FOLDER}/{name}.big") == gets_before


def test_cdn_object_of_another_version_is_stale_before_any_byte(
    start: Callable[..., DaemonHandle], clean_stack: DevStack, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    name = "other.bin"
    publish(clean_stack, name, bound_to=b"some other small part")
    d = start()
    reply = load(d, name, tmp_path / "out")
    assert reply["error"]["data"]["kind"] == "stale", reply
    assert (tmp_path / "out").stat().st_size == 0
    assert s3_proxy.count("GET", f"/{FOLDER}/{name}.big") == 0  # the HEAD was enough
    assert not list((d.state_dir / "partial").rglob("*.part*"))
    assert not (d.state_dir / "cache" / FOLDER / f"{name}.big").exists()


def test_partial_files_are_no_entries_but_count_against_the_limit(
    start: Callable[..., DaemonHandle], clean_stack: DevStack, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    first, second = "first.bin", "second.bin"
    digests = {n: publish(clean_stack, n, bound_to=BOUND) for n in (first, second)}
    d = start(resources={"cache_max_mb": 10})  # room for one big part (~6 MiB), not two
    cut_at_60_percent(s3_proxy, first)
    assert load(d, first, tmp_path / "cut")["error"]["data"]["kind"] == "cdn"
    part = d.state_dir / "partial" / FOLDER / f"{first}.big.part"
    assert part.exists() and (part.parent / f"{first}.big.part.json").exists()
    assert d.call("cache_list")["result"]["entries"] == []  # a partial file is not an entry
    assert d.call("cache_drop")["result"] == {"dropped": 0, "freed_bytes": 0}
    assert part.exists()  # nor dropped as one

    s3_proxy.clear()
    # The second big part and the first's partial file would pass the limit together: the
    # idle partial file goes (nothing is cached to evict).
    assert load(d, second, tmp_path / "second")["result"]["sha256"] == digests[second]
    assert not part.exists() and not (part.parent / f"{first}.big.part.json").exists()
    # A fetched entry is evicted like any other once the next one needs its room.
    assert load(d, first, tmp_path / "first")["result"]["sha256"] == digests[first]
    names = [e["name"] for e in d.call("cache_list")["result"]["entries"]]
    assert names == [first]
