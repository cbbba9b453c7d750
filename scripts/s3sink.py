#!/usr/bin/env python3
"""A fast S3-compatible origin on 127.0.0.1, for benchmarks of uploads (a dev tool, not product).

moto's S3 is pure Python (about 0.05 GiB/s) and hides the client's own costs. This server
implements only what azaiond and boto3's transfers use, and moves bodies with large reads and
``sendfile``, so it costs little next to the client:

- PutObject, HeadObject, GetObject (Range, If-Match), DeleteObject;
- CreateMultipartUpload, UploadPart, CompleteMultipartUpload, AbortMultipartUpload,
  ListMultipartUploads;
- HeadBucket and CreateBucket (every bucket exists).

What it does not do, on purpose: check signatures (any key pair is accepted), compute MD5
ETags (an ETag is a random token per object version, which is all a client may rely on for
multipart objects anyway), verify ``x-amz-content-sha256``, or keep anything across restarts.
``aws-chunked`` bodies (flexible checksums) are refused with 501, so a client configured for
them fails loudly instead of storing framed bytes.

Objects live under ``root`` as files; a completed multipart upload is the list of its part
files, read back in order, so completing costs no copy. Path-style addressing only. With
``--discard`` (``discard=True``) bodies go to /dev/null and only their lengths are kept: an
upload benchmark then measures the client alone, as with a CDN on another host, and objects
cannot be read back.

    python3 -m scripts.s3sink --root /var/tmp/sink [--port 0] [--discard]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import os
import re
import secrets
import shutil
import socket
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

PIPE = 1024 * 1024  # bytes a splice moves at a time (the pipe is enlarged to this)
_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


@dataclass
class StoredObject:
    segments: list[tuple[Path, int]]  # files read in order make the body
    etag: str
    metadata: dict[str, str]
    modified: float = field(default_factory=time.time)

    @property
    def size(self) -> int:
        return sum(n for _, n in self.segments)


@dataclass
class Upload:
    bucket: str
    key: str
    metadata: dict[str, str]
    directory: Path
    parts: dict[int, tuple[Path, int, str]] = field(default_factory=dict)  # number -> (file, size, etag)
    started: float = field(default_factory=time.time)


class SinkError(Exception):
    def __init__(self, status: int, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.status = status
        self.code = code


class Store:
    """Objects and open multipart uploads; bodies as files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "uploads").mkdir(parents=True, exist_ok=True)
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self.uploads: dict[str, Upload] = {}
        self.lock = threading.Lock()

    def new_object_path(self) -> Path:
        return self.root / "objects" / secrets.token_hex(12)

    def put(self, bucket: str, key: str, obj: StoredObject) -> None:
        with self.lock:
            old = self.objects.get((bucket, key))
            self.objects[(bucket, key)] = obj
        if old is not None:
            self._remove(old)

    def get(self, bucket: str, key: str) -> StoredObject:
        with self.lock:
            obj = self.objects.get((bucket, key))
        if obj is None:
            raise SinkError(404, "NoSuchKey")
        return obj

    def delete(self, bucket: str, key: str) -> None:
        with self.lock:
            old = self.objects.pop((bucket, key), None)
        if old is not None:
            self._remove(old)

    @staticmethod
    def _remove(obj: StoredObject) -> None:
        # A reader still sending the old body keeps its open descriptors; unlinking is safe.
        for path, _ in obj.segments:
            path.unlink(missing_ok=True)
            if path.parent.name != "objects" and not any(path.parent.iterdir()):
                path.parent.rmdir()

    def upload(self, upload_id: str, bucket: str, key: str) -> Upload:
        with self.lock:
            up = self.uploads.get(upload_id)
        if up is None or (up.bucket, up.key) != (bucket, key):
            raise SinkError(404, "NoSuchUpload")
        return up


