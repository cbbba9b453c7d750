"""The method table as data: name -> handler, access level and params (snapd's daemon/api.go idea).

The dispatcher checks access in one place, using only this table; a method missing from it
does not exist, and an access level it does not know refuses the call. Handlers receive a
``Call`` and know nothing of sockets or JSON-RPC framing.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class Access(enum.Enum):
    OPEN = "open"  # anyone who can connect to the socket
    ADMIN = "admin"  # uid 0 or a member of socket.admin_groups


@dataclass(frozen=True)
class Peer:
    """The connecting process, from SO_PEERCRED, read once per connection."""

    uid: int
    gid: int
    pid: int
    is_admin: bool


@dataclass(frozen=True)
class Param:
    name: str
    type: type | tuple[type, ...]
    required: bool = True


@dataclass
class Call:
    """One method call as a handler sees it."""

    peer: Peer
    params: Mapping[str, Any]
    # A descriptor passed with the request (SCM_RIGHTS), or None. The transport owns it and
    # closes it after the handler returns; a handler must not close it.
    fd: int | None = None
    # Set when the daemon is shutting down or the caller went away; long handlers check it
    # between chunks and stop with ``errors.Cancelled``.
    cancel: threading.Event = field(default_factory=threading.Event)
    # Long calls report ``(done, total)`` through this (total None when unknown yet); the
    # transport decides whether and how the caller sees it. Safe to call from a worker thread.
    progress: Callable[[int, int | None], None] = field(default=lambda done, total: None)
    # What a handler learned that the per-call log line and the metrics want, filled as it goes:
    # "resource" ("folder/name" or "bucket/key"), "bytes" (int), "cache" ("hit" or "miss").
    # Never a secret.
    facts: dict[str, Any] = field(default_factory=dict)
    # Descriptors to pass back to the caller with the reply (SCM_RIGHTS), e.g. a sealed memfd.
    # The transport sends and then closes them; if the call fails they are closed unsent.
    reply_fds: list[int] = field(default_factory=list)


@dataclass(slots=True)
class CallRecord:
    """One finished call, as the dispatcher hands it to observers (per-call log, metrics).

    Observers must not change it. Not frozen: a frozen dataclass costs about a microsecond
    more to build, on every call of the hot path.
    """

    method: str
    peer: Peer
    kind: str | None  # None when the call succeeded
    seconds: float
    facts: Mapping[str, Any]


CallObserver = Callable[[CallRecord], None]


Handler = Callable[[Call], Mapping[str, Any]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    handler: Handler
    access: Access
    params: tuple[Param, ...] = ()
    # True: the handler does I/O and runs on a worker thread. False: it is quick and pure, runs
    # on the event loop and passes no descriptor back (health, status, unlock_status).
    blocking: bool = True


MethodTable = Mapping[str, MethodSpec]
