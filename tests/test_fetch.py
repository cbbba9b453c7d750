"""Cold-load fetching (fetch.py, partial.py) against moto's S3, with the fault proxy in between.

Parallel ranged GETs must give the exact bytes for every size around range boundaries; a cut
range resumes from the byte where it stopped; a failed download resumes from its partial file;
an object that changed starts over; records are untrusted input; readers honour cancel.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from azaiond.cdn import Cdn, CdnSettings, ObjectInfo
from azaiond.errors import Cancelled, CdnError, StorageError
from azaiond.fetch import DownloadReader, Fetcher
from azaiond.partial import Extents, sweep
from tests.faultproxy import Fault, FaultProxy, Match
from tests.support.devstack import DevStack
from tests.support.polling import wait_until

R = 64 * 1024  # range size of these tests
KEY = "obj.big"


@pytest.fixture
def cdn(clean_stack: DevStack, s3_proxy: FaultProxy) -> Cdn:
    """The daemon's CDN client, reaching moto through the fault proxy, no botocore retries."""
    return Cdn(CdnSettings.from_yaml(clean_stack.cdn_yaml()), endpoint=s3_proxy.url, retries=0)


def put(stack: DevStack, bucket: str, data: bytes) -> None:
    stack.s3_admin_client().put_object(Bucket=bucket, Key=KEY, Body=data)


def gets(s3_proxy: FaultProxy, bucket: str) -> Match:
    return Match(method="GET", path_prefix=f"/{bucket}/{KEY}")


def read_all(reader: DownloadReader) -> bytes:
    out = bytearray()
    buf = bytearray(100_000)  # not a multiple of the range size: reads straddle ranges
    while n := reader.readinto(buf):
        out += buf[:n]
    return bytes(out)


def install_at(dest: Path) -> Callable[[Path], None]:
    """What the cache does with a finished download, reduced to a rename to ``dest``."""

    def install(staged: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, dest)

    return install


def open_at(fetcher: Fetcher, cdn: Cdn, bucket: str, dest: Path, **kw: Any) -> DownloadReader | None:
    return fetcher.open(lambda: cdn, bucket, KEY, dest, install=install_at(dest), present=dest.exists, **kw)


def fetch(fetcher: Fetcher, cdn: Cdn, bucket: str, dest: Path, **kw: Any) -> bytes:
    reader = open_at(fetcher, cdn, bucket, dest, **kw)
    assert reader is not None
    with reader:
        data = read_all(reader)
        reader.finish()
    return data


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file())


# -- pure parts ------------------------------------------------------------------------------


def test_extents_merge_and_gaps() -> None:
    e = Extents([(10, 20), (0, 5), (5, 10), (30, 40)])
    assert e.spans == [(0, 20), (30, 40)]
    assert e.prefix() == 20 and e.total() == 30
    assert e.gaps(50) == [(20, 30), (40, 50)]
    assert e.covers(31, 40) and not e.covers(19, 31)
    e.add(15, 35)
    assert e.spans == [(0, 40)]
    assert Extents().gaps(7) == [(0, 7)] and Extents().prefix() == 0


