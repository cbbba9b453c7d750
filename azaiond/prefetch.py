"""The background prefetch of ``resources.prefetch``: warm the cache once the daemon is logged in.

After each successful login the listed big parts are fetched into the cache (or confirmed
there), one after another on one thread, so a host is warm before its first model load. A
failure is logged and the next login tries again; a login while a run is under way asks for one
more run after it, never two runs at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from azaiond.errors import AzaionError
from azaiond.resources import SplitResources

log = logging.getLogger(__name__)


class Prefetcher:
    def __init__(self, resources: SplitResources, items: Sequence[tuple[str, str]]) -> None:
        self._resources = resources
        self.items: tuple[tuple[str, str], ...] = tuple(items)
        self._lock = threading.Lock()
        self._running = False
        self._again = False
        self._stop = threading.Event()
        self.done = threading.Event()  # set after each complete run (tests and status wait on it)

    def kick(self, *_: object) -> None:
        """Start a run (or ask for another after the current one)."""
        if not self.items or self._stop.is_set():
            return
        with self._lock:
            if self._running:
                self._again = True
                return
            self._running = True
            self.done.clear()
        threading.Thread(target=self._run, name="prefetch", daemon=True).start()

    def replace(self, items: Sequence[tuple[str, str]]) -> None:
        """A new list (a live reload); it is fetched on the next kick."""
        self.items = tuple(items)

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            for folder, name in self.items:
                if self._stop.is_set():
                    break
                try:
                    size = self._resources.prefetch(name, folder)
                    log.info("prefetched %s/%s (%d bytes in the cache)", folder, name, size)
                except AzaionError as exc:
                    log.warning("prefetch of %s/%s failed: %s: %s", folder, name, exc.kind, exc.message)
                except Exception:  # a bug must not kill the thread silently
                    log.exception("prefetch of %s/%s failed", folder, name)
            with self._lock:
                if not self._again or self._stop.is_set():
                    self._running = False
                    self.done.set()
                    return
                self._again = False
