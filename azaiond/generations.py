"""The rollback guard's memory: the highest v2 generation this host has seen per resource.

Kept in ``<state>/generations.json`` as ``{"<folder>/<name>": generation}``, rewritten atomically
(temp file, fsync, rename) on every raise, so it survives restarts and a crash never leaves half
a file. The file is input the daemon did not necessarily write: anything unreadable in it is
logged once and treated as empty, never a reason to stop. A bad entry is dropped on its own.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from azaiond.errors import StorageError
from azaiond.fsutil import atomic_write

log = logging.getLogger(__name__)

MAX_GENERATION = (1 << 64) - 1


def _key(folder: str, name: str) -> str:
    return f"{folder}/{name}"


class Generations:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: dict[str, int] | None = None  # read on first use

    def _table(self) -> dict[str, int]:
        if self._seen is None:
            self._seen = self._read()
        return self._seen

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring an unreadable generation record in %s (%s)", self.path, type(exc).__name__)
            return {}
        if not isinstance(data, dict):
            log.warning("ignoring a generation record in %s that is not a mapping", self.path)
            return {}
        table: dict[str, int] = {}
        for key, value in data.items():
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_GENERATION:
                table[key] = value
        if len(table) != len(data):
            log.warning("ignoring %d bad entries in %s", len(data) - len(table), self.path)
        return table

    def highest(self, folder: str, name: str) -> int | None:
        with self._lock:
            return self._table().get(_key(folder, name))

    def record(self, folder: str, name: str, generation: int) -> None:
        """Remember ``generation`` if it is higher than what is known; persisted before returning."""
        with self._lock:
            table = self._table()
            key = _key(folder, name)
            if table.get(key, -1) >= generation:
                return
            table[key] = generation
            text = json.dumps(table, sort_keys=True).encode("utf-8")
            try:
                atomic_write(self.path, text, mode=0o600)
            except OSError as exc:
                raise StorageError(f"cannot record the generation in {self.path}: {exc.strerror}") from exc
