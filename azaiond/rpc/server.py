"""The socket transport: newline-delimited JSON-RPC over a Unix stream socket, with SCM_RIGHTS.

asyncio's streams cannot receive descriptors, so each connection reads with recvmsg on a
non-blocking socket woken by loop.add_reader, and writes with loop.sock_sendall. Reading
happens only when the connection needs the next message, so the kernel's buffers, not ours,
hold what a fast client sends ahead: we never keep more than the message cap plus one byte.

Descriptors: Linux never merges data across an SCM_RIGHTS boundary on a stream socket, and
a recvmsg that returns descriptors ends with the data sent alongside them. So a descriptor
belongs to the last message that begins in the chunk it arrived with; one that no message
claims is closed at once.

Requests on one connection are answered in order, one at a time; connections run
concurrently.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
from collections.abc import Sequence

from azaiond.rpc.dispatch import TOO_LARGE_LINE, Dispatcher
from azaiond.rpc.peer import credentials, is_admin
from azaiond.rpc.table import Peer

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024
_FD_SIZE = array.array("i").itemsize
# Room for SCM_MAX_FD (253) descriptors: one sendmsg cannot pass more, so the control
# data is never truncated and every descriptor received is one we can close.
_ANC_SIZE = socket.CMSG_SPACE(253 * _FD_SIZE)


def _set_ready(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _close_all(fds: Sequence[int]) -> None:
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


async def _send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """Send ``data`` with ``fds`` (SCM_RIGHTS) riding on its first bytes, as the client expects."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            sent = socket.send_fds(sock, [data], list(fds))
            break
        except (BlockingIOError, InterruptedError):
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(sock.fileno(), _set_ready, ready)
            try:
                await ready
            finally:
                loop.remove_writer(sock.fileno())
    if sent < len(data):
        await loop.sock_sendall(sock, data[sent:])


