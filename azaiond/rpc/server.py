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
concurrently. A quick request (``Dispatcher.quick``: health, status) read while its connection
waits for a message is answered in the readiness callback itself, without waking the
connection's task: that wake-up (a future, a task step, a turn of the loop) cost more than the
rest of the round trip.

A caller that goes away cancels its call. Every connection is watched for the peer's hang-up
by an epoll set of our own (registered for no event: EPOLLHUP is always reported, and only a
full close raises it, not a half-close) whose descriptor the loop watches; so a busy
connection, which reads nothing ahead, still learns at once that its caller left. Its
``cancel`` event becomes the calls' ``Call.cancel``.

Progress notifications (docs/protocol.md; the dispatcher builds and throttles them) are
written from the loop between a request and its reply, and only when the socket takes them
at once: a caller that does not read them gets fewer, never a stalled call.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import select
import socket
from collections.abc import Sequence

from azaiond.rpc.connection import MAX_FDS, RECV_SIZE, Connection, close_all, recvmsg, set_ready
from azaiond.rpc.dispatch import INVALID_REQUEST, TOO_LARGE_LINE, Dispatcher, error_line
from azaiond.rpc.limits import ROOT, ConnectionCounts, ConnectionLimits, RateLimitedLog
from azaiond.rpc.peer import credentials, is_admin
from azaiond.rpc.table import Peer

log = logging.getLogger(__name__)
limited = RateLimitedLog(log)

BUSY_LINE = error_line(-32007, "too many connections", "busy")
TOO_MANY_FDS_LINE = error_line(INVALID_REQUEST, "a message may carry at most one descriptor", "invalid_request")
ACCEPT_BATCH = 256  # connections accepted per wake-up of the listener
CLOSING_STALL = 1.0  # seconds a reply may still wait for its reader once the daemon stops


class _Stalled(Exception):
    """The peer did not read a reply for stall_timeout seconds."""


