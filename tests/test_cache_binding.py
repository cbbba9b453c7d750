"""Cache binding: a big part is served only with the small part it was written with.

Engine-level tests (real reference API, real moto) count the CDN GETs; the republish test runs
two daemon processes with their own state dirs, as two hosts would.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import pytest

from azaiond.cache import BigPartCache
from azaiond.cdn import SMALL_SHA256
from azaiond.errors import Stale, UpstreamError
from tests.fixtures_daemon import DaemonHandle
from tests.fixtures_engine import FOLDER, Engine
from tests.fixtures_stack import unique_name
from tests.support.devstack import DevStack


def _sidecar(eng: Engine, name: str) -> Any:
    return eng.state_dir / "cache" / FOLDER / f"{name}.big.meta"


def test_upload_tags_the_big_part_with_the_small_parts_fingerprint(engine: Engine, stack: DevStack) -> None:
    s3 = stack.s3_admin_client()
    for size in (100_000, 9 * 1024 * 1024):  # one PUT, and a multipart upload
        name = unique_name("tag") + ".bin"
        engine.upload_bytes(name, os.urandom(size))
        small = stack.refserver.get_part(FOLDER, f"{name}.small")
        assert small is not None
        digest = hashlib.sha256(small).hexdigest()
        head = s3.head_object(Bucket=FOLDER, Key=f"{name}.big")
        assert head["Metadata"] == {SMALL_SHA256: digest}
        side = json.loads(_sidecar(engine, name).read_text())
        assert side == {"small_sha256": digest, "big_size": head["ContentLength"]}


def test_entry_without_fingerprint_is_refetched_once(engine: Engine) -> None:
    data = os.urandom(150_000)
    engine.upload_bytes("legacy.bin", data)
    _sidecar(engine, "legacy.bin").unlink()  # as cached before the binding existed
    cache = engine.resources.cache
    assert engine.load_bytes("legacy.bin") == data
    assert len(engine.gets) == 1
    assert (cache.hits, cache.misses) == (0, 1)
    assert _sidecar(engine, "legacy.bin").exists()
    out = io.BytesIO()
    assert engine.resources.load("legacy.bin", FOLDER, out).cache_hit is True
    assert out.getvalue() == data
    assert len(engine.gets) == 1  # bound now: a hit
    assert (cache.hits, cache.misses) == (1, 1)


BAD_SIDECARS = [
    b"",
    b"\x00\xff garbage",
    b'{"small_sha256": "ab',  # truncated
    b"[]",
    b'{"small_sha256": 7, "big_size": 1}',
    b'{"small_sha256": "' + b"A" * 64 + b'", "big_size": 1}',  # upper case is not ours
    b'{"small_sha256": "' + b"0" * 64 + b'", "big_size": true}',
    b"x" * 10_000,
]


@pytest.mark.parametrize("content", BAD_SIDECARS, ids=range(len(BAD_SIDECARS)))
def test_unusable_sidecar_means_stale_and_is_logged_once(
    engine: Engine, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(60_000)
    name = unique_name("side") + ".bin"
    engine.upload_bytes(name, data)
    side = _sidecar(engine, name)
    side.write_bytes(content)
    caplog.set_level(logging.WARNING, logger="azaiond.cache")
    assert engine.load_bytes(name) == data
    assert len(engine.gets) == 1
    assert engine.load_bytes(name) == data
    assert len(engine.gets) == 1
    warnings = [r for r in caplog.records if "sidecar" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "password" not in warnings[0].getMessage()
    side.write_bytes(content)  # broken again after the refetch: one more line, however often read
    for _ in range(3):
        assert engine.resources.cache.fingerprint(FOLDER, name) is None
    assert len([r for r in caplog.records if "sidecar" in r.getMessage()]) == 2


def test_sidecar_of_another_size_is_stale(tmp_path: Any) -> None:
    cache = BigPartCache(tmp_path)
    staged = cache.staging("models", "a.bin")
    staged.write_bytes(b"x" * 100)
    cache.install("models", "a.bin", "0" * 64, staged)
    assert cache.fingerprint("models", "a.bin") == "0" * 64
    with open(cache.path("models", "a.bin"), "ab") as f:
        f.write(b"more")
    assert cache.fingerprint("models", "a.bin") is None


def test_cached_entry_of_another_version_is_never_served(
    engine: Engine, make_engine: Callable[..., Engine], stack: DevStack
) -> None:
    first, second = os.urandom(200_000), os.urandom(200_000)
    engine.upload_bytes("repub.bin", first)
    other = make_engine(state="publisher")
    other.upload_bytes("repub.bin", second)  # republished from elsewhere: engine's cache is old
    assert engine.load_bytes("repub.bin") == second
    assert len(engine.gets) == 1


def test_cdn_left_behind_is_stale(engine: Engine, make_engine: Callable[..., Engine], stack: DevStack) -> None:
    s3 = stack.s3_admin_client()
    engine.upload_bytes("behind.bin", os.urandom(120_000))
    old = s3.get_object(Bucket=FOLDER, Key="behind.bin.big")
    old_body, old_meta = old["Body"].read(), old["Metadata"]
    make_engine(state="publisher").upload_bytes("behind.bin", os.urandom(120_000))
    s3.put_object(Bucket=FOLDER, Key="behind.bin.big", Body=old_body, Metadata=old_meta)
    cold = make_engine(state="cold")
    for eng in (engine, cold):  # with an old entry, and with none
        out = io.BytesIO()
        with pytest.raises(Stale) as err:
            eng.resources.load("behind.bin", FOLDER, out)
        assert err.value.kind == "stale" and err.value.code == -32015
        assert out.getvalue() == b""
    assert not (cold.state_dir / "cache" / FOLDER / "behind.bin.big").exists()


# -- two daemons, as two hosts ---------------------------------------------------------------


def _ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in reply, reply
    result: dict[str, Any] = reply["result"]
    return result


def test_republish_from_a_second_daemon(
    clean_stack: DevStack, azaiond_factory: Callable[..., DaemonHandle]
) -> None:
    stack = clean_stack
    stack.ensure_bucket(FOLDER)
    hosts = []
    for _ in range(2):
        d = azaiond_factory(config_writer=stack.write_config)
        _ok(d.call("login", {"email": stack.admin.email, "password": stack.admin.password}))
        hosts.append(d)
    a, b = hosts
    name = unique_name("two") + ".bin"
    v1, v2, v3 = (os.urandom(300_000) for _ in range(3))

    def upload(d: DaemonHandle, data: bytes) -> None:
        _ok(d.call("upload", {"name": name, "folder": FOLDER, "data": base64.b64encode(data).decode()}, timeout=60))

    def load(d: DaemonHandle) -> dict[str, Any]:
        return d.call("load", {"name": name, "folder": FOLDER}, timeout=60)

    upload(a, v1)
    assert base64.b64decode(_ok(load(a))["data"]) == v1
    upload(b, v2)
    assert base64.b64decode(_ok(load(a))["data"]) == v2  # a's cached v1 is not served

    s3 = stack.s3_admin_client()
    kept = s3.get_object(Bucket=FOLDER, Key=f"{name}.big")
    v2_big, v2_meta = kept["Body"].read(), kept["Metadata"]
    upload(b, v3)
    s3.put_object(Bucket=FOLDER, Key=f"{name}.big", Body=v2_big, Metadata=v2_meta)  # the CDN left behind
    reply = load(a)
    assert reply["error"]["code"] == -32015 and reply["error"]["data"]["kind"] == "stale", reply
    assert "data" not in reply.get("result", {})
    # B's cache holds v3 itself: bound to the current small part, it needs no CDN.
    assert base64.b64decode(_ok(load(b))["data"]) == v3


def test_republish_that_fails_half_way(
    engine: Engine, make_engine: Callable[..., Engine], stack: DevStack
) -> None:
    """The new big part reached the CDN, the new small part never reached the API."""
    old = os.urandom(150_000)
    engine.upload_bytes("half.bin", old)
    publisher = make_engine(state="publisher", retries=0)
    stack.refserver.fail_next(1, f"/resources/{FOLDER}", status=500)
    with pytest.raises(UpstreamError):
        publisher.upload_bytes("half.bin", os.urandom(150_000))
    assert not (publisher.state_dir / "cache" / FOLDER / "half.bin.big").exists()
    assert engine.load_bytes("half.bin") == old  # its entry is bound to the small part still served
    assert engine.gets == []
    cold = make_engine(state="cold")
    with pytest.raises(Stale):
        cold.load_bytes("half.bin")  # instead of old head + new tail


def _put(cache: BigPartCache, name: str, size: int) -> None:
    staged = cache.staging("models", name)
    staged.write_bytes(b"x" * size)
    with cache.flight("models", name):
        cache.install("models", name, "0" * 64, staged)


def test_lru_order_pins_and_room(tmp_path: Any) -> None:
    cache = BigPartCache(tmp_path, limit_bytes=1000)
    _put(cache, "a", 400)
    _put(cache, "b", 400)
    cache.touch("models", "a")  # b is now the least recently used
    with cache.pinned("models", "b"):
        _put(cache, "c", 400)  # over the limit: b is pinned, so a goes although it is newer
        assert {e.name for e in cache.entries()} == {"b", "c"}
        assert cache.evict(room=900) == 1  # c goes; the pinned b stays
        assert {e.name for e in cache.entries()} == {"b"}
    assert cache.total_bytes == 400 and cache.evictions == 2
    assert not cache.sidecar("models", "a").exists() and not cache.path("models", "a").exists()
    cache.set_limit(100)  # lowered (a reload): b is no longer in use, so it goes
    assert cache.entries() == [] and cache.total_bytes == 0
    assert BigPartCache(tmp_path).total_bytes == 0  # a fresh scan agrees with the index
