"""Logging to stderr: syslog priority prefixes for the journal, timestamps otherwise.

Under systemd, stderr is a stream to journald, which adds its own timestamps and reads a
leading ``<N>`` as the line's priority. systemd sets JOURNAL_STREAM to the ``dev:inode`` of
that stream; we use the journal format only when stderr still is that stream, so a
redirected stderr (a test, a pipe to a file) gets readable timestamps instead.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# syslog priorities (sd-daemon.h): the journal reads them from a "<N>" prefix.
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

_HANDLER_NAME = "azaiond-stderr"


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``; every line of a traceback carries the prefix, or the journal
    would file the continuation lines at the default priority."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{self.priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.splitlines() or [""])

    @staticmethod
    def priority(levelno: int) -> int:
        for level in sorted(_PRIORITY, reverse=True):
            if levelno >= level:
                return _PRIORITY[level]
        return 7


def journal_attached(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` is the journal stream systemd connected (JOURNAL_STREAM)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM")
    if not value:
        return False
    try:
        dev, ino = (int(part) for part in value.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup(
    level: str = "info", *, stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> None:
    """Send the root logger to stderr at ``level`` (a config.log_level). Safe to call again."""
    out = sys.stderr if stream is None else stream
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    if journal_attached(out, environ):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    # Libraries that log every request at INFO would drown ours out.
    for noisy in ("urllib3", "botocore", "boto3", "s3transfer", "docker", "jsonrpcserver"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
