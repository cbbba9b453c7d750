"""fdio: a caller's descriptor never holds a worker for ever (real pipes and sockets, in process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from azaiond.errors import Cancelled, InvalidParams
from azaiond.fdio import FdSink, FdSource

CHUNK = b"x" * (1 << 20)  # more than a pipe or a socket buffer holds


def test_a_sink_nobody_reads_ends_after_the_stall_deadline() -> None:
    r, w = os.pipe()
    try:
        began = time.monotonic()
        with FdSink(w, threading.Event(), stall=0.3) as sink, pytest.raises(Cancelled, match="not read for"):
            sink.write(CHUNK)
        assert 0.25 < time.monotonic() - began < 3
        assert os.get_blocking(w)  # the client's description is as it was
    finally:
        os.close(r)
        os.close(w)


def test_cancel_stops_a_blocked_write_and_a_blocked_read_at_once() -> None:
    a, b = socket.socketpair()
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    began = time.monotonic()
    with FdSink(a.fileno(), cancel, stall=30) as sink, pytest.raises(Cancelled):
        sink.write(CHUNK * 4)
    assert time.monotonic() - began < 2
    r, w = os.pipe()
    source = FdSource(r, cancel, stall=30)
    with pytest.raises(Cancelled):
        source.readinto(memoryview(bytearray(10)))
    source.close()
    for fd in (r, w):
        os.close(fd)
    a.close()
    b.close()


def test_end_of_input_after_a_hang_up_is_cancelled_not_short() -> None:
    r, w = os.pipe()
    os.write(w, b"abc")
    os.close(w)
    cancel = threading.Event()
    source = FdSource(r, cancel, stall=5)
    buf = bytearray(10)
    assert source.readinto(memoryview(buf)) == 3 and source.done == 3
    assert source.readinto(memoryview(buf)) == 0  # a real end: the caller is still there
    cancel.set()
    with pytest.raises(Cancelled):
        source.readinto(memoryview(buf))  # the same end, but the caller hung up
    source.close()
    os.close(r)


def test_a_reader_gone_is_invalid_params() -> None:
    r, w = os.pipe()
    os.close(r)
    with FdSink(w) as sink, pytest.raises(InvalidParams, match="went away"):
        sink.write(b"data")
    os.close(w)


# Without CAP_DAC_OVERRIDE (as the unit runs the daemon) another user's pipe cannot be
# reopened through /proc; O_NONBLOCK is then borrowed on the client's description and put back.
BORROW = r"""
import os, sys, threading
from azaiond.errors import Cancelled
from azaiond.fdio import FdSink
w = int(sys.argv[1])
try:
    with FdSink(w, threading.Event(), stall=0.3) as sink:
        sink.write(b"x" * (1 << 20))
except Cancelled:
    print("cancelled", os.get_blocking(w))
"""


def test_another_users_pipe_is_borrowed_non_blocking_and_given_back() -> None:
    # A pipe owned by nobody, mode 0600: made by a child that drops to nobody first.
    parent, child = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import os,socket,sys,time\n"
         "a=socket.socket(fileno=int(sys.argv[1]))\nos.setgid(65534)\nos.setuid(65534)\n"
         "r,w=os.pipe()\nsocket.send_fds(a,[b'p'],[r,w])\ntime.sleep(5)\n", str(child.fileno())],
        pass_fds=[child.fileno()],
    )
    _, (r, w), _, _ = socket.recv_fds(parent, 1, 2)
    try:
        assert os.fstat(w).st_uid == 65534
        done = subprocess.run(
            ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", BORROW, str(w)],
            pass_fds=[w], capture_output=True, text=True, timeout=30, check=False,
        )
        assert done.stdout.strip() == "cancelled True", done.stderr
        assert os.get_blocking(w)
    finally:
        proc.kill()
        proc.wait()
        for fd in (r, w):
            os.close(fd)
        parent.close()
        child.close()
