"""load with memfd: the plaintext comes back in a sealed memfd over SCM_RIGHTS (real daemon)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
from collections.abc import Callable

import pytest

from azaiond.client import AzaionClient
from azaiond.errors import InvalidParams, NotFound, TooLarge
from tests.fixtures_daemon import DaemonHandle, connect, recv_line
from tests.fixtures_stack import unique_name
from tests.support.devstack import DevStack
from tests.support.polling import wait_until

Factory = Callable[..., DaemonHandle]


def memfds(d: DaemonHandle) -> list[str]:
    """The daemon's open memfds, once it has had a moment to close what it just sent (it
    closes its copy right after sendmsg, which may be after the caller got the reply)."""

    def open_now() -> list[str]:
        out = []
        for name in os.listdir(f"/proc/{d.proc.pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{d.proc.pid}/fd/{name}")
                if target.startswith("/memfd:"):
                    out.append(target)
        return out

    wait_until(lambda: not open_now(), timeout=10)
    return open_now()


SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def test_memfd_load_reads_back_with_mmap_and_is_sealed(clean_stack: DevStack, azaiond_factory: Factory) -> None:
    folder = unique_name("memfd")
    clean_stack.ensure_bucket(folder)
    d = azaiond_factory(config_writer=clean_stack.write_config)
    payload = os.urandom(300_000)
    with AzaionClient(str(d.socket_path), timeout=60) as client:
        client.login(clean_stack.admin.email, clean_stack.admin.password)
        client.upload("model.bin", folder, data=payload)
        with client.load_memory("model.bin", folder) as model:
            assert model.size == len(payload)
            assert model.sha256 == hashlib.sha256(payload).hexdigest()
            assert os.readlink(f"/proc/self/fd/{model.fd}").startswith("/memfd:azaiond:")
            assert fcntl.fcntl(model.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            with model.mmap() as view:
                assert view[:] == payload
            # Sealed: no write, no growing, no shrinking, no writable shared mapping, no unsealing.
            assert fcntl.fcntl(model.fd, fcntl.F_GET_SEALS) & SEALS == SEALS
            with pytest.raises(PermissionError):
                os.pwrite(model.fd, b"x", 0)
            with pytest.raises(PermissionError):
                os.ftruncate(model.fd, len(payload) + 1)
            with pytest.raises(PermissionError):
                os.ftruncate(model.fd, 1)
            with pytest.raises(PermissionError):
                mmap.mmap(model.fd, len(payload), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                fcntl.fcntl(model.fd, fcntl.F_ADD_SEALS, 0)
            assert model.read() == payload
        # The daemon kept no copy of the descriptor.
        assert memfds(d) == []

        # memfd and a descriptor at once, or memfd in a batch: refused, nothing leaks.
        r, w = os.pipe()
        try:
            with pytest.raises(InvalidParams, match="either memfd or a descriptor"):
                client.call("load", {"name": "model.bin", "folder": folder, "memfd": True}, fd=w)
        finally:
            os.close(r)
            os.close(w)
    with connect(d.socket_path, 30) as sock:
        batch = [{"jsonrpc": "2.0", "method": "load", "params": {"name": "model.bin", "folder": folder,
                                                                    "memfd": True}, "id": 1}]
        sock.sendall(json.dumps(batch).encode() + b"\n")
        reply = json.loads(recv_line(sock, 30))
        assert reply[0]["error"]["data"]["kind"] == "invalid_params"
        assert "single request" in reply[0]["error"]["message"]
    assert memfds(d) == []
    d.stop()


def test_memfd_errors_close_the_memfd(clean_stack: DevStack, azaiond_factory: Factory) -> None:
    d = azaiond_factory(config_writer=clean_stack.write_config)
    with AzaionClient(str(d.socket_path), timeout=60) as client:
        client.login(clean_stack.admin.email, clean_stack.admin.password)
        for _ in range(3):
            with pytest.raises(NotFound):
                client.load_memory("absent.bin", unique_name("memfd"))
        assert memfds(d) == []
    d.stop()


def test_memfd_over_its_cap_is_too_large_and_passes_nothing(clean_stack: DevStack, azaiond_factory: Factory) -> None:
    folder = unique_name("memfd")
    clean_stack.ensure_bucket(folder)
    d = azaiond_factory(config_writer=clean_stack.write_config, overrides={"resources": {"memfd_max_mb": 1}})
    with AzaionClient(str(d.socket_path), timeout=60) as client:
        client.login(clean_stack.admin.email, clean_stack.admin.password)
        client.upload("big.bin", folder, data=os.urandom(1024 * 1024 + 1))
        client.upload("fits.bin", folder, data=b"x" * (1024 * 1024))
        with pytest.raises(TooLarge, match="memfd_max_mb"):
            client.load_memory("big.bin", folder)
        assert memfds(d) == []
        with client.load_memory("fits.bin", folder) as model:
            assert model.read() == b"x" * (1024 * 1024)
    assert memfds(d) == []
    d.stop()
