"""The S3-compatible CDN: a read client and a write client, each with its own key pair.

The read keys serve downloads and the write keys serve uploads, never the other way round
(docs/formats.md, split resources). Transfers stream: uploads go through boto3's multipart transfer from a file
object; a big part is fetched with ``head`` and ranged ``get_range`` calls (fetch.py writes them
into a partial file that the cache takes over once complete), each range checked to be the
bytes of the same object version. botocore's exceptions are translated here.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
import s3transfer.exceptions
import urllib3.exceptions
import yaml
from boto3.s3.transfer import TransferConfig

from azaiond.cdn_upload import GrowingFileUpload
from azaiond.errors import AzaionError, CdnError, NotFound, UpstreamError
from azaiond.names import check_bucket, check_name
from azaiond.transport import BotoSender
from azaiond.urls import UrlProblem, check_url

# What a transfer may raise besides our own errors: all of it means the CDN failed.
_TRANSFER_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
    s3transfer.exceptions.RetriesExceededError,
    s3transfer.exceptions.S3UploadFailedError,
    urllib3.exceptions.HTTPError,
)

log = logging.getLogger(__name__)

#: S3 object metadata (x-amz-meta-...) on a big part: SHA-256 of the small part it belongs to.
SMALL_SHA256 = "azaion-small-sha256"

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


@dataclass(frozen=True)
class ObjectInfo:
    """What a HEAD tells about an object: its size, ETag and user metadata (keys lower-case)."""

    size: int
    etag: str
    metadata: Mapping[str, str]


class RangeInterrupted(CdnError):
    """A ranged GET broke off (connection cut, short body, timeout): worth retrying from where it got."""


class ObjectChanged(CdnError):
    """The object is no longer the version a download started on (ETag or size changed)."""


class RangeBody:
    """The streaming body of one ranged GET; read errors come out as ``RangeInterrupted``."""

    def __init__(self, body: Any, total: str, where: str) -> None:
        self._body = body
        self.total = total  # the object size the store reported, as text
        self._where = where

    def read(self, size: int) -> bytes:
        try:
            data: bytes = self._body.read(size)
        except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise RangeInterrupted(f"the CDN broke off the download of {self._where}") from exc
        return data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()


def botocore_config(retries: int, timeout: float = 60.0) -> botocore.config.Config:
    options: dict[str, Any] = {
        "retries": {"max_attempts": retries + 1, "mode": "standard"},
        "signature_version": "s3v4",
        "s3": {"addressing_style": "path"},
        "connect_timeout": min(10.0, timeout),
        "read_timeout": timeout,
    }
    # boto3 >= 1.36 sends checksums that many S3-compatible stores refuse; older
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


class RangeReader:
    """The body of a ranged GET with ``readinto``; transfer failures become ``CdnError``."""

    def __init__(self, body: Any, length: int, endpoint: str) -> None:
        self._body = body
        self.length = length
        self._endpoint = endpoint

    def readinto(self, buffer: memoryview, /) -> int:
        try:
            data = self._body.read(len(buffer))
        except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as exc:
            raise CdnError(f"the transfer from the CDN at {self._endpoint} broke off") from exc
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()


class Cdn:
    def __init__(
        self,
        settings: CdnSettings,
        *,
        endpoint: str | None = None,
        retries: int = 3,
        multipart_chunk_mb: int = 8,
        timeout: float = 60.0,
        deadline: float = 300.0,
        session: boto3.session.Session | None = None,
        on_writer: Callable[[Any], None] = lambda client: None,
        allow_insecure_http: bool = False,
    ) -> None:
        # The configured endpoint was checked with the config; cdn.yaml's host is checked here.
        self.endpoint = endpoint or endpoint_for(settings.host, allow_insecure_http=allow_insecure_http)
        session = session or boto3.session.Session()
        config = botocore_config(retries, timeout)
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
        # Every HTTP request to the CDN goes out through our own pool, which holds each request
        # to a wall-clock deadline (a socket timeout alone never ends a 1 byte/s transfer).
        self._sender = BotoSender(deadline, connect_timeout=min(10.0, timeout), read_timeout=timeout)
        for client in (self._reader, self._writer):
            client.meta.events.register("before-send.s3", self._sender)
        on_writer(self._writer)
        chunk = multipart_chunk_mb * 1024 * 1024
        self._part_size = chunk
        # Files named by path and seekable sinks stream part by part. A plain file object or a
        # pipe makes s3transfer hold whole parts (or out-of-order parts) in memory, so those get
        # one part at a time to keep memory flat.
        attempts = retries + 1  # s3transfer's own retries of a broken-off download, as botocore's
        self._transfer = TransferConfig(
            multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=10, num_download_attempts=attempts
        )
        self._serial = TransferConfig(
            multipart_threshold=chunk,
            multipart_chunksize=chunk,
            max_concurrency=1,
            use_threads=False,
            num_download_attempts=attempts,
        )

    @property
    def writer(self) -> Any:
        """The client with the write keys (for cleaning up orphan multipart uploads)."""
        return self._writer

    def _translate(self, exc: Exception, action: str, bucket: str, key: str) -> Exception:
        if isinstance(exc, AzaionError):  # ours already (a full disk under a download: storage)
            return exc
        return self._foreign(exc, action, bucket, key)

    def _foreign(self, exc: Exception, action: str, bucket: str, key: str) -> Exception:
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
        if isinstance(exc, botocore.exceptions.EndpointConnectionError):
            return CdnError(f"the CDN at {self.endpoint} is unreachable")
        # Broken-off transfers, timeouts and deadlines, after botocore's and s3transfer's retries.
        return CdnError(f"the CDN failed the {action} of {where} ({type(exc).__name__})")

    def get_range(self, bucket: str, key: str, start: int, end: int, etag: str) -> RangeBody:
        """Open bytes ``[start, end)`` of an object that must still carry ``etag``.

        The body is checked to be the range asked for, of the same object (Content-Range and
        ETag): a store that ignores the range or serves another version is refused here, so a
        caller never writes bytes of the wrong object at the wrong place. Reading the body can
        still fail mid-way; ``RangeBody.read`` raises ``RangeInterrupted`` then.
        """
        where = f"{bucket}/{key}"
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
        if etag:
            kwargs["IfMatch"] = etag
        try:
            resp = self._reader.get_object(**kwargs)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412"):
                raise ObjectChanged(f"{where} changed on the CDN during the download") from exc
            raise self._translate(exc, "download", bucket, key) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise RangeInterrupted(f"the CDN broke off the download of {where}") from exc
        body = resp["Body"]
        served = resp.get("ContentRange") or ""
        total = served.rpartition("/")[2]
        if served != f"bytes {start}-{end - 1}/{total}":
            body.close()
            raise CdnError(f"the CDN answered a range of {where} with other bytes ({served or 'the whole object'})")
        got_etag = str(resp.get("ETag") or "")
        if etag and got_etag and got_etag != etag:
            body.close()
            raise ObjectChanged(f"{where} changed on the CDN during the download")
        return RangeBody(body, total, where)

    def download_into(self, bucket: str, key: str, sink: IO[bytes] | io.RawIOBase) -> int:
        """Stream an object into a writable binary file object; returns its size."""
        check_bucket(bucket)
        check_name(key, "key")
        start = sink.tell() if sink.seekable() else 0
        try:
            config = self._transfer if sink.seekable() else self._serial
            self._reader.download_fileobj(bucket, key, sink, Config=config)
        except _TRANSFER_ERRORS as exc:
            raise self._translate(exc, "download", bucket, key) from exc
        return sink.tell() - start if sink.seekable() else -1

    def read_from(self, bucket: str, key: str, offset: int) -> RangeReader:
        """The object's bytes from ``offset`` to its end, as a readable stream (one ranged GET)."""
        check_bucket(bucket)
        check_name(key, "key")
        try:
            resp = self._reader.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-")
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._translate(exc, "download", bucket, key) from exc
        return RangeReader(resp["Body"], int(resp.get("ContentLength", -1)), self.endpoint)

    def head(self, bucket: str, key: str) -> ObjectInfo:
        """Size, ETag and metadata of an object, with the read keys."""
        check_bucket(bucket)
        check_name(key, "key")
        try:
            reply = self._reader.head_object(Bucket=bucket, Key=key)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise self._translate(exc, "download", bucket, key) from exc
        metadata = reply.get("Metadata") or {}
        return ObjectInfo(
            size=int(reply.get("ContentLength", 0)),
            etag=str(reply.get("ETag", "")),
            metadata={str(k).lower(): str(v) for k, v in metadata.items()},
        )

    def growing_upload(
        self, bucket: str, key: str, path: Path, metadata: Mapping[str, str] | None = None
    ) -> GrowingFileUpload:
        """A multipart upload of ``path`` that sends parts while the file is still being written."""
        check_bucket(bucket)
        check_name(key, "key")
        return GrowingFileUpload(
            self._writer,
            bucket,
            key,
            path,
            metadata=metadata,
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
        except (*_TRANSFER_ERRORS, ValueError) as exc:
            raise self._translate(exc, "upload", bucket, key) from exc
        except OSError as exc:
            raise CdnError(f"reading the input for {bucket}/{key} failed: {exc.strerror}") from exc
        log.info("uploaded %s/%s to the CDN", bucket, key)
