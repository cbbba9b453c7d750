"""The per-call log line: a CallObserver the wiring hands to the dispatcher.

Every failed call is logged once at warning (method, peer uid and pid, kind, resource);
every successful call that moved bytes at info (bytes, cache hit or miss, seconds). Quick
successful calls (health, status) are not logged, so the hot path stays quiet and cheap.
Only ``CallRecord.facts`` is read, which handlers fill with names and counts, never secrets.
Under journald each line carries them as fields (``AZAION_METHOD``, ``AZAION_KIND``, ...: logs.py).
A peer that fails calls in a flood is summarised: past a burst of lines per second, the
rest of that second is counted and reported in one line.
"""

from __future__ import annotations

import logging
import time

from azaiond.rpc.table import CallRecord

log = logging.getLogger("azaiond.calls")

BURST = 50  # failure lines per second before they are only counted


class CallLog:
    """Writes one line per failed call and per successful byte-moving call."""

    def __init__(self, logger: logging.Logger = log, burst: int = BURST) -> None:
        self._log = logger
        self._burst = burst
        self._second = 0
        self._lines = 0
        self._dropped = 0

    def __call__(self, record: CallRecord) -> None:
        facts = record.facts
        if record.kind is None:
            if "bytes" in facts and self._log.isEnabledFor(logging.INFO):
                cache = facts.get("cache")
                self._log.info(
                    "%s %s: %d bytes%s in %.3f s (uid %d pid %d)",
                    record.method,
                    facts.get("resource", "-"),
                    facts["bytes"],
                    f", cache {cache}" if cache else "",
                    record.seconds,
                    record.peer.uid,
                    record.peer.pid,
                    extra={"fields": self._fields("call", record)},
                )
            return
        if not self._admit():
            return
        resource = facts.get("resource")
        self._log.warning(
            "%s failed: %s%s after %.3f s (uid %d pid %d)",
            record.method,
            record.kind,
            f" on {resource}" if resource else "",
            record.seconds,
            record.peer.uid,
            record.peer.pid,
            extra={"fields": self._fields("call_failed", record)},
        )

    @staticmethod
    def _fields(event: str, record: CallRecord) -> dict[str, object]:
        """The journal fields of the line (logs.py maps them to AZAION_* names)."""
        facts = record.facts
        return {
            "event": event,
            "method": record.method,
            "uid": record.peer.uid,
            "pid": record.peer.pid,
            "kind": record.kind,
            "resource": facts.get("resource"),
            "bytes": facts.get("bytes"),
            "cache": facts.get("cache"),
            "seconds": round(record.seconds, 6),
        }

    def _admit(self) -> bool:
        second = int(time.monotonic())
        if second != self._second:
            if self._dropped:
                self._log.warning("%d more failed call(s) not logged one by one", self._dropped)
            self._second, self._lines, self._dropped = second, 0, 0
        if self._lines >= self._burst:
            self._dropped += 1
            return False
        self._lines += 1
        return True
