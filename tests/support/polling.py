"""Waiting in tests for something another process does: poll a condition, never sleep a guess."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(check: Callable[[], bool], timeout: float = 20.0, interval: float = 0.02) -> bool:
    """Poll ``check()`` until it is true or ``timeout`` s have passed; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return bool(check())