def _etag() -> str:
    return f'"{secrets.token_hex(16)}"'


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: boto3 reuses its connections
    server: SinkServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing -------------------------------------------------------------------------

    def _target(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        path = unquote(parts.path).lstrip("/")
        bucket, _, key = path.partition("/")
        return bucket, key, parse_qs(parts.query, keep_blank_values=True)

    def _metadata(self) -> dict[str, str]:
        prefix = "x-amz-meta-"
        return {k.lower()[len(prefix) :]: v for k, v in self.headers.items() if k.lower().startswith(prefix)}

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _xml(self, root: str, fields: dict[str, str], status: int = 200) -> None:
        # S3's error documents carry no namespace; botocore finds the Code only without one.
        el = ET.Element(root) if root == "Error" else ET.Element(root, xmlns=_NS)
        for k, v in fields.items():
            ET.SubElement(el, k).text = v
        body = ET.tostring(el, xml_declaration=True, encoding="UTF-8")
        self._reply(status, body, {"Content-Type": "application/xml"})

    def _error(self, exc: SinkError) -> None:
        if self.command == "HEAD":
            self._reply(exc.status)
            return
        self._xml("Error", {"Code": exc.code, "Message": str(exc)}, exc.status)

    def _receive(self, path: Path) -> int:
        """Write the request body to ``path``; returns its length.

        What the request line's reader buffered is written first; the rest goes from the socket
        to the file with ``splice`` through a pipe, so no body byte is copied into this process
        (the origin shares the CPU with the client it measures).
        """
        if "aws-chunked" in self.headers.get("Content-Encoding", "") or self.headers.get(
            "x-amz-content-sha256", ""
        ).startswith("STREAMING-"):
            raise SinkError(501, "NotImplemented", "aws-chunked bodies (flexible checksums) are not supported")
        length = self.headers.get("Content-Length")
        if length is None:
            raise SinkError(411, "MissingContentLength")
        left = int(length)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        if self.server.discard:  # the file stays empty: the object's length is kept, not its bytes
            os.close(fd)
            fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            reader = cast(io.BufferedReader, self.rfile)  # what StreamRequestHandler makes (rbufsize -1)
            buffered = reader.peek(1)[:left] if left else b""
            if buffered:
                os.write(fd, self.rfile.read(len(buffered)))
                left -= len(buffered)
            pipe_r, pipe_w = self.server.pipes.get()
            try:
                sock = self.connection.fileno()
                while left:
                    n = os.splice(sock, pipe_w, min(left, PIPE))
                    if not n:
                        raise SinkError(400, "IncompleteBody")
                    left -= n
                    while n:
                        n -= os.splice(pipe_r, fd, n)
            except BaseException:
                os.close(pipe_r)  # it may hold bytes of this body: never reuse it
                os.close(pipe_w)
                raise
            self.server.pipes.put((pipe_r, pipe_w))
        finally:
            os.close(fd)
        return int(length)

    def _read_small_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _dispatch(self, handler: Any) -> None:
        try:
            handler()
        except SinkError as exc:
            if self.headers.get("Content-Length") and self.command in ("PUT", "POST"):
                self.close_connection = True  # the body may be unread: do not reuse the connection
            self._error(exc)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    # -- methods --------------------------------------------------------------------------

    def do_PUT(self) -> None:
        self._dispatch(self._put)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_HEAD(self) -> None:
        self._dispatch(self._get)

    def do_DELETE(self) -> None:
        self._dispatch(self._delete)

    def _put(self) -> None:
        bucket, key, query = self._target()
        store = self.server.store
        if not key:  # CreateBucket: every bucket exists already
            self._read_small_body()
            self._reply(200, headers={"Location": f"/{bucket}"})
            return
        if "uploadId" in query:  # UploadPart
            up = store.upload(query["uploadId"][0], bucket, key)
            number = int(query["partNumber"][0])
            if not 1 <= number <= 10000:
                raise SinkError(400, "InvalidArgument", "part number out of range")
            path = up.directory / f"{number:05d}.{secrets.token_hex(4)}"
            size = self._receive(path)
            etag = _etag()
            with store.lock:
                old = up.parts.get(number)
                up.parts[number] = (path, size, etag)
            if old is not None:
                old[0].unlink(missing_ok=True)
            self._reply(200, headers={"ETag": etag})
            return
        path = store.new_object_path()
        size = self._receive(path)
        etag = _etag()
        store.put(bucket, key, StoredObject([(path, size)], etag, self._metadata()))
        self._reply(200, headers={"ETag": etag})

    def _post(self) -> None:
        bucket, key, query = self._target()
        store = self.server.store
        if "uploads" in query:  # CreateMultipartUpload
            self._read_small_body()
            upload_id = secrets.token_hex(16)
            directory = store.root / "uploads" / upload_id
            directory.mkdir()
            with store.lock:
                store.uploads[upload_id] = Upload(bucket, key, self._metadata(), directory)
            self._xml("InitiateMultipartUploadResult", {"Bucket": bucket, "Key": key, "UploadId": upload_id})
            return
        if "uploadId" in query:  # CompleteMultipartUpload
            upload_id = query["uploadId"][0]
            up = store.upload(upload_id, bucket, key)
            listed = ET.fromstring(self._read_small_body())
            wanted: list[tuple[int, str]] = []
            for part in listed.iter():
                if part.tag.rpartition("}")[2] != "Part":
                    continue
                fields = {c.tag.rpartition("}")[2]: (c.text or "") for c in part}
                wanted.append((int(fields["PartNumber"]), fields["ETag"]))
            if not wanted or [n for n, _ in wanted] != sorted({n for n, _ in wanted}):
                raise SinkError(400, "InvalidPartOrder")
            with store.lock:
                segments = []
                for number, etag in wanted:
                    have = up.parts.get(number)
                    if have is None or have[2].strip('"') != etag.strip('"'):
                        raise SinkError(400, "InvalidPart", f"part {number}")
                    segments.append((have[0], have[1]))
                del store.uploads[upload_id]
            unused = {p for p, _, _ in up.parts.values()} - {p for p, _ in segments}
            for path in unused:
                path.unlink(missing_ok=True)
            etag = f'"{secrets.token_hex(16)}-{len(segments)}"'
            store.put(bucket, key, StoredObject(segments, etag, up.metadata))
            self._xml(
                "CompleteMultipartUploadResult",
                {"Location": f"/{bucket}/{key}", "Bucket": bucket, "Key": key, "ETag": etag},
            )
            return
        raise SinkError(501, "NotImplemented")

    def _delete(self) -> None:
        bucket, key, query = self._target()
        store = self.server.store
        if "uploadId" in query:  # AbortMultipartUpload
            up = store.upload(query["uploadId"][0], bucket, key)
            with store.lock:
                store.uploads.pop(query["uploadId"][0], None)
            shutil.rmtree(up.directory, ignore_errors=True)
        elif key:
            store.delete(bucket, key)
        self._reply(204)

    def _list_uploads(self, bucket: str) -> None:
        el = ET.Element("ListMultipartUploadsResult", xmlns=_NS)
        ET.SubElement(el, "Bucket").text = bucket
        ET.SubElement(el, "IsTruncated").text = "false"
        with self.server.store.lock:
            uploads = [(i, u) for i, u in self.server.store.uploads.items() if u.bucket == bucket]
        for upload_id, up in sorted(uploads, key=lambda x: (x[1].key, x[1].started)):
            u = ET.SubElement(el, "Upload")
            ET.SubElement(u, "Key").text = up.key
            ET.SubElement(u, "UploadId").text = upload_id
            ET.SubElement(u, "Initiated").text = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(up.started))
        self._reply(200, ET.tostring(el, xml_declaration=True, encoding="UTF-8"), {"Content-Type": "application/xml"})

    def _get(self) -> None:
        bucket, key, query = self._target()
        if not key:
            if "uploads" in query and self.command == "GET":
                self._list_uploads(bucket)
            else:  # HeadBucket (and a bare bucket GET): every bucket exists
                self._reply(200)
            return
        obj = self.server.store.get(bucket, key)
        match = self.headers.get("If-Match")
        if match is not None and match.strip() not in ("*", obj.etag):
            raise SinkError(412, "PreconditionFailed")
        size = obj.size
        start, end, status = 0, size, 200  # [start, end)
        spec = self.headers.get("Range")
        if spec is not None:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
            if m is None or m.groups() == ("", ""):
                raise SinkError(400, "InvalidRange")
            if m.group(1):
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start = max(0, size - int(m.group(2)))
            if start >= size or start >= end:
                raise SinkError(416, "InvalidRange")
            status = 206
        headers = {
            "ETag": obj.etag,
            "Last-Modified": formatdate(obj.modified, usegmt=True),
            "Accept-Ranges": "bytes",
            "Content-Type": "binary/octet-stream",
            "Content-Length": str(end - start),
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers.update({f"x-amz-meta-{k}": v for k, v in obj.metadata.items()})
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        self.wfile.flush()
        self._send_range(obj, start, end)

    def _send_range(self, obj: StoredObject, start: int, end: int) -> None:
        """Body bytes [start, end) across the object's segment files, with sendfile."""
        offset = 0
        for path, length in obj.segments:
            lo, hi = max(start, offset), min(end, offset + length)
            if lo < hi:
                with open(path, "rb") as f:
                    self.connection.sendfile(f, lo - offset, hi - lo)
            offset += length
            if offset >= end:
                break


class _Pipes:
    """Pipes for ``splice``, shared by the handler threads (one per body being received)."""

    def __init__(self) -> None:
        self._free: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def get(self) -> tuple[int, int]:
        with self._lock:
            if self._free:
                return self._free.pop()
        r, w = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe still works, in more turns
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE)
        return r, w

    def put(self, pipe: tuple[int, int]) -> None:
        with self._lock:
            self._free.append(pipe)

    def close(self) -> None:
        with self._lock:
            for fd in (fd for pipe in self._free for fd in pipe):
                os.close(fd)
            self._free.clear()


class SinkServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, root: Path, port: int = 0, *, discard: bool = False) -> None:
        self.store = Store(root)
        self.pipes = _Pipes()
        self.discard = discard
        super().__init__(("127.0.0.1", port), Handler)

    def server_close(self) -> None:
        super().server_close()
        self.pipes.close()

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        super().server_bind()


class S3Sink:
    """The server on a background thread: ``S3Sink(root).url``, then ``stop()``."""

    def __init__(self, root: Path, port: int = 0, *, discard: bool = False) -> None:
        self.server = SinkServer(root, port, discard=discard)
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3sink", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def store(self) -> Store:
        return self.server.store

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def __enter__(self) -> S3Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="where bodies are kept (created)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--discard", action="store_true",
                        help="write bodies to /dev/null: uploads only, nothing can be read back")
    args = parser.parse_args()
    server = SinkServer(args.root, args.port, discard=args.discard)
    print(f"s3sink on http://127.0.0.1:{server.server_address[1]}, bodies under {args.root}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
