"""Logging: structured journal entries under journald, plain lines on stderr otherwise.

Under systemd, stderr is a stream to journald. systemd sets JOURNAL_STREAM to the
``dev:inode`` of that stream; only when stderr still is that stream do we talk to the
journal, so a redirected stderr (a test, a pipe to a file) gets readable timestamps instead.
Then, with Debian's python3-systemd, each record is sent with ``systemd.journal.send`` and
carries fields: ``MESSAGE_ID`` per event type and ``AZAION_METHOD``, ``AZAION_PEER_UID``,
``AZAION_FOLDER``, ``AZAION_NAME``, ``AZAION_KIND``, ``AZAION_BYTES``..., so that
``journalctl -u azaiond AZAION_KIND=integrity`` finds every integrity failure. Without
python3-systemd (pip's Python) the lines go to the stream with a ``<N>`` priority prefix.

A log call gives its fields as ``extra={"fields": {"event": "call_failed", "kind": ...}}``;
the keys are those of ``FIELD_NAMES`` (``resource`` "folder/name" is split in two).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

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
SYSLOG_IDENTIFIER = "azaiond"

# One MESSAGE_ID per kind of event (journalctl MESSAGE_ID=...); fixed for ever once shipped.
MESSAGE_IDS: dict[str, str] = {
    "call": "3b96b81731724c9398cb6bf2215c53cd",  # a call that moved bytes finished
    "call_failed": "e8bdb8d427ad48ed8bb5df5a64605038",  # a call ended in an error
    "login": "80fc44428cef4081bf6ee438d5b7c434",
    "login_failed": "09af47bd0244420da9950b13bc18bb77",
    "unlock": "bac323bce1844cfe98ef23697e5055fe",  # an unlock run finished (ready or error)
    "reload": "54396f03ec4f4de49b9936dc4d684b04",
    "reload_failed": "e46ea9910dc349e5936e2e26f65bf5d8",
    "insecure_http": "15e73e410485491b98e971053acad688",
}

# extra={"fields": {...}} key -> journal field.
FIELD_NAMES: dict[str, str] = {
    "event": "AZAION_EVENT",
    "method": "AZAION_METHOD",
    "uid": "AZAION_PEER_UID",
    "pid": "AZAION_PEER_PID",
    "folder": "AZAION_FOLDER",
    "name": "AZAION_NAME",
    "kind": "AZAION_KIND",
    "bytes": "AZAION_BYTES",
    "seconds": "AZAION_SECONDS",
    "cache": "AZAION_CACHE",
}

JournalSend = Callable[..., None]


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


def journal_fields(record: logging.LogRecord, message: str) -> dict[str, Any]:
    """The journal entry for ``record`` (``message`` already formatted), as send()'s kwargs."""
    fields: dict[str, Any] = {
        "MESSAGE": message,
        "PRIORITY": str(JournalFormatter.priority(record.levelno)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "LOGGER": record.name,
        "CODE_FILE": record.pathname,
        "CODE_LINE": record.lineno,
        "CODE_FUNC": record.funcName,
    }
    extra = getattr(record, "fields", None)
    if not isinstance(extra, Mapping):
        return fields
    values = dict(extra)
    resource = values.pop("resource", None)
    if isinstance(resource, str) and "/" in resource:
        values.setdefault("folder", resource.split("/", 1)[0])
        values.setdefault("name", resource.split("/", 1)[1])
    for key, value in values.items():
        name = FIELD_NAMES.get(key)
        if name is not None and value is not None:
            fields[name] = str(value)
    event = values.get("event")
    if isinstance(event, str) and event in MESSAGE_IDS:
        fields["MESSAGE_ID"] = MESSAGE_IDS[event]
    return fields


class JournalHandler(logging.Handler):
    """Sends each record to the journal as a structured entry (``journal_fields``)."""

    def __init__(self, send: JournalSend) -> None:
        super().__init__()
        self._send = send
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(**journal_fields(record, self.format(record)))
        except Exception:
            self.handleError(record)


def journal_sender() -> JournalSend | None:
    """``systemd.journal.send`` (Debian's python3-systemd), or None where it is not installed."""
    try:
        module = importlib.import_module("systemd.journal")
    except ImportError:
        return None
    send = getattr(module, "send", None)
    return send if callable(send) else None


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
    handler: logging.Handler = logging.StreamHandler(out)
    attached = journal_attached(out, environ)
    send = journal_sender() if attached else None
    if send is not None:
        handler = JournalHandler(send)
    elif attached:
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.set_name(_HANDLER_NAME)
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    """Change the level of every logger we set up; used at start and by a live reload."""
    root = logging.getLogger()
    root.setLevel(LEVELS.get(level, logging.INFO))
    # Libraries that log every request at INFO would drown ours out.
    for noisy in ("urllib3", "botocore", "boto3", "s3transfer", "docker", "jsonrpcserver"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