# -- exact bytes -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, R - 1, R, R + 1, 2 * R, 3 * R - 1, 5 * R + 17])
def test_parallel_ranges_give_the_exact_bytes(
    clean_stack: DevStack, bucket: str, cdn: Cdn, s3_proxy: FaultProxy, tmp_path: Path, size: int
) -> None:
    data = os.urandom(size)
    put(clean_stack, bucket, data)
    fetcher = Fetcher(tmp_path / "partial", range_size=R, parallel=3, retries=1)
    dest = tmp_path / "cache" / bucket / KEY
    got = fetch(fetcher, cdn, bucket, dest)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert dest.read_bytes() == data
    assert s3_proxy.count("GET", f"/{bucket}/{KEY}") == -(-size // R)  # one GET per range, none twice
    assert leftovers(tmp_path / "partial") == []  # renamed into the cache, record gone


def test_tail_is_readable_before_the_middle(
    clean_stack: DevStack, bucket: str, cdn: Cdn, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    # The last range is fetched second, so a v1 load can vet the padding early. With one
    # worker and the third GET held, the tail is there while the middle is not.
    data = os.urandom(4 * R)
    put(clean_stack, bucket, data)
    s3_proxy.set(Fault.passthrough(), gets(s3_proxy, bucket), times=2)
    s3_proxy.add(Fault.hang(), gets(s3_proxy, bucket))
    fetcher = Fetcher(tmp_path / "partial", range_size=R, parallel=1, retries=1)
    reader = open_at(fetcher, cdn, bucket, tmp_path / "c" / KEY)
    assert reader is not None
    with reader:
        assert reader.pread(4 * R - 32, 32) == data[-32:]
        assert reader.pread(0, 10) == data[:10]
        s3_proxy.clear()
        assert read_all(reader) == data
        reader.finish()


# -- cuts and resumption ---------------------------------------------------------------------


def test_cut_range_resumes_from_the_byte_where_it_stopped(
    clean_stack: DevStack, bucket: str, cdn: Cdn, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    size = 6 * R
    data = os.urandom(size)
    put(clean_stack, bucket, data)
    s3_proxy.set(Fault.cut(after=R // 3), gets(s3_proxy, bucket), times=2)
    fetcher = Fetcher(tmp_path / "partial", range_size=R, parallel=2, retries=2)
    got = fetch(fetcher, cdn, bucket, tmp_path / "c" / KEY)
    assert got == data
    assert s3_proxy.faulted == 2
    # 6 ranges plus one retry for each cut one; the retries ask only for what was missing.
    assert s3_proxy.count("GET", f"/{bucket}/{KEY}") == 8
    assert s3_proxy.bytes_down < size + 8 * 1024  # the object once, plus response heads


def test_failed_download_resumes_from_its_partial_file(
    clean_stack: DevStack, bucket: str, cdn: Cdn, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    size = 10 * R
    data = os.urandom(size)
    put(clean_stack, bucket, data)
    # Six ranges arrive, then every GET is answered 503: the download fails as `cdn`.
    s3_proxy.set(Fault.passthrough(), gets(s3_proxy, bucket), times=6)
    s3_proxy.add(Fault.answer(503), gets(s3_proxy, bucket))
    root = tmp_path / "partial"
    with pytest.raises(CdnError):
        fetch(Fetcher(root, range_size=R, parallel=2, retries=1), cdn, bucket, tmp_path / "c" / KEY)
    record = json.loads((root / bucket / f"{KEY}.part.json").read_text())
    have = Extents([tuple(s) for s in record["extents"]]).total()
    assert have >= 6 * R
    assert not (tmp_path / "c" / KEY).exists()  # nothing half-written is in the cache
    first = s3_proxy.bytes_down
    s3_proxy.clear()
    # A new fetcher (as after a restart) fetches only what the record lacks.
    got = fetch(Fetcher(root, range_size=R, parallel=2, retries=1), cdn, bucket, tmp_path / "c" / KEY)
    assert got == data
    assert s3_proxy.bytes_down - first < size - have + 16 * 1024
    assert s3_proxy.bytes_down < 1.1 * size


def test_changed_object_starts_over(
    clean_stack: DevStack, bucket: str, cdn: Cdn, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    old, new = os.urandom(8 * R), os.urandom(8 * R + 5)
    put(clean_stack, bucket, old)
    s3_proxy.set(Fault.passthrough(), gets(s3_proxy, bucket), times=4)
    s3_proxy.add(Fault.answer(503), gets(s3_proxy, bucket))
    root = tmp_path / "partial"
    with pytest.raises(CdnError):
        fetch(Fetcher(root, range_size=R, parallel=2, retries=0), cdn, bucket, tmp_path / "c" / KEY)
    assert (root / bucket / f"{KEY}.part.json").exists()
    s3_proxy.clear()
    put(clean_stack, bucket, new)  # another ETag and size: the partial file is worthless
    before = s3_proxy.bytes_down
    got = fetch(Fetcher(root, range_size=R, parallel=2, retries=0), cdn, bucket, tmp_path / "c" / KEY)
    assert got == new
    assert s3_proxy.bytes_down - before >= len(new)  # all of it fetched again


def test_object_changing_mid_download_is_cdn_and_leaves_nothing(
    clean_stack: DevStack, bucket: str, cdn: Cdn, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    put(clean_stack, bucket, os.urandom(4 * R))
    s3_proxy.set(Fault.passthrough(), gets(s3_proxy, bucket), times=1)
    s3_proxy.add(Fault.hang(), gets(s3_proxy, bucket), times=1)
    root = tmp_path / "partial"
    fetcher = Fetcher(root, range_size=R, parallel=1, retries=2)
    reader = open_at(fetcher, cdn, bucket, tmp_path / "c" / KEY)
    assert reader is not None
    with reader:
        assert wait_until(lambda: s3_proxy.count("GET", f"/{bucket}/{KEY}") == 2)
        put(clean_stack, bucket, os.urandom(4 * R))  # the retry's If-Match now fails
        s3_proxy.drop_connections()
        with pytest.raises(CdnError) as err:
            read_all(reader)
        assert "changed" in err.value.message
    assert wait_until(lambda: leftovers(root) == [])


def test_untrusted_records_mean_starting_over(
    clean_stack: DevStack, bucket: str, cdn: Cdn, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    data = os.urandom(3 * R)
    put(clean_stack, bucket, data)
    etag = cdn.head(bucket, KEY).etag
    root = tmp_path / "partial"
    part = root / bucket / f"{KEY}.part"
    record = root / bucket / f"{KEY}.part.json"
    bad_records = [
        b"not json",
        json.dumps({"etag": etag, "size": 3 * R, "extents": [[0, 3 * R]]}).encode(),  # file too short
        json.dumps({"etag": etag, "size": 3 * R, "extents": [[0, "x"]]}).encode(),
        json.dumps({"etag": etag, "size": 3 * R, "extents": [[-1, 5]]}).encode(),
        json.dumps({"etag": '"other"', "size": 3 * R, "extents": [[0, R]]}).encode(),
        json.dumps([1, 2]).encode(),
    ]
    for i, body in enumerate(bad_records):
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(b"\xff" * R)  # garbage the record would vouch for
        record.write_bytes(body)
        dest = tmp_path / "c" / f"{i}.big"
        assert fetch(Fetcher(root, range_size=R, parallel=2, retries=0), cdn, bucket, dest) == data, body


def test_a_complete_partial_file_is_committed_without_a_get(
    clean_stack: DevStack, bucket: str, cdn: Cdn, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    # A crash after the last checkpoint but before the rename leaves a complete partial file.
    data = os.urandom(3 * R + 1)
    put(clean_stack, bucket, data)
    info = cdn.head(bucket, KEY)
    root = tmp_path / "partial"
    (root / bucket).mkdir(parents=True)
    (root / bucket / f"{KEY}.part").write_bytes(data)
    record = {"etag": info.etag, "size": info.size, "extents": [[0, info.size]]}
    (root / bucket / f"{KEY}.part.json").write_text(json.dumps(record))
    got = fetch(Fetcher(root, range_size=R, parallel=2, retries=0), cdn, bucket, tmp_path / "c" / KEY)
    assert got == data
    assert s3_proxy.count("GET", f"/{bucket}/{KEY}") == 0
    assert leftovers(root) == []


def test_sweep_removes_old_partial_files(tmp_path: Path) -> None:
    root = tmp_path / "partial"
    (root / "f").mkdir(parents=True)
    old, fresh, other = root / "f" / "a.big.part", root / "f" / "b.big.part.json", root / "f" / "keep.txt"
    for p in (old, fresh, other):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    assert sweep(root, 3600) == 1
    assert not old.exists() and fresh.exists() and other.exists()


# -- readers: sharing, progress, cancel, storage ---------------------------------------------


def test_concurrent_readers_share_one_download(
    clean_stack: DevStack, bucket: str, cdn: Cdn, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    data = os.urandom(7 * R + 3)
    put(clean_stack, bucket, data)
    fetcher = Fetcher(tmp_path / "partial", range_size=R, parallel=2, retries=0)
    dest = tmp_path / "c" / KEY
    results: list[bytes] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def one() -> None:
        try:
            barrier.wait()
            reader = open_at(fetcher, cdn, bucket, dest)
            if reader is None:  # finished before this one came: read the cache entry
                results.append(dest.read_bytes())
                return
            with reader:
                results.append(read_all(reader))
                reader.finish()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert results == [data] * 6
    assert s3_proxy.count("GET", f"/{bucket}/{KEY}") == 8
    assert s3_proxy.count("HEAD", f"/{bucket}/{KEY}") <= 6


def test_progress_reports_the_cdn_phase(
    clean_stack: DevStack, bucket: str, cdn: Cdn, tmp_path: Path
) -> None:
    size = 40 * R
    put(clean_stack, bucket, os.urandom(size))
    seen: list[tuple[int, int | None]] = []
    lock = threading.Lock()

    def progress(done: int, total: int | None) -> None:
        with lock:
            seen.append((done, total))

    fetch(Fetcher(tmp_path / "p", range_size=R, parallel=3, retries=0), cdn, bucket, tmp_path / "c" / KEY,
          progress=progress)
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert all(total == size for _, total in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(seen) >= 3


def test_cancel_while_waiting_for_bytes(
    clean_stack: DevStack, bucket: str, cdn: Cdn, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    put(clean_stack, bucket, os.urandom(4 * R))
    s3_proxy.set(Fault.passthrough(), gets(s3_proxy, bucket), times=1)
    s3_proxy.add(Fault.hang(), gets(s3_proxy, bucket), times=1)
    root = tmp_path / "partial"
    cancel = threading.Event()
    fetcher = Fetcher(root, range_size=R, parallel=1, retries=0)
    reader = open_at(fetcher, cdn, bucket, tmp_path / "c" / KEY, cancel=cancel)
    assert reader is not None
    with reader:
        assert wait_until(lambda: s3_proxy.count("GET", f"/{bucket}/{KEY}") == 2)
        threading.Timer(0.2, cancel.set).start()
        with pytest.raises(Cancelled):
            read_all(reader)
    # The last reader left: the download stops, keeps what it has, and frees the path.
    s3_proxy.drop_connections()
    fetcher.close(timeout=10)
    record = json.loads((root / bucket / f"{KEY}.part.json").read_text())
    assert record["extents"] == [[0, R]]
    assert not (tmp_path / "c" / KEY).exists()


def test_disk_failure_is_storage_with_the_path(
    clean_stack: DevStack, bucket: str, cdn: Cdn, tmp_path: Path
) -> None:
    put(clean_stack, bucket, os.urandom(R))
    root = tmp_path / "partial"
    root.mkdir()
    (root / bucket).write_bytes(b"a file where the folder's directory should be")
    with pytest.raises(StorageError) as err:
        fetch(Fetcher(root, range_size=R, parallel=1, retries=0), cdn, bucket, tmp_path / "c" / KEY)
    assert str(root / bucket) in err.value.message


def test_head_exposes_size_etag_and_metadata(clean_stack: DevStack, bucket: str, cdn: Cdn) -> None:
    clean_stack.s3_admin_client().put_object(
        Bucket=bucket, Key=KEY, Body=b"abc", Metadata={"azaion-small-sha256": "00ff"}
    )
    info = cdn.head(bucket, KEY)
    assert info.size == 3 and info.etag.startswith('"')
    assert info.metadata == {"azaion-small-sha256": "00ff"}


def test_check_sees_the_head_before_any_byte(
    clean_stack: DevStack, bucket: str, cdn: Cdn, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    put(clean_stack, bucket, os.urandom(R))

    class Refused(CdnError):
        pass

    def check(info: ObjectInfo) -> None:
        raise Refused(f"size {info.size}")

    check_fn: Callable[[ObjectInfo], None] = check
    with pytest.raises(Refused):
        open_at(Fetcher(tmp_path / "p", range_size=R, parallel=1, retries=0), cdn, bucket, tmp_path / "c" / KEY,
                check=check_fn)
    assert s3_proxy.count("GET", f"/{bucket}/{KEY}") == 0
