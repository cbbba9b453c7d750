"""The S3-compatible CDN: a read client and a write client, each with its own key pair.

The read keys serve downloads and the write keys serve uploads, never the other way round
(SPEC section 6). Transfers stream: uploads go through boto3's multipart transfer from a file
object, downloads land in a temp file that is fsynced and renamed into place, so a crash never
leaves a half entry that a later load would trust. botocore's exceptions are translated here.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
import yaml
from boto3.s3.transfer import TransferConfig

from azaiond.cdn_upload import GrowingFileUpload
from azaiond.errors import CdnError, NotFound, UpstreamError
from azaiond.fsutil import atomic_file
from azaiond.names import check_bucket, check_name
from azaiond.urls import UrlProblem, check_url

log = logging.getLogger(__name__)

_REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


@dataclass(frozen=True)
class CdnSettings:
    """The contents of ``cdn.yaml``, fetched from the Resource API after login."""

    host: str
    downloader_access_key: str = field(repr=False)
    downloader_access_secret: str = field(repr=False)
    uploader_access_key: str = field(repr=False)
    uploader_access_secret: str = field(repr=False)

    @classmethod
    def from_yaml(cls, text: bytes) -> CdnSettings:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UpstreamError("cdn.yaml from the Resource API is not valid YAML") from exc
        if not isinstance(data, dict):
            raise UpstreamError("cdn.yaml from the Resource API is not a mapping")
        values: dict[str, str] = {}
        keys = [f"{role}_access_{part}" for role in ("downloader", "uploader") for part in ("key", "secret")]
        for key in ("host", *keys):
            value = data.get(key)
            if not isinstance(value, str) or not value:
                raise UpstreamError(f"cdn.yaml from the Resource API lacks {key}")
            values[key] = value
        return cls(**values)


def botocore_config(retries: int) -> botocore.config.Config:
    options: dict[str, Any] = {
        "retries": {"max_attempts": retries + 1, "mode": "standard"},
        "signature_version": "s3v4",
        "s3": {"addressing_style": "path"},
        "connect_timeout": 10,
        "read_timeout": 60,
    }
    # boto3 >= 1.36 sends checksums that many S3-compatible stores refuse (NOTES.md); older
    # botocore (Debian's 1.29) has neither the behaviour nor the option.
    if "request_checksum_calculation" in botocore.config.Config.OPTION_DEFAULTS:
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return botocore.config.Config(**options)


def endpoint_for(host: str, *, allow_insecure_http: bool = False) -> str:
    """The endpoint URL for cdn.yaml's ``host``: https unless it says otherwise, and a plain
    http:// one only to a loopback host or with ``allow_insecure_http`` (the read and write
    keys sign every request, and the plaintext of uploads would cross the network in clear)."""
    url = host if "://" in host else f"https://{host}"
    try:
        return check_url(url, allow_insecure_http=allow_insecure_http)
    except UrlProblem as exc:
        raise CdnError(f"the CDN host in cdn.yaml from the Resource API is refused: it {exc}") from exc


class Cdn:
    def __init__(
        self,
        settings: CdnSettings,
        *,
        endpoint: str | None = None,
        retries: int = 3,
        multipart_chunk_mb: int = 8,
        session: boto3.session.Session | None = None,
        allow_insecure_http: bool = False,
    ) -> None:
        # The configured endpoint was checked with the config; cdn.yaml's host is checked here.
        self.endpoint = endpoint or endpoint_for(settings.host, allow_insecure_http=allow_insecure_http)
        session = session or boto3.session.Session()
        config = botocore_config(retries)
        common: dict[str, Any] = {"endpoint_url": self.endpoint, "region_name": "us-east-1", "config": config}
        self._reader = session.client(
            "s3",
            aws_access_key_id=settings.downloader_access_key,
            aws_secret_access_key=settings.downloader_access_secret,
            **common,
        )
        self._writer = session.client(
            "s3",
            aws_access_key_id=settings.uploader_access_key,
            aws_secret_access_key=settings.uploader_access_secret,
            **common,
        )
        chunk = multipart_chunk_mb * 1024 * 1024
        self._part_size = chunk
        # Files named by path and seekable sinks stream part by part. A plain file object or a
        # pipe makes s3transfer hold whole parts (or out-of-order parts) in memory, so those get
        # one part at a time to keep memory flat.
        self._transfer = TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=10)
        self._serial = TransferConfig(
            multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=1, use_threads=False
        )

    def _translate(self, exc: Exception, action: str, bucket: str, key: str) -> Exception:
        where = f"{bucket}/{key}"
        if isinstance(exc, boto3.exceptions.S3UploadFailedError):
            # boto3 wraps the ClientError of a failed upload; judge by the original.
            inner = exc.__cause__ or exc.__context__
            if isinstance(inner, Exception):
                return self._translate(inner, action, bucket, key)
        if isinstance(exc, botocore.exceptions.ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING:
                return NotFound(f"{where}: not found on the CDN")
            if code in _REFUSED:
                keys = "read" if action == "download" else "write"
                return CdnError(f"the CDN refused the {keys} keys for {action} of {where} ({code})")
            return CdnError(f"the CDN failed the {action} of {where} ({code or 'error'})")
        if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectionError):
            return CdnError(f"the CDN at {self.endpoint} is unreachable")
        return CdnError(f"the CDN failed the {action} of {where} ({type(exc).__name__})")

    def download_into(self, bucket: str, key: str, sink: IO[bytes] | io.RawIOBase) -> int:
        """Stream an object into a writable binary file object; returns its size."""
        check_bucket(bucket)
        check_name(key, "key")
        start = sink.tell() if sink.seekable() else 0
        try:
            config = self._transfer if sink.seekable() else self._serial
            self._reader.download_fileobj(bucket, key, sink, Config=config)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._translate(exc, "download", bucket, key) from exc
        return sink.tell() - start if sink.seekable() else -1

    def download_to(self, bucket: str, key: str, path: Path) -> int:
        """Download to ``path`` atomically (temp file, fsync, rename); returns the size."""
        with atomic_file(path) as handle:
            self.download_into(bucket, key, handle)
            size = handle.tell()
        log.info("downloaded %s/%s from the CDN (%d bytes)", bucket, key, size)
        return size

    def growing_upload(self, bucket: str, key: str, path: Path) -> GrowingFileUpload:
        """A multipart upload of ``path`` that sends parts while the file is still being written."""
        check_bucket(bucket)
        check_name(key, "key")
        return GrowingFileUpload(
            self._writer,
            bucket,
            key,
            path,
            part_size=self._part_size,
            translate=lambda exc: self._translate(exc, "upload", bucket, key),
        )

    def upload_from(self, bucket: str, key: str, source: IO[bytes] | io.RawIOBase) -> None:
        """Stream a readable binary file object (a pipe too) to the CDN, one part at a time."""
        self._upload(bucket, key, lambda: self._writer.upload_fileobj(source, bucket, key, Config=self._serial))

    def _upload(self, bucket: str, key: str, transfer: Callable[[], None]) -> None:
        check_bucket(bucket)
        check_name(key, "key")
        try:
            transfer()
        except (
            botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError,
            boto3.exceptions.Boto3Error,
            ValueError,
        ) as exc:
            raise self._translate(exc, "upload", bucket, key) from exc
        except OSError as exc:
            raise CdnError(f"reading the input for {bucket}/{key} failed: {exc.strerror}") from exc
        log.info("uploaded %s/%s to the CDN", bucket, key)