def _recvmsg(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    data, ancdata, flags, _ = sock.recvmsg(size, _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
    fds = _fds_of(ancdata) if ancdata else []
    if flags & socket.MSG_CTRUNC:
        log.warning("control data truncated on a connection; descriptors dropped")
        _close_all(fds)
        fds = []
    return data, fds


class _Connection:
    __slots__ = ("busy", "peer", "reading", "sock", "stash", "task", "waiter", "want")

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


class Server:
    """Accepts connections on a listening socket and serves them through a Dispatcher."""

    def __init__(
        self,
        sock: socket.socket,
        dispatcher: Dispatcher,
        *,
        max_message_bytes: int,
        admin_groups: Sequence[str] = (),
    ) -> None:
        self._listener = sock
        self._dispatcher = dispatcher
        self._cap = max_message_bytes
        self._admin_groups = tuple(admin_groups)
        self._connections: set[_Connection] = set()
        self._accept_task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        """Begin accepting; calls are served once this returns."""
        self._listener.setblocking(False)
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: back off instead of spinning on a ready listener.
                    log.warning("cannot accept a connection: %s", os.strerror(exc.errno or 0))
                    await asyncio.sleep(0.1)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            try:
                pid, uid, gid = credentials(sock)
            except OSError:
                sock.close()
                continue
            if uid == 0:
                self._open(sock, Peer(uid=uid, gid=gid, pid=pid, is_admin=True))
            else:
                # Group membership comes from the user database, which may be a network service
                # (sssd, LDAP): look it up on a worker thread so no other connection waits.
                lookup = loop.run_in_executor(None, is_admin, uid, self._admin_groups)
                lookup.add_done_callback(functools.partial(self._resolved, sock, uid, gid, pid))

    def _resolved(self, sock: socket.socket, uid: int, gid: int, pid: int, lookup: asyncio.Future[bool]) -> None:
        if self._closing or lookup.cancelled() or lookup.exception() is not None:
            sock.close()
            return
        self._open(sock, Peer(uid=uid, gid=gid, pid=pid, is_admin=lookup.result()))

    def _open(self, sock: socket.socket, peer: Peer) -> None:
        conn = _Connection(sock, peer)
        self._connections.add(conn)
        conn.task = asyncio.get_running_loop().create_task(self._serve(conn))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection from pid %d uid %d admin %s", peer.pid, peer.uid, peer.is_admin)

    def _on_readable(self, conn: _Connection) -> None:
        waiter = conn.waiter
        if waiter is None or waiter.done():
            # Nobody is waiting: the connection is busy with a message. Stop watching, so
            # the kernel's buffer (not ours) holds what the client sends ahead.
            asyncio.get_running_loop().remove_reader(conn.sock.fileno())
            conn.reading = False
            return
        try:
            conn.stash = _recvmsg(conn.sock, conn.want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            waiter.set_exception(exc)
            return
        waiter.set_result(None)

    async def _recv(self, conn: _Connection, size: int) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        if not conn.reading:
            try:
                return _recvmsg(conn.sock, size)
            except (BlockingIOError, InterruptedError):
                pass
            loop.add_reader(conn.sock.fileno(), self._on_readable, conn)
            conn.reading = True
        conn.want = size
        conn.waiter = loop.create_future()
        try:
            await conn.waiter
        finally:
            conn.waiter = None
        got, conn.stash = conn.stash, None
        assert got is not None
        return got

    async def _serve(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        sock = conn.sock
        cap = self._cap
        dispatcher = self._dispatcher
        partial = bytearray()  # the start of a message whose newline has not come yet
        partial_fds: list[int] = []
        fds: list[int] = []
        try:
            while not self._closing:
                # Never ask for more than would take the unfinished message past the cap.
                data, fds = await self._recv(conn, min(RECV_SIZE, cap + 1 - len(partial)))
                if not data:
                    break  # the client went away; a half-sent message dies with it
                pieces = data.split(b"\n")
                last = len(pieces) - 1  # pieces[last] is unfinished (b"" if data ended a line)
                owner: int | None = None
                if fds:
                    owner = self._owner(pieces, starts_fresh=not partial)
                    if owner is None:
                        _close_all(fds)
                        fds = []
                for i in range(last):
                    mine = fds if owner == i else []
                    if owner == i:
                        fds = []  # handed to this message: the dispatcher closes them
                    if i == 0:
                        mine = partial_fds + mine
                        partial_fds = []
                        if partial:
                            partial += pieces[0]
                            line = bytes(partial)
                            partial.clear()
                        else:
                            line = pieces[0]
                    else:
                        line = pieces[i]
                    if not line or line.isspace():
                        _close_all(mine)  # a blank line is no message and claims nothing
                        continue
                    conn.busy = True
                    reply_fds: list[int] = []
                    try:
                        reply = await dispatcher.handle(line, conn.peer, mine, reply_fds)
                        if reply is not None and reply_fds:
                            await _send_with_fds(sock, reply, reply_fds)
                        elif reply is not None:
                            await loop.sock_sendall(sock, reply)
                    finally:
                        _close_all(reply_fds)  # ours to close once sent (the peer holds its copies)
                    conn.busy = False
                    if self._closing:
                        return
                partial += pieces[last]
                if fds:
                    partial_fds.extend(fds)
                    fds = []
                if len(partial) > cap:
                    log.warning("message over %d bytes from pid %d; closing", cap, conn.peer.pid)
                    await loop.sock_sendall(sock, TOO_LARGE_LINE)
                    return
        except (ConnectionError, BrokenPipeError):
            pass  # the client left while we wrote; nothing to tell it
        except OSError as exc:
            log.warning("connection from pid %d failed: %s", conn.peer.pid, exc.strerror)
        except Exception:
            log.exception("connection from pid %d failed", conn.peer.pid)
        finally:
            if conn.reading:
                loop.remove_reader(sock.fileno())
            if conn.stash is not None:
                _close_all(conn.stash[1])
            _close_all(partial_fds)
            _close_all(fds)
            self._connections.discard(conn)
            sock.close()

    @staticmethod
    def _owner(pieces: list[bytes], *, starts_fresh: bool) -> int | None:
        """Index of the last piece that begins a message in this chunk, or None."""
        last = len(pieces) - 1
        # Piece i >= 1 follows a newline, so it begins a message, unless it is the empty
        # remainder after a final newline. Piece 0 begins one only if nothing was pending.
        for i in range(last, 0, -1):
            if i < last or pieces[i]:
                return i
        return 0 if starts_fresh else None

    async def shutdown(self, timeout: float = 30.0) -> bool:
        """Stop accepting, cancel calls in flight, and wait for them; True if all finished."""
        self._closing = True
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        self._listener.close()
        self._dispatcher.cancel.set()
        waiting: list[asyncio.Task[None]] = []
        for conn in list(self._connections):
            if conn.task is None:
                continue
            if conn.busy:
                waiting.append(conn.task)  # ends itself once its reply is written
            else:
                conn.task.cancel()  # idle, waiting for a message that will not be read
                waiting.append(conn.task)
        done = True
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=timeout)
            if pending:
                done = False
                log.warning("%d call(s) still running after %.0f s; abandoning them", len(pending), timeout)
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1.0)
        return done and self._dispatcher.busy_threads == 0
