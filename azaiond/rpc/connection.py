"""One connection of the socket transport, and the low-level receive with descriptors."""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

from azaiond.rpc.table import Peer

RECV_SIZE = 256 * 1024
_FD_SIZE = array.array("i").itemsize
# A message may carry one descriptor. Room for a few more, so that two or three still get a
# precise error; past that the kernel closes the rest itself (MSG_CTRUNC) and they never
# enter our table: a peer cannot fill it 253 descriptors per message.
MAX_FDS = 8
_ANC_SIZE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)


def set_ready(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds.extend(got)
    return fds


def recvmsg(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    data, ancdata, _, _ = sock.recvmsg(size, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds = _fds_of(ancdata) if ancdata else []
    # Past MAX_FDS (MSG_CTRUNC) the kernel closed the rest; the ones we got still make the
    # message's "at most one descriptor" error.
    return data, fds


class Connection:
    """One accepted connection: its socket, peer, read state, cancel event and progress state."""

    __slots__ = ("busy", "calling", "cancel", "flush_pending", "fresh", "held", "idle_since", "latest", "notify",
                 "owed", "peer", "reading", "sock", "stash", "task", "unsent", "waiter", "want")

    def __init__(self, sock: socket.socket, peer: Peer) -> None:
        self.sock = sock
        self.peer = peer
        self.busy = False  # a message is being handled or its reply written
        self.task: asyncio.Task[None] | None = None
        # Reading: the socket stays registered with the loop while the connection waits for
        # requests, and the readiness callback itself calls recvmsg (as asyncio's own
        # transports do). Re-registering for every message would cost two epoll_ctl calls
        # and a failed recvmsg per request.
        self.reading = False
        self.waiter: asyncio.Future[None] | None = None
        self.want = 0
        self.stash: tuple[bytes, list[int]] | None = None
        # Set when the peer hangs up or the daemon stops: the calls' Call.cancel.
        self.cancel = threading.Event()
        self.held = 0  # unfinished-message bytes counted against max_buffered_bytes
        self.idle_since = 0.0  # loop time of the last complete message (or of the connect)
        # Progress: the latest notification line a worker sent, not yet written.
        self.calling = False  # a request is with the dispatcher: its progress may be sent
        self.latest: bytes | None = None
        self.flush_pending = False
        self.unsent = b""  # the rest of a progress line the socket did not take at once
        self.notify: Any = None
        # Quick requests answered in the readiness callback (Server._answer_here): only while
        # no unfinished message waits (``fresh``); the rest of a reply the socket did not
        # take at once is ``owed``, and the serving task writes it.
        self.fresh = True
        self.owed = b""
