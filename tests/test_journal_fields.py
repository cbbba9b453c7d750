"""Structured journal entries: the mapping from a log record to journal fields, and the
choice between the journal API and the stderr stream."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from azaiond import logs

ROOT = Path(__file__).resolve().parent.parent


def _record(level: int, msg: str, fields: dict[str, Any] | None = None) -> logging.LogRecord:
    record = logging.getLogger("azaiond.calls").makeRecord(
        "azaiond.calls", level, __file__, 42, msg, (), None, "handler", {"fields": fields} if fields else None
    )
    return record


def test_call_failure_fields() -> None:
    record = _record(logging.WARNING, "load failed: integrity", {
        "event": "call_failed", "method": "load", "uid": 1000, "pid": 4242,
        "resource": "models/yolo.bin", "kind": "integrity", "seconds": 0.25, "bytes": None,
    })
    fields = logs.journal_fields(record, "azaiond.calls: load failed: integrity")
    assert fields["MESSAGE"] == "azaiond.calls: load failed: integrity"
    assert fields["PRIORITY"] == "4"
    assert fields["MESSAGE_ID"] == logs.MESSAGE_IDS["call_failed"]
    assert fields["SYSLOG_IDENTIFIER"] == "azaiond"
    assert fields["AZAION_KIND"] == "integrity"
    assert fields["AZAION_METHOD"] == "load"
    assert fields["AZAION_PEER_UID"] == "1000" and fields["AZAION_PEER_PID"] == "4242"
    assert fields["AZAION_FOLDER"] == "models" and fields["AZAION_NAME"] == "yolo.bin"
    assert fields["AZAION_SECONDS"] == "0.25"
    assert "AZAION_BYTES" not in fields  # None is left out, not sent as "None"
    assert fields["CODE_LINE"] == 42 and fields["CODE_FUNC"] == "handler"


def test_plain_record_and_unknown_keys() -> None:
    fields = logs.journal_fields(_record(logging.INFO, "hello"), "hello")
    assert "MESSAGE_ID" not in fields and fields["PRIORITY"] == "6"
    assert not any(k.startswith("AZAION_") for k in fields)
    fields = logs.journal_fields(_record(logging.ERROR, "x", {"event": "nope", "password": "s3cret"}), "x")
    assert "MESSAGE_ID" not in fields and fields["AZAION_EVENT"] == "nope" and fields["PRIORITY"] == "3"
    assert "s3cret" not in repr(fields)  # only known keys become fields
    assert len(set(logs.MESSAGE_IDS.values())) == len(logs.MESSAGE_IDS)


def test_journal_handler_sends_structured_entries() -> None:
    sent: list[dict[str, Any]] = []
    handler = logs.JournalHandler(lambda **kw: sent.append(kw))
    logger = logging.getLogger("azaiond.test-journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("reload refused: %s", "bad", extra={"fields": {"event": "reload_failed"}})
    finally:
        logger.removeHandler(handler)
    assert len(sent) == 1
    assert sent[0]["MESSAGE"] == "azaiond.test-journal: reload refused: bad"
    assert sent[0]["MESSAGE_ID"] == logs.MESSAGE_IDS["reload_failed"]


def test_journal_api_is_used_where_installed_and_stream_otherwise(tmp_path: Path) -> None:
    # Debian's own python3 has python3-systemd (setup.sh installs it): setup() picks the
    # journal API when stderr is the journal stream. logs.py needs nothing beyond the stdlib.
    script = (
        "import logging, os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from azaiond import logs\n"
        "st = os.fstat(2)\n"
        "logs.setup('info', environ={'JOURNAL_STREAM': f'{st.st_dev}:{st.st_ino}'})\n"
        "h = [h for h in logging.getLogger().handlers if h.get_name() == 'azaiond-stderr'][0]\n"
        "print(type(h).__name__, logs.journal_sender() is not None)\n"
    )
    with (tmp_path / "err").open("wb") as err:
        done = subprocess.run(["/usr/bin/python3", "-c", script], stderr=err, capture_output=False,
                              stdout=subprocess.PIPE, text=True, timeout=30, check=True,
                              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.stdout.split() == ["JournalHandler", "True"]
    # Without python3-systemd (this interpreter, pip's), the stream gets <N>-prefixed lines.
    if logs.journal_sender() is None:
        st = os.fstat(sys.stderr.fileno())
        root = logging.getLogger()
        saved = list(root.handlers)
        try:
            logs.setup("info", environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
            handler = next(h for h in root.handlers if h.get_name() == "azaiond-stderr")
            assert isinstance(handler.formatter, logs.JournalFormatter)
        finally:
            for h in list(root.handlers):
                root.removeHandler(h)
            for h in saved:
                root.addHandler(h)
