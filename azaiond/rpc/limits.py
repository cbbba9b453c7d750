"""What one peer may take of the transport, and a log that cannot be flooded.

The transport's limits (docs/security.md): connections per uid and in all, unfinished-message
bytes in all, an idle deadline between messages and a stall deadline on every write. root
(uid 0) is counted against none of them: it is bounded by the unit's own limits only, so a
member who fills every slot still leaves root a way in.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

ROOT = 0


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 256  # open connections of all non-root peers together
    max_connections_per_uid: int = 32
    max_buffered_bytes: int = 96 * 1024 * 1024  # unfinished-message bytes, all non-root peers
    idle_timeout: float = 300.0  # seconds a connection may go without a complete message
    stall_timeout: float = 30.0  # seconds a reply may wait for the peer to read


class ConnectionCounts:
    """Open connections per uid and in all (root not counted); one call per accepted socket."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self._limits = limits
        self._per_uid: dict[int, int] = {}
        self.total = 0

    def set_limits(self, limits: ConnectionLimits) -> None:
        self._limits = limits

    def admit(self, uid: int) -> str | None:
        """Count a new connection of ``uid``; or, past a limit, say which (and count nothing)."""
        if uid == ROOT:
            return None
        mine = self._per_uid.get(uid, 0)
        if mine >= self._limits.max_connections_per_uid:
            return f"uid {uid} has {mine} connections open (socket.max_connections_per_uid)"
        if self.total >= self._limits.max_connections:
            return f"{self.total} connections open (socket.max_connections)"
        self._per_uid[uid] = mine + 1
        self.total += 1
        return None

    def release(self, uid: int) -> None:
        if uid == ROOT:
            return
        left = self._per_uid.get(uid, 0) - 1
        if left > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)
        self.total -= 1

    def of(self, uid: int) -> int:
        return self._per_uid.get(uid, 0)


class RateLimitedLog:
    """At most one line per ``every`` seconds for each key; the next line says how many were held back.

    Whatever a peer does, it cannot make the daemon write more than a few lines a minute
    about it, so the journal stays readable and its rate limit never drops our other lines.
    """

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self._log = logger
        self._every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            self._held[key] = self._held.get(key, 0) + 1
            return
        if len(self._last) > 1024:  # keys carry uids: never let the table itself grow without bound
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            self._log.warning(msg + " (%d more like this in the last %.0f s)", *args, held, self._every)
        else:
            self._log.warning(msg, *args)
