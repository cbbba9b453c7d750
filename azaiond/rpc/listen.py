"""The listening socket: taken from systemd (socket activation) or bound by the daemon itself."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from azaiond.config import SocketConfig

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
SOCKET_MODE = 0o660
BACKLOG = socket.SOMAXCONN  # as systemd's Backlog= default: a burst of connects waits, not fails


class ListenError(Exception):
    """The daemon cannot get a listening socket; the message says why, for the operator."""


@dataclass
class Listener:
    sock: socket.socket
    # The path we bound and must remove on shutdown; None when systemd owns the socket.
    bound_path: Path | None

    def close(self) -> None:
        """Close the socket and remove the file we created (never one systemd created)."""
        self.sock.close()
        if self.bound_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.bound_path.unlink()


def _activated_fd(environ: MutableMapping[str, str]) -> int | None:
    """fd 3 when systemd passed sockets to this very process; clears the variables either way.

    They are cleared so a child we start never mistakes our sockets for its own.
    """
    pid = environ.pop("LISTEN_PID", None)
    count = environ.pop("LISTEN_FDS", None)
    environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return None
    try:
        if int(pid) != os.getpid():
            return None
        n = int(count)
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID/LISTEN_FDS")
        return None
    if n < 1:
        return None
    if n > 1:
        log.warning("systemd passed %d sockets; using the first and closing the rest", n)
        for fd in range(SD_LISTEN_FDS_START + 1, SD_LISTEN_FDS_START + n):
            with contextlib.suppress(OSError):
                os.close(fd)
    return SD_LISTEN_FDS_START


def _from_systemd(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenError(f"socket activation: fd {fd} is not a socket ({exc.strerror})") from exc
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()  # leave the fd alone; it is systemd's to report
        raise ListenError(
            f"socket activation: fd {fd} is not a listening Unix stream socket "
            "(check ListenStream= in azaiond.socket)"
        )
    os.set_inheritable(fd, False)
    return sock


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False  # refused (nobody listening), or not connectable: stale
    finally:
        probe.close()
    return True


def _bind(cfg: SocketConfig) -> socket.socket:
    path = cfg.path
    if len(os.fsencode(path)) > 107:
        raise ListenError(f"{path}: a Unix socket path may be at most 107 bytes")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
        if _is_live(path):
            raise ListenError(f"{path}: another daemon is already listening there")
        log.info("removing stale socket %s", path)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a tight umask so the socket is never connectable by others before the
    # chmod below. Safe: this runs before any thread exists.
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ListenError(f"{path}: cannot bind: {exc.strerror}") from exc
    finally:
        os.umask(old)
    os.chmod(path, SOCKET_MODE)
    if cfg.group:
        try:
            gid = grp.getgrnam(cfg.group).gr_gid
        except KeyError:
            log.warning("group %r does not exist; %s keeps the daemon's group", cfg.group, path)
        else:
            try:
                os.chown(path, -1, gid)
            except OSError as exc:
                log.warning("cannot give %s to group %r: %s", path, cfg.group, exc.strerror)
    sock.listen(BACKLOG)
    return sock


def open_listener(cfg: SocketConfig, environ: MutableMapping[str, str] | None = None) -> Listener:
    """The socket to serve: systemd's when socket-activated, else one bound at ``cfg.path``."""
    env = os.environ if environ is None else environ
    fd = _activated_fd(env)
    if fd is not None:
        sock = _from_systemd(fd)
        log.info("using the socket passed by systemd")
        return Listener(sock=sock, bound_path=None)
    sock = _bind(cfg)
    log.info("listening on %s", cfg.path)
    return Listener(sock=sock, bound_path=cfg.path)
