"""A loopback HTTP/1.1 fault proxy for tests: put it in front of the reference API or moto.

    proxy = FaultProxy("127.0.0.1", upstream_port).start()
    proxy.set(Fault.slow(200), match=Match(path_prefix="/resources/get"))   # 200 bytes/s
    ...
    proxy.clear()
    proxy.stop()

The proxy reads each request head on the client side, picks the first rule that matches it
(method, path prefix, optional count of requests it applies to) and then does what the rule says:

- ``pass``:   forward the request and the response untouched;
- ``hang``:   take the request and never answer (optionally after sending the response head and
              ``after`` bytes of its body), until the client goes away or the rule is cleared;
- ``slow``:   forward both ways at ``rate`` bytes per second;
- ``cut``:    forward the response head and ``after`` body bytes (or half the body) then close;
              with ``upload=True`` forward ``after`` request body bytes upstream, then close both;
- ``status``: answer ``status`` (e.g. 503) with a small body and close, never reaching upstream;
- ``reset``:  close the client connection with SO_LINGER 0 (an RST) as soon as the head is read.

It counts bytes per direction and logs every request line, so a test can count ``POST /login``.
Clients usually keep connections alive: rules are evaluated per request, so a rule set between
two calls applies to the next request even on a pooled connection. ``drop_connections()`` closes
everything that is open (e.g. to end hung requests at once).

Every connection is served by one thread; request bodies and responses are streamed in chunks,
never held whole. ``Expect: 100-continue`` is answered by the proxy itself and not forwarded.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

CHUNK = 64 * 1024
_HEAD_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Fault:
    """What to do with a matching request."""

    kind: str = "pass"  # pass | hang | slow | cut | status | reset
    rate: float = 0.0  # bytes per second (slow)
    after: int | None = None  # body bytes before the cut or the stall; None = half (cut) / 0 (hang)
    status: int = 503
    upload: bool = False  # cut the request body instead of the response

    @staticmethod
    def passthrough() -> Fault:
        return Fault("pass")

    @staticmethod
    def hang(after: int | None = None) -> Fault:
        return Fault("hang", after=after)

    @staticmethod
    def slow(rate: float) -> Fault:
        return Fault("slow", rate=rate)

    @staticmethod
    def cut(after: int | None = None, upload: bool = False) -> Fault:
        return Fault("cut", after=after, upload=upload)

    @staticmethod
    def answer(status: int = 503) -> Fault:
        return Fault("status", status=status)

    @staticmethod
    def reset() -> Fault:
        return Fault("reset")


@dataclass(frozen=True)
class Match:
    """Which requests a rule applies to (all given fields must match)."""

    method: str | None = None
    path_prefix: str | None = None

    def __call__(self, method: str, path: str) -> bool:
        if self.method is not None and method.upper() != self.method.upper():
            return False
        return self.path_prefix is None or path.startswith(self.path_prefix)


@dataclass
class _Rule:
    fault: Fault
    match: Match
    remaining: int | None  # requests left to apply to; None = forever


@dataclass
class _Head:
    first_line: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def encode(self, drop: tuple[str, ...] = ()) -> bytes:
        lines = [self.first_line]
        lines += [f"{k}: {v}" for k, v in self.headers if k.lower() not in drop]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Closed(Exception):
    """The connection ended (either side), or the proxy was told to drop it."""


@dataclass(eq=False)
class _Conn:
    client: socket.socket
    upstream: socket.socket | None = None
    closed: threading.Event = field(default_factory=threading.Event)

    def close(self, reset: bool = False) -> None:
        self.closed.set()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if reset:
                _set_linger0(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


def _set_linger0(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Reader:
    """Buffered reads from one socket, with head parsing and framed body streaming."""

    def __init__(self, sock: socket.socket, closed: threading.Event) -> None:
        self.sock = sock
        self.buf = b""
        self.closed = closed

    def _fill(self) -> bool:
        if self.closed.is_set():
            raise _Closed()
        try:
            data = self.sock.recv(CHUNK)
        except OSError as exc:
            raise _Closed() from exc
        if not data:
            return False
        self.buf += data
        return True

    def head(self) -> _Head | None:
        """The next message head, or None at a clean end of stream before any byte."""
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > _HEAD_LIMIT:
                raise _Closed()
            if not self._fill():
                if self.buf:
                    raise _Closed()
                return None
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        headers = []
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers.append((key.strip(), value.strip()))
        return _Head(lines[0], headers)

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes (at least one), or _Closed at end of stream."""
        if not self.buf and not self._fill():
            raise _Closed()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise _Closed()
        out, self.buf = self.buf.split(b"\r\n", 1)
        return out + b"\r\n"

    def body(self, head: _Head, *, is_request: bool, no_body: bool = False) -> Iterator[bytes]:
        """The raw bytes of the message body as they are on the wire (chunk framing kept)."""
        if no_body:
            return
        te = (head.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            while True:
                size_line = self.line()
                yield size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = self.line()
                        yield trailer
                        if trailer == b"\r\n":
                            return
                left = size + 2
                while left:
                    piece = self.take(min(left, CHUNK))
                    left -= len(piece)
                    yield piece
        length = head.get("Content-Length")
        if length is not None:
            left = int(length)
            while left:
                piece = self.take(min(left, CHUNK))
                left -= len(piece)
                yield piece
            return
        if is_request:
            return
        while True:  # a response delimited by the end of the connection
            if not self.buf and not self._fill():
                return
            out, self.buf = self.buf, b""
            yield out


class FaultProxy:
    """One listening socket on loopback in front of ``upstream_host:upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._listener.settimeout(0.1)  # so stop() ends the accept loop promptly
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._conns: set[_Conn] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self.bytes_up = 0  # client -> upstream
        self.bytes_down = 0  # upstream -> client
        self.requests: Counter[str] = Counter()  # "POST /login" -> count (query strings dropped)
        self.faulted = 0  # requests a rule other than pass applied to

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()
        self.drop_connections()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- switches ---------------------------------------------------------------------------

    def set(self, fault: Fault, match: Match | None = None, times: int | None = None) -> None:
        """Replace all rules by one. ``times`` limits it to that many matching requests."""
        with self._lock:
            self._rules = [_Rule(fault, match or Match(), times)]

    def add(self, fault: Fault, match: Match | None = None, times: int | None = None) -> None:
        """Add a rule after the existing ones (the first that matches wins)."""
        with self._lock:
            self._rules.append(_Rule(fault, match or Match(), times))

    def clear(self) -> None:
        """Pass everything through again; requests hung by a rule are released (closed)."""
        with self._lock:
            self._rules = []
        self.drop_connections()

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_up = self.bytes_down = self.faulted = 0
            self.requests.clear()

    def drop_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()

    def count(self, method: str, path_prefix: str) -> int:
        with self._lock:
            return sum(n for key, n in self.requests.items()
                       if key.startswith(f"{method.upper()} {path_prefix}"))

    # --- serving ----------------------------------------------------------------------------

    def _pick(self, method: str, path: str) -> Fault:
        with self._lock:
            self.requests[f"{method.upper()} {path.split('?', 1)[0]}"] += 1
            for rule in self._rules:
                if rule.remaining == 0 or not rule.match(method, path):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                if rule.fault.kind != "pass":
                    self.faulted += 1
                return rule.fault
        return Fault()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            conn = _Conn(client)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="faultproxy-conn",
                             daemon=True).start()

    def _serve(self, conn: _Conn) -> None:
        try:
            self._serve_requests(conn)
        except (_Closed, OSError, ValueError):
            pass
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)

    def _forward(self, chunks: Iterator[bytes], sock: socket.socket, fault: Fault, up: bool,
                 conn: _Conn, limit: int | None) -> None:
        """Send ``chunks`` on; with a ``limit``, stop after that many bytes."""
        sent = 0
        for chunk in chunks:
            piece = chunk if limit is None else chunk[:max(0, limit - sent)]
            if piece:
                self._send(sock, piece, fault, up, conn)
            sent += len(piece)
            if limit is not None and sent >= limit:
                return

    def _send(self, sock: socket.socket, data: bytes, fault: Fault, up: bool, conn: _Conn) -> None:
        if fault.kind == "slow" and fault.rate > 0:
            step = max(1, int(fault.rate / 20))
            for i in range(0, len(data), step):
                piece = data[i:i + step]
                if conn.closed.wait(len(piece) / fault.rate):
                    raise _Closed()
                self._sendall(sock, piece, up)
            return
        self._sendall(sock, data, up)

    def _sendall(self, sock: socket.socket, data: bytes, up: bool) -> None:
        try:
            sock.sendall(data)
        except OSError as exc:
            raise _Closed() from exc
        with self._lock:
            if up:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)

    def _serve_requests(self, conn: _Conn) -> None:
        creader = _Reader(conn.client, conn.closed)
        ureader: _Reader | None = None
        while True:
            head = creader.head()
            if head is None:
                return
            method, path = [*head.first_line.split(" "), "", ""][:2]
            fault = self._pick(method, path)
            if fault.kind == "reset":
                conn.close(reset=True)
                return
            if (head.get("Expect") or "").lower() == "100-continue":
                self._sendall(conn.client, b"HTTP/1.1 100 Continue\r\n\r\n", up=False)
            if fault.kind == "hang" and fault.after is None:
                _wait_client_gone(conn)  # never answer; the client (or clear()) ends it
                raise _Closed()
            if fault.kind == "status":
                for _ in creader.body(head, is_request=True):
                    pass
                body = b'{"ErrorCode": 0, "Message": "fault proxy"}'
                reply = (f"HTTP/1.1 {fault.status} Fault\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
                self._sendall(conn.client, reply, up=False)
                return
            if conn.upstream is None:
                try:
                    conn.upstream = socket.create_connection(self.upstream, timeout=None)
                except OSError as exc:
                    raise _Closed() from exc
                ureader = _Reader(conn.upstream, conn.closed)
            assert ureader is not None
            self._send(conn.upstream, head.encode(drop=("expect",)), fault, True, conn)
            req_body = creader.body(head, is_request=True)
            if fault.kind == "cut" and fault.upload:
                half = int(head.get("Content-Length") or 0) // 2
                limit = fault.after if fault.after is not None else half
                self._forward(req_body, conn.upstream, fault, True, conn, limit)
                conn.close()
                return
            self._forward(req_body, conn.upstream, fault, True, conn, None)
            self._relay_response(conn, ureader, fault, method)
            reply_close = (head.get("Connection") or "").lower() == "close"
            if reply_close:
                return

    def _relay_response(self, conn: _Conn, ureader: _Reader, fault: Fault, method: str) -> None:
        while True:
            rhead = ureader.head()
            if rhead is None:
                raise _Closed()
            status = int(rhead.first_line.split(" ")[1])
            if status >= 200 or status == 101:
                break
            # Interim (1xx) responses from upstream: we answered 100-continue ourselves.
        no_body = method.upper() == "HEAD" or status in (204, 304)
        self._send(conn.client, rhead.encode(), fault, False, conn)
        length = rhead.get("Content-Length")
        limit: int | None = None
        if fault.kind == "cut" and not fault.upload:
            limit = fault.after if fault.after is not None else int(length or 0) // 2
        elif fault.kind == "hang":
            limit = fault.after or 0
        self._forward(ureader.body(rhead, is_request=False, no_body=no_body), conn.client, fault,
                      False, conn, limit)
        if limit is not None and not no_body:
            if fault.kind == "hang":
                _wait_client_gone(conn)
            raise _Closed()
        if length is None and "chunked" not in (rhead.get("Transfer-Encoding") or "").lower() \
                and not no_body:
            raise _Closed()  # close-delimited: pass the end on
        if (rhead.get("Connection") or "").lower() == "close":
            raise _Closed()


def _wait_client_gone(conn: _Conn) -> None:
    """Block until the client closes its end (or the proxy drops the connection); anything
    the client sends meanwhile is read and thrown away."""
    while not conn.closed.is_set():
        try:
            ready, _, _ = select.select([conn.client], [], [], 0.1)
            if ready and not conn.client.recv(CHUNK):
                return
        except (OSError, ValueError):
            return
