"""The metrics method against the real daemon: counters move by exactly the calls made."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from azaiond.metrics import Histogram, Metrics
from tests.fixtures_daemon import DaemonHandle
from tests.fixtures_stack import unique_name
from tests.support.devstack import DevStack
from tests.support.polling import wait_until

Factory = Callable[..., DaemonHandle]


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert "result" in reply, reply
    result: dict[str, Any] = reply["result"]
    return result


def calls(snapshot: dict[str, Any], method: str, kind: str = "ok") -> int:
    value: int = snapshot["calls"].get(method, {}).get(kind, 0)
    return value


def test_counters_move_by_exactly_the_calls_made(
    clean_stack: DevStack, azaiond_factory: Factory, tmp_path: Path
) -> None:
    folder = unique_name("metrics")
    clean_stack.ensure_bucket(folder)
    textfile = tmp_path / "azaiond.prom"
    d = azaiond_factory(config_writer=clean_stack.write_config,
                        overrides={"metrics": {"textfile": str(textfile), "textfile_interval": 1}})
    payload = b"metrics " * 1000
    before = ok(d.call("metrics"))
    for _ in range(5):
        ok(d.call("health"))
    ok(d.call("status"))
    ok(d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password}))
    ok(d.call("upload", {"name": "m.bin", "folder": folder, "data": base64.b64encode(payload).decode()}))
    for _ in range(2):
        assert base64.b64decode(ok(d.call("load", {"name": "m.bin", "folder": folder}))["data"]) == payload
    assert ok(d.call("cache_drop", {"folder": folder}))["dropped"] == 1
    assert base64.b64decode(ok(d.call("load", {"name": "m.bin", "folder": folder}))["data"]) == payload
    assert d.call("load", {"name": "absent.bin", "folder": folder})["error"]["data"]["kind"] == "not_found"
    assert d.call("load", {"name": "m.bin"})["error"]["data"]["kind"] == "invalid_params"
    after = ok(d.call("metrics"))

    expected = {("health", "ok"): 5, ("status", "ok"): 1, ("login", "ok"): 1, ("upload", "ok"): 1,
                ("load", "ok"): 3, ("cache_drop", "ok"): 1,
                ("load", "not_found"): 1, ("load", "invalid_params"): 1, ("metrics", "ok"): 1}
    seen = {(m, k) for m, kinds in after["calls"].items() for k in kinds} | set(expected)
    for method, kind in seen:
        moved = calls(after, method, kind) - calls(before, method, kind)
        assert moved == expected.get((method, kind), 0), (method, kind, moved)
    assert after["bytes"]["loaded"] - before["bytes"]["loaded"] == 3 * len(payload)
    # The load after the drop fetched the big part (all but the small part) from the CDN.
    assert after["bytes"]["cdn_fetched"] - before["bytes"]["cdn_fetched"] >= len(payload) - 3 * 1024
    assert after["bytes"]["uploaded"] - before["bytes"]["uploaded"] == len(payload)
    assert after["cache"]["hits"] - before["cache"]["hits"] == 2  # upload leaves the entry cached
    assert after["cache"]["misses"] - before["cache"]["misses"] == 1
    assert after["latency_seconds"]["api"]["count"] > before["latency_seconds"]["api"]["count"]
    assert after["latency_seconds"]["cdn"]["count"] > before["latency_seconds"]["cdn"]["count"]
    assert after["gauges"]["cache_bytes"] >= len(payload) - 3 * 1024  # the big part: all but the small
    assert 0 < after["gauges"]["token_expiry_seconds"] <= 3600 * 24
    assert after["gauges"]["uptime_seconds"] > before["gauges"]["uptime_seconds"]

    text = after["text"]
    assert 'azaiond_calls_total{method="health",kind="ok"} ' in text
    line = re.search(r'^azaiond_calls_total\{method="load",kind="not_found"\} (\d+)$', text, re.M)
    assert line is not None and int(line.group(1)) == calls(after, "load", "not_found")
    for sample in (x for x in text.splitlines() if not x.startswith("#")):
        assert re.fullmatch(r'azaiond_[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+-]+', sample), sample

    assert wait_until(textfile.exists)
    assert textfile.read_text().startswith("# HELP azaiond_calls_total")
    d.stop()


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    assert h.as_dict() == {"count": 4, "sum": 2.65, "buckets": {"0.1": 2, "1.0": 3, "+Inf": 4}}
    m = Metrics()
    m.unlock_finished("ready", 1.5)
    m.cache_counts(lambda: {"evictions": 3})
    text = m.text()
    assert 'azaiond_unlock_runs_total{outcome="ready"} 1' in text
    assert "azaiond_unlock_last_duration_seconds 1.5" in text
    assert 'azaiond_cache_events_total{event="evictions"} 3' in text
    m.cache_counts(lambda: {"evictions": 5})  # read when asked for: the latest source counts
    assert m.snapshot()["cache"]["evictions"] == 5
