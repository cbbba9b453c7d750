"""Talking to systemd: READY=1, STATUS=, WATCHDOG=1 and STOPPING=1 (sd_notify), via sdnotify.

Everything here is a no-op when NOTIFY_SOCKET is unset, so the daemon runs the same by hand.
The watchdog is pinged by a timer on the event loop that serves calls: if that loop hangs,
the pings stop and systemd restarts the daemon, which is the point of having one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping

import sdnotify

log = logging.getLogger(__name__)

def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds, when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC/WATCHDOG_PID")
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


class Notifier:
    """sd_notify for the daemon and for services that want to say what they are doing."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        # sdnotify reads NOTIFY_SOCKET itself and swallows send errors: a missing or gone
        # systemd must never break the daemon.
        self._sd = sdnotify.SystemdNotifier() if self.enabled else None
        self.watchdog_interval = _watchdog_interval(env) if self.enabled else None
        self._timers: list[asyncio.TimerHandle] = []

    def _send(self, state: str) -> None:
        if self._sd is not None:
            self._sd.notify(state)

    def ready(self) -> None:
        self._send("READY=1")

    def status(self, text: str) -> None:
        """Set the line `systemctl status` shows. Safe to call from any thread."""
        # A newline would start a new assignment in the datagram; keep it one line.
        line = " ".join(text.split())
        self._send(f"STATUS={line}")

    def reloading(self) -> None:
        """RELOADING=1: `systemctl reload` waits for the READY=1 that follows. systemd wants
        the monotonic time of the request with it (sd_notify(3))."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the watchdog pings on ``loop`` (the one serving calls).

        Status lines need no timer: ``status`` sends each one the moment it is set.
        """
        if self.enabled and self.watchdog_interval is not None:
            self._every(loop, self.watchdog_interval, self.watchdog)

    def _every(self, loop: asyncio.AbstractEventLoop, period: float, action: Callable[[], None]) -> None:
        slot = len(self._timers)

        def tick() -> None:
            action()
            self._timers[slot] = loop.call_later(period, tick)

        self._timers.append(loop.call_later(period, tick))
        action()

    def stop(self) -> None:
        """Cancel the timers; the loop serving calls is about to stop."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
