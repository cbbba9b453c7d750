"""Counters, gauges and histograms since the daemon started, as JSON and as Prometheus text.

Services feed this through a few plain methods (``observe_call``, ``add_bytes``, ``api_latency``,
``cdn_latency``, ``unlock_finished``), and counters and gauges they keep themselves are read
when metrics are asked for (``cache_counts``, ``gauge``). Nothing here knows the RPC layer (the
wiring hands ``observe_call`` to the dispatcher, which calls it with each finished call). Every
update takes one uncontended lock for a few dict operations, so feeding costs well under a
microsecond; the text is built only when someone asks for it.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Seconds; the API's requests take milliseconds to seconds, CDN transfers up to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
LOAD_METHODS = frozenset({"load", "api_load", "cdn_download"})
UPLOAD_METHODS = frozenset({"upload", "api_upload", "cdn_upload"})
BYTE_KINDS = ("loaded", "uploaded", "cdn_fetched")
CACHE_EVENTS = ("hits", "misses", "evictions")

Gauge = Callable[[], float | None]


class FinishedCall(Protocol):
    """What ``observe_call`` reads of a finished call (the dispatcher's record has it)."""

    @property
    def method(self) -> str: ...
    @property
    def kind(self) -> str | None: ...
    @property
    def facts(self) -> Mapping[str, Any]: ...


class Histogram:
    """Cumulative-bucket histogram, as Prometheus wants it."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def as_dict(self) -> dict[str, Any]:
        cumulative, running = {}, 0
        for bound, n in zip((*map(_num, self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            cumulative[bound] = running
        return {"count": self.count, "sum": self.sum, "buckets": cumulative}


def _num(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value)) + ".0"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str], int] = {}
        self._bytes = dict.fromkeys(BYTE_KINDS, 0)
        self._cache = dict.fromkeys(CACHE_EVENTS, 0)
        self._api = Histogram()
        self._cdn = Histogram()
        self._unlock_runs: dict[str, int] = {}
        self._unlock_last: tuple[str, float] | None = None
        self._gauges: dict[str, tuple[str, Gauge]] = {}
        self._cache_counts: Callable[[], Mapping[str, int]] | None = None

    # -- feeding ----------------------------------------------------------------------------

    def observe_call(self, record: FinishedCall) -> None:
        """One finished call, as the dispatcher's observer: ``kind`` None on success. Facts
        "bytes" and "cache" move the byte and cache counters.

        Called on the event loop only (the dispatcher's observers run there), so the call
        counts need no lock: one writer, and readers copy the dict in one step.
        """
        kind = record.kind
        key = (record.method, kind or "ok")
        calls = self._calls
        calls[key] = calls.get(key, 0) + 1
        facts = record.facts
        if kind is None and facts:
            method = record.method
            moved = facts.get("bytes")
            cache = facts.get("cache")
            with self._lock:
                if type(moved) is int:
                    if method in LOAD_METHODS:
                        self._bytes["loaded"] += moved
                    elif method in UPLOAD_METHODS:
                        self._bytes["uploaded"] += moved
                if cache == "hit":
                    self._cache["hits"] += 1
                elif cache == "miss":
                    self._cache["misses"] += 1

    def add_bytes(self, what: str, count: int) -> None:
        with self._lock:
            self._bytes[what] = self._bytes.get(what, 0) + count

    def api_latency(self, seconds: float) -> None:
        with self._lock:
            self._api.observe(seconds)

    def cdn_latency(self, seconds: float) -> None:
        with self._lock:
            self._cdn.observe(seconds)

    def unlock_finished(self, outcome: str, seconds: float) -> None:
        with self._lock:
            self._unlock_runs[outcome] = self._unlock_runs.get(outcome, 0) + 1
            self._unlock_last = (outcome, seconds)

    def cache_counts(self, read: Callable[[], Mapping[str, int]]) -> None:
        """Cache counters the cache keeps itself (evictions), read when metrics are asked for."""
        self._cache_counts = read

    def gauge(self, name: str, help_text: str, read: Gauge) -> None:
        """A value read when metrics are asked for (cache size, token expiry); None: absent."""
        self._gauges[name] = (help_text, read)

    # -- reading ----------------------------------------------------------------------------

    def _gauge_values(self) -> dict[str, float]:
        out: dict[str, float] = {"uptime_seconds": round(self._clock() - self._started, 3)}
        for name, (_, read) in self._gauges.items():
            try:
                value = read()
            except Exception:
                log.exception("metrics: gauge %s failed", name)
                continue
            if value is not None:
                out[name] = value
        return out

    def snapshot(self) -> dict[str, Any]:
        """Everything as one JSON-able object (the ``metrics`` method's result, without text)."""
        gauges = self._gauge_values()
        counted = self._calls.copy()  # one step under the GIL: safe against the loop's updates
        cache = dict(self._cache)
        if self._cache_counts is not None:
            cache.update(self._cache_counts())
        with self._lock:
            calls: dict[str, dict[str, int]] = {}
            for (method, kind), n in sorted(counted.items()):
                calls.setdefault(method, {})[kind] = n
            last = self._unlock_last
            return {
                "calls": calls,
                "bytes": dict(self._bytes),
                "cache": cache,
                "latency_seconds": {"api": self._api.as_dict(), "cdn": self._cdn.as_dict()},
                "unlock": {
                    "runs": dict(self._unlock_runs),
                    "last_outcome": last[0] if last else None,
                    "last_duration_seconds": last[1] if last else None,
                },
                "gauges": gauges,
            }

    def text(self, snapshot: Mapping[str, Any] | None = None) -> str:
        """Prometheus text exposition format 0.0.4."""
        snap = snapshot if snapshot is not None else self.snapshot()
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP azaiond_{name} {help_text}")
            out.append(f"# TYPE azaiond_{name} {kind}")

        family("calls_total", "counter", "Finished calls by method and outcome (ok or the error kind).")
        for method, kinds in snap["calls"].items():
            for kind, n in kinds.items():
                out.append(f'azaiond_calls_total{{method="{_label(method)}",kind="{_label(kind)}"}} {n}')
        family("bytes_total", "counter", "Plaintext bytes loaded and uploaded, ciphertext fetched from the CDN.")
        for what, n in snap["bytes"].items():
            out.append(f'azaiond_bytes_total{{direction="{_label(what)}"}} {n}')
        family("cache_events_total", "counter", "Big-part cache hits, misses and evictions.")
        for what, n in snap["cache"].items():
            out.append(f'azaiond_cache_events_total{{event="{_label(what)}"}} {n}')
        for upstream, hist in snap["latency_seconds"].items():
            name = f"{upstream}_request_seconds"
            family(name, "histogram", f"Latency of requests to the {upstream.upper()}.")
            for bound, n in hist["buckets"].items():
                out.append(f'azaiond_{name}_bucket{{le="{bound}"}} {n}')
            out.append(f"azaiond_{name}_sum {hist['sum']!r}")
            out.append(f"azaiond_{name}_count {hist['count']}")
        family("unlock_runs_total", "counter", "Finished unlock runs by outcome.")
        for outcome, n in snap["unlock"]["runs"].items():
            out.append(f'azaiond_unlock_runs_total{{outcome="{_label(outcome)}"}} {n}')
        if snap["unlock"]["last_duration_seconds"] is not None:
            family("unlock_last_duration_seconds", "gauge", "Duration of the last finished unlock run.")
            out.append(f"azaiond_unlock_last_duration_seconds {snap['unlock']['last_duration_seconds']!r}")
        for name, value in snap["gauges"].items():
            help_text = self._gauges[name][0] if name in self._gauges else "Seconds since the daemon started."
            family(name, "gauge", help_text)
            out.append(f"azaiond_{name} {value!r}")
        return "\n".join(out) + "\n"

    def write_textfile(self, path: Path) -> None:
        """The text, atomically, for node_exporter's textfile collector (temp file, rename)."""
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.text())
            os.replace(temp, path)
        except OSError as exc:
            log.warning("metrics: cannot write %s: %s", path, exc.strerror or exc)
            with contextlib.suppress(OSError):
                temp.unlink()


class TextfileWriter:
    """Writes the metrics text to a node_exporter textfile path every ``interval`` seconds."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def configure(self, path: Path | None, interval: float) -> None:
        """(Re)start with ``path`` (None: stop writing); called at start and on reload."""
        self.stop()
        if path is None:
            return
        self._stop = threading.Event()
        stop = self._stop

        def run() -> None:
            while True:
                self._metrics.write_textfile(path)
                if stop.wait(interval):
                    return

        self._thread = threading.Thread(target=run, name="metrics-textfile", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