class Server:
    """Accepts connections on a listening socket and serves them through a Dispatcher."""

    def __init__(
        self,
        sock: socket.socket,
        dispatcher: Dispatcher,
        *,
        max_message_bytes: int,
        admin_groups: Sequence[str] = (),
        limits: ConnectionLimits | None = None,
    ) -> None:
        self._listener = sock
        self._dispatcher = dispatcher
        self._cap = max_message_bytes
        self._admin_groups = tuple(admin_groups)
        self._limits = limits or ConnectionLimits()
        self._counts = ConnectionCounts(self._limits)
        self._buffered = 0  # unfinished-message bytes of all non-root connections
        self._connections: set[Connection] = set()
        self._hup = select.epoll()
        self._watched: dict[int, Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._accept_pause: asyncio.TimerHandle | None = None
        self._closing = False

    def set_limits(self, limits: ConnectionLimits, *, admin_groups: Sequence[str]) -> None:
        """New limits (a live reload, on the loop): they apply from the next check on; open
        connections over a lowered count stay, and new ones are refused ``busy`` until the
        count is below it. Admin groups apply to connections accepted from now on."""
        self._limits = limits
        self._counts.set_limits(limits)
        self._admin_groups = tuple(admin_groups)

    async def start(self) -> None:
        """Begin accepting; calls are served once this returns."""
        loop = self._loop = asyncio.get_running_loop()
        self._listener.setblocking(False)
        loop.add_reader(self._hup.fileno(), self._on_hangups)
        self._sweeper = loop.call_later(self._sweep_every(), self._sweep)
        loop.add_reader(self._listener.fileno(), self._on_acceptable)

    # -- accepting ---------------------------------------------------------------------

    def _on_acceptable(self) -> None:
        """Accept what the backlog holds, a batch per wake-up: a flood of connections (refused
        ones included) must drain faster than a script can fill the backlog."""
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                # Out of descriptors or memory: back off instead of spinning on a ready
                # listener (the peers wait in the backlog meanwhile).
                limited.warning("accept", "cannot accept a connection: %s", os.strerror(exc.errno or 0))
                loop.remove_reader(self._listener.fileno())
                self._accept_pause = loop.call_later(0.1, self._resume_accepting)
                return
            sock.setblocking(False)
            self._admit(sock)

    def _resume_accepting(self) -> None:
        self._accept_pause = None
        if not self._closing:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._on_acceptable)

    def _admit(self, sock: socket.socket) -> None:
        try:
            pid, uid, gid = credentials(sock)
        except OSError:
            sock.close()
            return
        refused = self._counts.admit(uid)
        if refused is not None:
            self._refuse(sock, uid, pid, refused)
            return
        if uid == ROOT:
            self._open(sock, Peer(uid=uid, gid=gid, pid=pid, is_admin=True))
            return
        # Group membership comes from the user database, which may be a network service
        # (sssd, LDAP): look it up on a worker thread so no other connection waits. The
        # count above bounds how many lookups can be queued.
        lookup = asyncio.get_running_loop().run_in_executor(None, is_admin, uid, self._admin_groups)
        lookup.add_done_callback(functools.partial(self._resolved, sock, uid, gid, pid))

    @staticmethod
    def _refuse(sock: socket.socket, uid: int, pid: int, reason: str) -> None:
        with contextlib.suppress(OSError):
            sock.send(BUSY_LINE)  # best effort: the socket is new, its buffer empty
        sock.close()
        limited.warning("refuse", "refusing a connection from uid %d pid %d: %s", uid, pid, reason)

    def _resolved(self, sock: socket.socket, uid: int, gid: int, pid: int, lookup: asyncio.Future[bool]) -> None:
        if self._closing or lookup.cancelled() or lookup.exception() is not None:
            sock.close()
            self._counts.release(uid)
            return
        self._open(sock, Peer(uid=uid, gid=gid, pid=pid, is_admin=lookup.result()))

    def _open(self, sock: socket.socket, peer: Peer) -> None:
        loop = asyncio.get_running_loop()
        conn = Connection(sock, peer)
        conn.idle_since = loop.time()
        conn.notify = functools.partial(self._notify, conn)
        self._connections.add(conn)
        fd = sock.fileno()
        self._watched[fd] = conn
        self._hup.register(fd, 0)  # no event asked: EPOLLHUP comes anyway, and only on a close
        conn.task = loop.create_task(self._serve(conn))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connection from pid %d uid %d admin %s", peer.pid, peer.uid, peer.is_admin)

    def _on_hangups(self) -> None:
        try:
            events = self._hup.poll(0)
        except (OSError, ValueError):
            return
        for fd, _ in events:
            conn = self._watched.pop(fd, None)
            with contextlib.suppress(OSError, ValueError):
                self._hup.unregister(fd)
            if conn is not None:
                conn.cancel.set()  # a call in flight stops at its next chunk
                if conn.busy and log.isEnabledFor(logging.DEBUG):
                    log.debug("pid %d hung up during a call; cancelling it", conn.peer.pid)

    def _sweep_every(self) -> float:
        return max(0.1, min(10.0, self._limits.idle_timeout / 4))

    def _sweep(self) -> None:
        """Close connections that sent no complete message for idle_timeout seconds."""
        loop = asyncio.get_running_loop()
        oldest = loop.time() - self._limits.idle_timeout
        for conn in list(self._connections):
            if not conn.busy and conn.idle_since < oldest and conn.task is not None:
                conn.task.cancel()
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("closing the idle connection of pid %d", conn.peer.pid)
        self._sweeper = loop.call_later(self._sweep_every(), self._sweep)

    # -- reading -----------------------------------------------------------------------

    def _on_readable(self, conn: Connection) -> None:
        waiter = conn.waiter
        if waiter is None or waiter.done():
            # Nobody is waiting: the connection is busy with a message. Stop watching, so
            # the kernel's buffer (not ours) holds what the client sends ahead.
            asyncio.get_running_loop().remove_reader(conn.sock.fileno())
            conn.reading = False
            return
        try:
            data, fds = recvmsg(conn.sock, conn.want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            waiter.set_exception(exc)
            return
        if data and conn.fresh and not fds and data.find(b"\n") == len(data) - 1 and not self._closing:
            try:
                answered = self._answer_here(conn, data)
            except OSError as exc:
                waiter.set_exception(exc)
                return
            if answered:
                return  # the connection waits on for its next message
            if conn.owed:
                data = b""  # answered, but the rest of the reply is the task's to write
        conn.stash = (data, fds)
        waiter.set_result(None)

    def _answer_here(self, conn: Connection, data: bytes) -> bool:
        """Serve ``data``, one whole line, in the readiness callback if it is a quick request.

        True when it was answered here: the serving task, still waiting for a message, never
        wakes. Waking it would cost a future, a task step and a turn of the loop, which are
        more than half of a health round trip (docs/performance.md). Only a line read while
        the task waits (nothing in flight, nothing unfinished) comes here, so replies keep the
        order of requests. A reply the socket does not take at once goes to the task as
        ``owed``, to be written under the stall deadline.
        """
        try:
            reply = self._dispatcher.quick(data[:-1], conn.peer, conn.cancel)
        except Exception:
            log.exception("the quick path failed; the line goes the full way")
            return False
        if reply is None:
            return False
        conn.idle_since = asyncio.get_running_loop().time()
        try:
            sent = conn.sock.send(reply)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(reply):
            conn.owed = reply[sent:]
            return False
        return True

    async def _recv(self, conn: Connection, size: int) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        if not conn.reading:
            try:
                return recvmsg(conn.sock, size)
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

    def _hold(self, conn: Connection, size: int) -> bool:
        """Count ``size`` unfinished bytes for ``conn``; False once all peers hold too many."""
        if conn.peer.uid == ROOT:
            return True
        self._buffered += size - conn.held
        conn.held = size
        return size == 0 or self._buffered <= self._limits.max_buffered_bytes

    # -- writing -----------------------------------------------------------------------

    async def _write(self, conn: Connection, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send all of ``data``; _Stalled when the peer takes nothing for stall_timeout s.

        ``fds`` (SCM_RIGHTS) ride on the first bytes that go out, where the client looks for
        them; the caller still owns and closes them.
        """
        sock = conn.sock
        pending = fds
        try:
            n = socket.send_fds(sock, [data], pending) if pending else sock.send(data)
            pending = ()
        except (BlockingIOError, InterruptedError):
            n = 0
        if n == len(data):
            return  # the usual case: no future, no timer
        view = memoryview(data)[n:]
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        while view:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, set_ready, ready)
            # Once the daemon stops, a reply gets a moment, not the whole stall deadline.
            stall = CLOSING_STALL if self._closing else self._limits.stall_timeout
            try:
                await asyncio.wait_for(ready, stall)
            except TimeoutError:
                raise _Stalled from None
            finally:
                loop.remove_writer(fd)
            try:
                sent = socket.send_fds(sock, [view], pending) if pending else sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            pending = ()
            view = view[sent:]

    def _notify(self, conn: Connection, line: bytes) -> None:
        """A progress line from a worker thread: keep the latest, and have the loop send it."""
        conn.latest = line
        if not conn.flush_pending and self._loop is not None:
            conn.flush_pending = True
            with contextlib.suppress(RuntimeError):  # the loop is gone: the daemon is stopping
                self._loop.call_soon_threadsafe(self._flush, conn)

    def _flush(self, conn: Connection) -> None:
        line, conn.latest = conn.latest, None
        conn.flush_pending = False
        if line is None or not conn.calling or conn.unsent:
            return  # the call is over, or the peer is not reading: skip it, never queue
        try:
            n = conn.sock.send(line)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            return  # gone; the reply's write will say so
        if n < len(line):
            conn.unsent = line[n:]  # finished before the reply, which must start on a new line

    # -- serving -----------------------------------------------------------------------

    async def _serve(self, conn: Connection) -> None:
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
                conn.fresh = not partial
                data, fds = await self._recv(conn, min(RECV_SIZE, cap + 1 - len(partial)))
                if conn.owed:  # the readiness callback answered a quick request
                    owed, conn.owed = conn.owed, b""
                    conn.busy = True
                    await self._write(conn, owed)
                    conn.busy = False
                    continue
                if not data:
                    break  # the client went away; a half-sent message dies with it
                pieces = data.split(b"\n")
                last = len(pieces) - 1  # pieces[last] is unfinished (b"" if data ended a line)
                owner: int | None = None
                if fds:
                    owner = self._owner(pieces, starts_fresh=not partial)
                    if owner is None:
                        close_all(fds)
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
                            self._hold(conn, 0)
                        else:
                            line = pieces[0]
                    else:
                        line = pieces[i]
                    if not line or line.isspace():
                        close_all(mine)  # a blank line is no message and claims nothing
                        continue
                    conn.busy = True
                    conn.calling = True
                    conn.latest = None
                    reply_fds: list[int] = []
                    try:
                        try:
                            # A quick request is answered at once (several lines read together,
                            # or a first one); anything else, or a line with a descriptor,
                            # takes the full way.
                            reply = None if mine else dispatcher.quick(line, conn.peer, conn.cancel)
                            if reply is None:
                                reply = await dispatcher.handle(line, conn.peer, mine, reply_fds,
                                                                cancel=conn.cancel, notify=conn.notify)
                        finally:
                            conn.calling = False
                        if conn.unsent:
                            unsent, conn.unsent = conn.unsent, b""
                            await self._write(conn, unsent)
                        if reply is not None:
                            await self._write(conn, reply, reply_fds)
                    finally:
                        close_all(reply_fds)  # ours to close once sent (the peer holds its copies)
                    conn.busy = False
                    conn.idle_since = loop.time()
                    if self._closing:
                        return
                partial += pieces[last]
                if fds:
                    partial_fds.extend(fds)
                    fds = []
                    if len(partial_fds) > MAX_FDS:
                        limited.warning("fds", "pid %d sent more than %d descriptors with one message; closing",
                                        conn.peer.pid, MAX_FDS)
                        await self._write(conn, TOO_MANY_FDS_LINE)
                        return
                if len(partial) > cap:
                    limited.warning("too_large", "message over %d bytes from pid %d; closing", cap, conn.peer.pid)
                    await self._write(conn, TOO_LARGE_LINE)
                    return
                if partial and not self._hold(conn, len(partial)):
                    limited.warning("buffered", "unfinished messages of all peers over %d bytes; closing the "
                                    "connection of pid %d uid %d", self._limits.max_buffered_bytes,
                                    conn.peer.pid, conn.peer.uid)
                    await self._write(conn, TOO_LARGE_LINE)
                    return
        except (ConnectionError, BrokenPipeError):
            pass  # the client left while we wrote; nothing to tell it
        except _Stalled:
            limited.warning("stall", "pid %d did not read its reply for %.0f s; closing its connection",
                            conn.peer.pid, self._limits.stall_timeout)
        except OSError as exc:
            limited.warning("conn", "connection from pid %d failed: %s", conn.peer.pid, exc.strerror)
        except Exception:
            log.exception("connection from pid %d failed", conn.peer.pid)
        finally:
            if conn.reading:
                loop.remove_reader(sock.fileno())
            if conn.stash is not None:
                close_all(conn.stash[1])
            close_all(partial_fds)
            close_all(fds)
            self._hold(conn, 0)
            self._connections.discard(conn)
            fd = sock.fileno()
            if self._watched.get(fd) is conn:
                del self._watched[fd]
                with contextlib.suppress(OSError, ValueError):
                    self._hup.unregister(fd)
            self._counts.release(conn.peer.uid)
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

    async def shutdown(self, timeout: float = 20.0) -> bool:
        """Stop accepting, cancel calls in flight, and wait for them; True if all finished."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._accept_pause is not None:
            self._accept_pause.cancel()
        if self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        self._dispatcher.cancel.set()
        waiting: list[asyncio.Task[None]] = []
        writing: list[asyncio.Task[None]] = []
        for conn in list(self._connections):
            conn.cancel.set()
            if conn.task is None:
                continue
            if conn.calling:
                waiting.append(conn.task)  # ends itself once its reply is written
            elif conn.busy:
                writing.append(conn.task)  # its reply is being written: a moment, no more
            else:
                conn.task.cancel()  # idle, waiting for a message that will not be read
                waiting.append(conn.task)
        if writing:
            _, slow = await asyncio.wait(writing, timeout=CLOSING_STALL)
            for task in slow:
                task.cancel()  # a peer that does not read its reply holds nothing up
            waiting.extend(writing)
        done = True
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=timeout)
            if pending:
                done = False
                log.warning("%d call(s) still running after %.0f s; abandoning them", len(pending), timeout)
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1.0)
        if self._loop is not None:
            self._loop.remove_reader(self._hup.fileno())
        self._hup.close()
        return done and self._dispatcher.busy_threads == 0
