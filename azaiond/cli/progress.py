"""A one-line progress display on stderr, for long transfers and ``unlock --wait``.

The daemon does the transfer, so there is nothing to hook: a background thread samples a
number the CLI can see (the size of the file being written, or the shared offset of a
descriptor the daemon reads) and redraws one ``\\r`` line. Off unless the stream is a TTY, so
logs and pipes never see control characters.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

# (done, total); total None when unknown. The sampler returns None when it cannot tell.
Sample = tuple[int, int | None]
Sampler = Callable[[], Sample | None]

_MIB = 1024 * 1024


def render(label: str, done: int, total: int | None) -> str:
    if total:
        percent = min(100, done * 100 // total)
        return f"{label}: {percent:3d}% {done / _MIB:.1f}/{total / _MIB:.1f} MiB"
    return f"{label}: {done / _MIB:.1f} MiB"


class Progress:
    """Context manager; redraws every ``interval`` seconds while the body runs.

    Either give a ``sampler`` or push values with ``update()``.
    """

    def __init__(
        self,
        label: str,
        stream: TextIO,
        sampler: Sampler | None = None,
        interval: float = 0.2,
        enabled: bool | None = None,
    ) -> None:
        self.label = label
        self.stream = stream
        self.sampler = sampler
        self.interval = interval
        self.enabled = stream.isatty() if enabled is None else enabled
        self._value: Sample | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False

    def update(self, done: int, total: int | None, label: str | None = None) -> None:
        with self._lock:
            self._value = (done, total)
            if label is not None:
                self.label = label

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._drawn:
            # Wipe the line, so the summary or the error that follows starts clean.
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _sample(self) -> Sample | None:
        if self.sampler is not None:
            try:
                return self.sampler()
            except OSError:
                # The descriptor may be gone at the very end of a transfer; just skip a frame.
                return None
        with self._lock:
            return self._value

    def _draw(self) -> None:
        value = self._sample()
        with self._lock:
            label = self.label
        if value is None:
            return
        self.stream.write("\r\x1b[K" + render(label, *value))
        self.stream.flush()
        self._drawn = True

    def _run(self) -> None:
        # The first frame waits one interval: short operations finish without any flicker.
        while not self._stop.wait(self.interval):
            self._draw()
