"""FileSlice, the request body of every upload part: what its two readers (botocore's payload hash
and urllib3's sender) get from it, and that it reads into one buffer instead of allocating."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import botocore.auth
import botocore.awsrequest
import botocore.credentials
from urllib3.util.request import body_to_chunks

from azaiond.cdn_upload import READ_BLOCK, FileSlice
from azaiond.transport import SEND_BLOCK, BotoSender


def _file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "big"
    path.write_bytes(data)
    return path, data


def test_read_gives_the_window_block_by_block(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 3 * READ_BLOCK + 123)
    start, length = 1000, 2 * READ_BLOCK + 77
    with FileSlice(path, start, length) as body:
        got = bytearray()
        while block := body.read(READ_BLOCK):
            assert len(block) <= READ_BLOCK
            got += block
        assert bytes(got) == data[start : start + length]
        assert body.tell() == length
        assert len(body.read(10)) == 0
        body.seek(5)
        assert bytes(body.read()) == data[start + 5 : start + length]


def test_read_reuses_one_buffer(tmp_path: Path) -> None:
    path, _ = _file(tmp_path, 4 * READ_BLOCK)
    with FileSlice(path, 0, 4 * READ_BLOCK) as body:
        first = body.read(READ_BLOCK)
        owner = first.obj
        for _ in range(3):
            assert body.read(READ_BLOCK).obj is owner  # no allocation per block


def test_botocore_hash_and_urllib3_send_see_the_same_bytes(tmp_path: Path) -> None:
    """The signature's payload hash reads the body, rewinds it, and the sender reads it again:
    both must see exactly the window, so the store accepts the part (it checks the hash)."""
    path, data = _file(tmp_path, 3 * READ_BLOCK)
    start, length = 17, 2 * READ_BLOCK + 5
    want = data[start : start + length]
    with FileSlice(path, start, length) as body:
        request = botocore.awsrequest.AWSRequest(method="PUT", url="http://127.0.0.1:1/bucket/key", data=body)
        auth = botocore.auth.S3SigV4Auth(botocore.credentials.Credentials("a", "b"), "s3", "us-east-1")
        assert auth.payload(request) == hashlib.sha256(want).hexdigest()
        assert body.tell() == 0  # rewound for the send
        sent = b"".join(bytes(chunk) for chunk in body_to_chunks(body, "PUT", SEND_BLOCK).chunks or ())
        assert sent == want


def test_cdn_connections_send_in_large_blocks() -> None:
    sender = BotoSender(10.0, connect_timeout=1.0, read_timeout=1.0)
    try:
        pool = sender._pools.connection_from_url("http://127.0.0.1:1/")
        assert pool._new_conn().blocksize == SEND_BLOCK
    finally:
        sender.close()
