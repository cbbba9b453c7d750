"""HTTP with wall-clock deadlines, for the Resource API (requests) and the CDN (botocore).

A socket timeout bounds one ``recv``, not a request: an upstream that sends one byte per
second, or answers half a body and then nothing but keep-alive silence, holds a worker for ever.
Here every request carries a deadline (a point on the monotonic clock). When a connection
starts a request, it is registered with one watchdog thread together with that deadline; if
the same request is still on the connection when the deadline passes, the watchdog shuts the
socket down, so whatever blocks on it (connect, sending the body, the status line, the body)
returns at once with an error. The caller then sees the deadline as the cause.

- The Resource API client uses a ``requests.Session`` from ``api_session()``: the deadline of a
  request is the one set by ``deadline_scope`` on the calling thread (one logical call: every
  retry and the body read share it).
- The CDN clients send through ``BotoSender`` (botocore's ``before-send`` event): each HTTP
  request to the CDN (one part, one range, one small object) gets ``per_request`` seconds.
  botocore's and s3transfer's own retries then apply as usual.

A socket shut down by the watchdog while it sits idle in a pool is noticed by urllib3 as a
dropped connection and replaced, so a late shutdown never harms the next request.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import botocore.awsrequest
import botocore.exceptions
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock by which something must be over."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def timeout(self, cap: float) -> float:
        """A socket timeout for the next operation: ``cap``, but never past the deadline."""
        return max(0.001, min(cap, self.remaining()))


_local = threading.local()


def current_deadline() -> Deadline | None:
    deadline: Deadline | None = getattr(_local, "deadline", None)
    return deadline


@contextlib.contextmanager
def deadline_scope(deadline: Deadline) -> Iterator[Deadline]:
    """Requests this thread starts inside the block end by ``deadline`` (body reads too)."""
    previous = current_deadline()
    _local.deadline = deadline
    try:
        yield deadline
    finally:
        _local.deadline = previous


class _Watchdog:
    """One thread that shuts down sockets whose request outlived its deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Watched, int]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, conn: _Watched, generation: int, deadline: Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline.at, next(self._seq), conn, generation))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                at, _, conn, generation = self._heap[0]
                wait = at - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            conn.expire(generation)


_watchdog = _Watchdog()


class _Watched:
    """Mixed into urllib3's connections: each request is registered with its deadline."""

    sock: socket.socket | None
    _generation = 0
    _done_generation = -1

    def _start_watch(self) -> None:
        self._generation += 1
        deadline = current_deadline()
        if deadline is not None:
            _watchdog.watch(self, self._generation, deadline)

    def expire(self, generation: int) -> None:
        # A later request on this connection has its own deadline; this one is over.
        if generation != self._generation:
            return
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class WatchedHTTPConnection(_Watched, HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        self._start_watch()
        super().request(*args, **kwargs)


class WatchedHTTPSConnection(_Watched, HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        self._start_watch()
        super().request(*args, **kwargs)


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


_POOLS: dict[str, type[HTTPConnectionPool]] = {"http": _HTTPPool, "https": _HTTPSPool}


class DeadlineAdapter(HTTPAdapter):
    """A requests adapter whose connections honour ``deadline_scope``."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS


def api_session(user_agent: str = "azaiond") -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = user_agent
    adapter = DeadlineAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


#: How much of a file body a CDN connection reads and sends at a time. urllib3's default is
#: 16 KiB: 64 Python-level read/send turns per MiB of every part, each one taking the GIL from
#: the thread that encrypts. TLS still cuts what is sent into its own records.
SEND_BLOCK = 1024 * 1024


class _LargeBlocks:
    """Mixed into the CDN's connections: send bodies in ``SEND_BLOCK`` pieces.

    Set on the connection, not through PoolManager(blocksize=...): urllib3 1.26 (Debian 12)
    has no pool key for it and fails every request with a TypeError. Both 1.26 and 2.x read
    the attribute that http.client's constructor sets.
    """

    blocksize: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.blocksize = SEND_BLOCK


class _CdnHTTPConnection(_LargeBlocks, WatchedHTTPConnection):
    pass


class _CdnHTTPSConnection(_LargeBlocks, WatchedHTTPSConnection):
    pass


class _CdnHTTPPool(HTTPConnectionPool):
    ConnectionCls = _CdnHTTPConnection


class _CdnHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CdnHTTPSConnection


_CDN_POOLS: dict[str, type[HTTPConnectionPool]] = {"http": _CdnHTTPPool, "https": _CdnHTTPSPool}


class BotoSender:
    """botocore's ``before-send`` handler: send the request on our own watched pool.

    Register with ``client.meta.events.register("before-send.s3", sender)``. Errors are
    translated to botocore's own connection errors, so its retry logic treats them as it
    would its own.
    """

    def __init__(self, per_request: float, connect_timeout: float, read_timeout: float) -> None:
        self._per_request = per_request
        self._connect = connect_timeout
        self._read = read_timeout
        self._pools = urllib3.PoolManager(maxsize=16, block=False)
        self._pools.pool_classes_by_scheme = _CDN_POOLS

    def close(self) -> None:
        self._pools.clear()

    def __call__(self, request: botocore.awsrequest.AWSPreparedRequest, **kwargs: Any) -> Any:
        deadline = Deadline.after(self._per_request)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "expect"}
        timeout = urllib3.Timeout(connect=deadline.timeout(self._connect), read=deadline.timeout(self._read))
        try:
            with deadline_scope(deadline):
                raw = self._pools.urlopen(
                    request.method,
                    request.url,
                    body=request.body,
                    headers=headers,
                    retries=False,
                    redirect=False,
                    assert_same_host=False,
                    preload_content=False,
                    decode_content=False,
                    timeout=timeout,
                    chunked=headers.get("Transfer-Encoding", "").lower() == "chunked",
                )
            response = botocore.awsrequest.AWSResponse(request.url, raw.status, raw.headers, raw)
            if not request.stream_output:
                response.content  # noqa: B018 -- read the whole (small) body now, under the deadline
            return response
        except urllib3.exceptions.NewConnectionError as exc:
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=request.url, error=exc) from exc
        except urllib3.exceptions.ConnectTimeoutError as exc:
            raise botocore.exceptions.ConnectTimeoutError(endpoint_url=request.url, error=exc) from exc
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise botocore.exceptions.ReadTimeoutError(endpoint_url=request.url, error=exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise botocore.exceptions.ConnectionClosedError(
                error=exc, request=request, endpoint_url=request.url
            ) from exc
