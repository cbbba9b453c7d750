"""What one message and one member may ask of the daemon: batch size, inline bytes, workers.

Past a limit the call is answered at once (too_large or busy), never queued.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from azaiond.errors import Busy, TooLarge
from azaiond.rpc.table import Peer


@dataclass(frozen=True)
class Limits:
    """What one message may ask of the daemon (the ``socket`` config section)."""

    # Elements in one batch; a longer batch is refused whole with too_large.
    max_batch: int = 1000
    # Decoded inline bytes one batch may move, both ways: input ``data`` and replies that
    # carry ``data``. Every element that may reply inline reserves the inline limit.
    batch_inline_bytes: int = 32 * 1024 * 1024
    # The inline limit itself (resources.inline_limit_mb).
    inline_bytes: int = 16 * 1024 * 1024
    # Worker-thread calls one non-admin uid may have running at once; past it, busy.
    calls_per_uid: int = 8
    # Worker-thread calls all non-admin peers together may have running: keeps workers free
    # for root and the admin group. None: the worker pool less four.
    member_calls: int | None = None


def inline_need(method: str, params: Mapping[str, Any], budget: int, limits: Limits) -> int:
    """A batch element's worst-case inline bytes, or TooLarge when the budget cannot hold them.

    Input: the decoded size of ``data``. Output: any call that takes no data may reply with up
    to the inline limit (in a batch there is no descriptor to write to).
    """
    data = params.get("data")
    need = len(data) // 4 * 3 if isinstance(data, str) else limits.inline_bytes
    if need > budget:
        raise TooLarge(f"{method}: the batch is over its inline byte limit: pass a descriptor")
    return need


def inline_used(result: Mapping[str, Any]) -> int:
    """The decoded inline bytes a reply carries."""
    data = result.get("data") if isinstance(result, Mapping) else None
    return len(data) // 4 * 3 if isinstance(data, str) else 0


class MemberSlots:
    """Worker-thread calls of peers that are neither root nor admin: per uid and in total."""

    def __init__(self, per_uid: int, total: int) -> None:
        self.per_uid = per_uid
        self.total = total
        self._held: dict[int, int] = {}
        self._count = 0

    def acquire(self, peer: Peer) -> None:
        """Count a member's call, or refuse it with busy at once. Admins are not counted."""
        if peer.is_admin:
            return
        held = self._held.get(peer.uid, 0)
        if held >= self.per_uid:
            raise Busy(f"uid {peer.uid} already has {held} calls running; try again later")
        if self._count >= self.total:
            raise Busy("too many calls running; try again later")
        self._held[peer.uid] = held + 1
        self._count += 1

    def release(self, peer: Peer) -> None:
        if peer.is_admin:
            return
        held = self._held[peer.uid] - 1
        if held:
            self._held[peer.uid] = held
        else:
            del self._held[peer.uid]
        self._count -= 1
