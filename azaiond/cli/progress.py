"""A one-line progress display on stderr, for long transfers and ``unlock --wait``.

A background thread redraws one ``\\r`` line from what the CLI can see: the daemon's progress
notifications (the CDN phase of a cold load or prefetch, with its total), else a number it
samples itself (the size of the file being written, or the shared offset of a descriptor the
daemon reads). The rate is averaged over the last few seconds; the ETA follows from it. Off
unless the stream is a TTY, so logs and pipes never see control characters.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

# (done, total); total None when unknown. The sampler returns None when it cannot tell.
Sample = tuple[int, int | None]
Sampler = Callable[[], Sample | None]

_MIB = 1024 * 1024
RATE_WINDOW = 3.0  # seconds of samples the rate is averaged over


def _clock(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def render(label: str, done: int, total: int | None, rate: float | None = None) -> str:
    """``label:  50% 0.5/1.0 MiB  2.0 MiB/s  ETA 0:01``; rate and ETA only once they are known."""
    if total:
        text = f"{label}: {min(100, done * 100 // total):3d}% {done / _MIB:.1f}/{total / _MIB:.1f} MiB"
    else:
        text = f"{label}: {done / _MIB:.1f} MiB"
    if rate:
        text += f"  {rate / _MIB:.1f} MiB/s"
        if total and total > done:
            text += f"  ETA {_clock((total - done) / rate)}"
    return text


class Progress:
    """Context manager; redraws every ``interval`` seconds while the body runs.

    Values come from a ``sampler``, from ``update()`` pushes (``unlock --wait``'s polls), or from
    the daemon's progress notifications through ``daemon()``: while those carry a total (the CDN
    phase of a cold load or a prefetch) they win over the sampler, shown as ``phase``.
    """

    def __init__(
        self,
        label: str,
        stream: TextIO,
        sampler: Sampler | None = None,
        *,
        interval: float = 0.2,
        enabled: bool | None = None,
        phase: str = "from the CDN",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream
        self.sampler = sampler
        self.interval = interval
        self.enabled = stream.isatty() if enabled is None else enabled
        self._phase = phase
        self._clock = clock
        self._value: Sample | None = None
        self._pushed: Sample | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False
        self._history: deque[tuple[float, int]] = deque()
        self._shown = ""  # the label the history belongs to; a new one starts it over

    def update(self, done: int, total: int | None, label: str | None = None) -> None:
        with self._lock:
            self._value = (done, total)
            if label is not None:
                self.label = label

    def daemon(self, done: int, total: int | None) -> None:
        """A progress notification of the daemon (see ``listener``)."""
        with self._lock:
            self._pushed = (done, total)

    @property
    def listener(self) -> Callable[[int, int | None], None] | None:
        """What to pass as ``client.call(..., progress=)``: ``daemon`` when the bar is shown,
        else None, so the daemon sends no notifications nobody draws."""
        return self.daemon if self.enabled else None

    def rate(self, label: str, done: int) -> float | None:
        """Bytes per second over the last few seconds of ``label``'s samples; None at first."""
        now = self._clock()
        history = self._history
        if label != self._shown:
            history.clear()
            self._shown = label
        history.append((now, done))
        while len(history) > 2 and now - history[0][0] > RATE_WINDOW:
            history.popleft()
        first_time, first_done = history[0]
        if now - first_time < 0.5 or done < first_done:
            return None
        return (done - first_done) / (now - first_time)

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

    def _sample(self) -> tuple[str, Sample] | None:
        with self._lock:
            pushed, value, label = self._pushed, self._value, self.label
        if pushed is not None and pushed[1] is not None and pushed[0] < pushed[1]:
            return f"{label} ({self._phase})", pushed
        if self.sampler is not None:
            try:
                sampled = self.sampler()
            except OSError:
                # The descriptor may be gone at the very end of a transfer; just skip a frame.
                return None
            return (label, sampled) if sampled is not None else None
        return (label, value) if value is not None else None

    def _draw(self) -> None:
        got = self._sample()
        if got is None:
            return
        label, (done, total) = got
        self.stream.write("\r\x1b[K" + render(label, done, total, self.rate(label, done)))
        self.stream.flush()
        self._drawn = True

    def _run(self) -> None:
        # The first frame waits one interval: short operations finish without any flicker.
        while not self._stop.wait(self.interval):
            self._draw()
