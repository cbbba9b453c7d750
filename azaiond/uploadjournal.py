"""A journal of the CDN multipart uploads this host has started and not yet ended.

A multipart upload that is neither completed nor aborted keeps its parts on the CDN (and in
the bill) for ever. A daemon killed mid-upload (kill -9, power loss) cannot abort it, so every
upload id is written to ``<state_dir>/uploads/`` right after ``CreateMultipartUpload`` returns
and removed once ``CompleteMultipartUpload`` or ``AbortMultipartUpload`` succeeded. After a
restart, once the CDN write keys are at hand (after a login), the leftovers are aborted.

The journal hooks into botocore's public events on the writer client, so it covers every
multipart upload that client makes: ours (``GrowingFileUpload``) and boto3's managed transfers.
Only the window between the CDN creating the upload and the journal file being written is
uncovered (a kill exactly there); a bucket lifecycle rule for incomplete uploads covers that.

Journal files are untrusted input: a file that is not what this module writes is logged and
removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions

from azaiond.errors import StorageError
from azaiond.fsutil import atomic_write, private_dir, storage_error

log = logging.getLogger(__name__)

_CONTEXT_KEY = "azaiond_upload_id"


@dataclass(frozen=True)
class Entry:
    bucket: str
    key: str
    upload_id: str


class UploadJournal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, upload_id: str) -> Path:
        return self.directory / f"{hashlib.sha256(upload_id.encode()).hexdigest()[:40]}.json"

    # -- records ----------------------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        private_dir(self.directory)
        body = json.dumps({"bucket": entry.bucket, "key": entry.key, "upload_id": entry.upload_id})
        atomic_write(self._path(entry.upload_id), body.encode(), mode=0o600)

    def remove(self, upload_id: str) -> None:
        try:
            self._path(upload_id).unlink(missing_ok=True)
        except OSError as exc:
            # The upload itself is over; the next start aborts it once more (NoSuchUpload).
            log.warning("cannot remove the upload journal entry: %s", storage_error(exc, self.directory).message)

    def pending(self) -> list[Entry]:
        """The uploads a previous run left open; malformed files are logged and removed."""
        entries: list[Entry] = []
        try:
            files = sorted(self.directory.glob("*.json"))
        except OSError:
            return entries
        for path in files:
            try:
                data = json.loads(path.read_bytes())
                if not isinstance(data, dict):
                    raise TypeError("not a mapping")
                fields = [data.get(name) for name in ("bucket", "key", "upload_id")]
                if not all(isinstance(f, str) and f for f in fields):
                    raise TypeError("a field is not a non-empty string")
                entries.append(Entry(str(fields[0]), str(fields[1]), str(fields[2])))
            except (OSError, ValueError, TypeError, RecursionError) as exc:
                log.warning("ignoring a malformed upload journal entry %s (%s)", path, type(exc).__name__)
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
        return entries

    # -- hooks on the writer client ---------------------------------------------------------

    def attach(self, client: Any) -> None:
        events = client.meta.events

        def created(http_response: Any, parsed: dict[str, Any], **kwargs: Any) -> None:
            if http_response.status_code >= 300 or "UploadId" not in parsed:
                return
            entry = Entry(str(parsed.get("Bucket", "")), str(parsed.get("Key", "")), str(parsed["UploadId"]))
            try:
                self.add(entry)
            except StorageError:
                # Unrecorded, it could be orphaned: end it now, and fail the upload with storage.
                with contextlib.suppress(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                    client.abort_multipart_upload(Bucket=entry.bucket, Key=entry.key, UploadId=entry.upload_id)
                raise

        events.register("after-call.s3.CreateMultipartUpload", created)
        for op in ("CompleteMultipartUpload", "AbortMultipartUpload"):
            events.register(f"before-parameter-build.s3.{op}", self._remember)
            events.register(f"after-call.s3.{op}", self._ended)

    @staticmethod
    def _remember(params: dict[str, Any], context: dict[str, Any], **kwargs: Any) -> None:
        if "UploadId" in params:
            context[_CONTEXT_KEY] = str(params["UploadId"])

    def _ended(self, http_response: Any, parsed: dict[str, Any], context: dict[str, Any], **kwargs: Any) -> None:
        upload_id = context.get(_CONTEXT_KEY)
        if upload_id is None:
            return
        code = parsed.get("Error", {}).get("Code") if isinstance(parsed.get("Error"), dict) else None
        if http_response.status_code < 300 or code == "NoSuchUpload":
            self.remove(upload_id)

    # -- cleanup ----------------------------------------------------------------------------

    def abort_pending(self, client: Any) -> int:
        """Abort every upload a previous run left open (with the write keys); returns how many."""
        aborted = 0
        for entry in self.pending():
            try:
                client.abort_multipart_upload(Bucket=entry.bucket, Key=entry.key, UploadId=entry.upload_id)
                aborted += 1
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    log.warning("cannot abort the orphan upload of %s/%s (%s); will retry at the next start",
                                entry.bucket, entry.key, exc.response.get("Error", {}).get("Code"))
                    continue
                self.remove(entry.upload_id)  # already gone
            except botocore.exceptions.BotoCoreError as exc:
                log.warning("cannot abort the orphan upload of %s/%s (%s); will retry at the next start",
                            entry.bucket, entry.key, type(exc).__name__)
        if aborted:
            log.info("aborted %d multipart upload(s) a previous run left on the CDN", aborted)
        return aborted
