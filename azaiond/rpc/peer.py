"""Who is on the other end of a connection: SO_PEERCRED, and whether that user is an admin.

Membership is the peer uid's user's, from the user database (primary group and
getgrouplist), the way sudo and polkit decide it, not the groups the process happens to
carry: a process that dropped a group still belongs to it, and one that picked up a
group with setgroups does not gain it.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import Iterable

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected ``sock``, as the kernel recorded them."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def is_admin(uid: int, admin_groups: Iterable[str]) -> bool:
    """uid 0, or a user whose primary group or supplementary groups include an admin group."""
    if uid == 0:
        return True
    wanted = set()
    for name in admin_groups:
        try:
            wanted.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            continue  # a group that does not exist admits nobody
    if not wanted:
        return False
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False  # a uid with no user has no groups
    if user.pw_gid in wanted:
        return True
    try:
        groups = os.getgrouplist(user.pw_name, user.pw_gid)
    except OSError:
        log.warning("cannot list the groups of uid %d; treating it as not admin", uid)
        return False
    return not wanted.isdisjoint(groups)
