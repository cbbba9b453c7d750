"""Unlock of format v2 archives, and unlock touching only ``unlock.images``, against a real dockerd.

The job runs in-process with the real reference Resource API and the real engine, through the
harness of fixtures_unlock.py.
"""

from __future__ import annotations

import io
import json
import secrets
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from azaiond import archives, sealed
from azaiond.errors import IntegrityError, UnwantedImages
from azaiond.seal import ChunkReader, archive_key, seal
from azaiond.tarcheck import TarWatch
from tests.fixtures_daemon import DaemonHandle
from tests.fixtures_docker import build_image, save_images
from tests.fixtures_unlock import FRAGMENT, VERSION, Harness, wait_daemon
from tests.support.devdocker import Dockerd

pytestmark = pytest.mark.docker

TAG = secrets.token_hex(3)
WANTED = f"azaion/v2unlock-{TAG}:{{version}}"
WANTED_NAME = WANTED.replace("{version}", VERSION)
VICTIM = f"azaion/v2victim-{TAG}:1"


@pytest.fixture(scope="module")
def saved(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``docker save`` of the wanted image (1 MiB of random layer), which is then removed."""
    work = tmp_path_factory.mktemp("v2unlock")
    image_id = build_image(dockerd, WANTED_NAME, work, 1024 * 1024)
    tar = save_images(dockerd, [WANTED_NAME], work / "wanted.tar")
    dockerd.remove_images(WANTED_NAME)
    yield image_id, tar
    dockerd.remove_images(WANTED_NAME)


@pytest.fixture(autouse=True)
def _clean(dockerd: Dockerd) -> Iterator[None]:
    dockerd.remove_images(WANTED_NAME)
    yield
    dockerd.remove_images(WANTED_NAME)


def seal_v2(tar: Path, out: Path, chunk_log2: int = 12) -> Path:
    with open(tar, "rb") as src:
        seal(src, FRAGMENT, out, 2, size=tar.stat().st_size, chunk_log2=chunk_log2)
    return out


def image_id(dockerd: Dockerd, name: str) -> str | None:
    out = dockerd.cli("image", "inspect", "--format", "{{.Id}}", name, check=False).strip()
    return out or None


def test_v2_archive_unlocks_to_the_same_image_id(
    harness: Callable[..., Harness], saved: tuple[str, Path], dockerd: Dockerd, tmp_path: Path
) -> None:
    want_id, tar = saved
    enc = seal_v2(tar, tmp_path / "images.enc", chunk_log2=20)
    raw = enc.read_bytes()
    assert raw[:8] == b"AZIMGS02" and raw[8] == 20
    header = sealed.open_header(raw[:80], archive_key(FRAGMENT), sealed.MAGIC_IMAGES)
    assert header.size == tar.stat().st_size and len(raw) == 80 + header.stream_size
    h = harness(enc, images=(WANTED,))
    status = h.run()
    assert status["state"] == "ready", status
    assert image_id(dockerd, WANTED_NAME) == want_id


def test_v2_sealed_from_a_stream_of_unknown_length(
    harness: Callable[..., Harness], saved: tuple[str, Path], dockerd: Dockerd, tmp_path: Path
) -> None:
    want_id, tar = saved
    enc = tmp_path / "streamed.enc"
    data = tar.read_bytes()
    pieces = (data[i : i + 100_000] for i in range(0, len(data), 100_000))
    seal(io.BufferedReader(ChunkReader(pieces)), FRAGMENT, enc, 2)  # spooled: the size is unknown
    assert enc.read_bytes()[:8] == b"AZIMGS02"
    assert [p.name for p in tmp_path.iterdir()] == ["streamed.enc"]  # no spool left behind
    assert harness(enc, images=(WANTED,)).run()["state"] == "ready"
    assert image_id(dockerd, WANTED_NAME) == want_id


@pytest.mark.parametrize("where", ["first chunk", "middle chunk", "last chunk", "header", "truncated"])
def test_tampered_v2_archive_is_integrity_and_loads_nothing(
    harness: Callable[..., Harness], saved: tuple[str, Path], dockerd: Dockerd, tmp_path: Path, where: str
) -> None:
    _, tar = saved
    enc = seal_v2(tar, tmp_path / "images.enc")
    raw = bytearray(enc.read_bytes())
    step = 4096 + 16
    chunks = (len(raw) - 80) // step
    if where == "truncated":
        raw = raw[: 80 + (chunks // 2) * step]
    else:
        pos = {"first chunk": 80 + 5, "middle chunk": 80 + (chunks // 2) * step + 9,
               "last chunk": len(raw) - 20, "header": 40}[where]
        raw[pos] ^= 0x01
    enc.write_bytes(bytes(raw))
    status = harness(enc, images=(WANTED,)).run()
    assert status["state"] == "error" and status["error"]["kind"] == "integrity", status  # type: ignore[index]
    assert image_id(dockerd, WANTED_NAME) is None


def test_v2_stream_stops_before_the_bad_chunk(saved: tuple[str, Path], tmp_path: Path) -> None:
    _, tar = saved
    enc = seal_v2(tar, tmp_path / "images.enc")
    raw = bytearray(enc.read_bytes())
    step = 4096 + 16
    bad = ((len(raw) - 80) // step) // 2
    raw[80 + bad * step + 100] ^= 0x01
    enc.write_bytes(bytes(raw))
    plain = tar.read_bytes()
    out = bytearray()
    with open(enc, "rb", buffering=0) as archive:
        header = archives.v2_header(archive, len(raw), archive_key(FRAGMENT))
        with pytest.raises(IntegrityError):
            for piece in archives.v2_tar(archive, header, "", lambda n: None, lambda: None):
                out += piece
    assert len(out) == bad * 4096 and plain.startswith(out)


def _retag_tar(tar: Path, out: Path, tags: list[str], manifest_first: bool) -> Path:
    """The same image archive, its manifest.json naming ``tags``."""
    with tarfile.open(tar) as src, tarfile.open(out, "w") as dst:
        members = src.getmembers()
        manifest = next(m for m in members if m.name == "manifest.json")
        doc = json.loads(src.extractfile(manifest).read())  # type: ignore[union-attr]
        doc[0]["RepoTags"] = tags
        body = json.dumps(doc).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(body)
        others = [m for m in members if m.name not in ("manifest.json", "repositories", "index.json")]
        if manifest_first:
            dst.addfile(info, io.BytesIO(body))
        for m in others:
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        if not manifest_first:
            dst.addfile(info, io.BytesIO(body))
    return out


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("manifest_first", [False, True])
def test_archive_with_an_extra_tag_is_refused_and_the_hosts_image_keeps_its_id(
    harness: Callable[..., Harness],
    saved: tuple[str, Path],
    dockerd: Dockerd,
    tmp_path: Path,
    fmt: int,
    manifest_first: bool,
) -> None:
    _, tar = saved
    victim_id = build_image(dockerd, VICTIM, tmp_path, 1000)  # what the host runs under that name
    try:
        bad_tar = _retag_tar(tar, tmp_path / "extra.tar", [WANTED_NAME, VICTIM], manifest_first)
        enc = tmp_path / "images.enc"
        with open(bad_tar, "rb") as src:
            seal(src, FRAGMENT, enc, fmt, size=bad_tar.stat().st_size)
        status = harness(enc, images=(WANTED,)).run()
        assert status["state"] == "error", status
        error = status["error"]
        assert isinstance(error, dict) and error["kind"] == "integrity"
        assert VICTIM in error["message"] and WANTED_NAME not in error["message"]
        assert image_id(dockerd, VICTIM) == victim_id
        assert image_id(dockerd, WANTED_NAME) is None
    finally:
        dockerd.remove_images(VICTIM)


def test_daemon_refuses_an_extra_tag_then_unlocks_the_v2_archive(
    unlockd: Callable[..., DaemonHandle], saved: tuple[str, Path], dockerd: Dockerd, tmp_path: Path
) -> None:
    """Through a real daemon process: the host's image under the extra tag keeps its ID."""
    want_id, tar = saved
    victim_id = build_image(dockerd, VICTIM, tmp_path, 2000)
    try:
        bad_tar = _retag_tar(tar, tmp_path / "extra.tar", [WANTED_NAME, VICTIM], manifest_first=False)
        enc = tmp_path / "images.enc"
        with open(bad_tar, "rb") as src:
            seal(src, FRAGMENT, enc, 2, size=bad_tar.stat().st_size)
        before = dockerd.all_images()
        d = unlockd(enc, images=(WANTED,))
        assert "result" in d.call("unlock")
        status = wait_daemon(d)
        error = status["error"]
        assert status["state"] == "error" and isinstance(error, dict), status
        assert error["kind"] == "integrity" and VICTIM in error["message"]
        assert image_id(dockerd, VICTIM) == victim_id
        assert dockerd.all_images() == before
        d.stop()

        seal_v2(tar, enc, chunk_log2=20)
        d = unlockd(enc, images=(WANTED,))
        d.call("unlock")
        assert wait_daemon(d)["state"] == "ready"
        assert image_id(dockerd, WANTED_NAME) == want_id
        assert image_id(dockerd, VICTIM) == victim_id
    finally:
        dockerd.remove_images(VICTIM)


def test_first_pass_skips_layer_data(saved: tuple[str, Path], tmp_path: Path) -> None:
    _, tar = saved
    enc = seal_v2(tar, tmp_path / "images.enc")
    reads: list[int] = []
    with open(enc, "rb", buffering=0) as archive:
        header = archives.v2_header(archive, enc.stat().st_size, archive_key(FRAGMENT))
        read = archives.v2_reader(archive, header)

        def counted(pos: int, n: int) -> bytes:
            data = read(pos, n)
            reads.append(len(data))
            return data

        archives.scan_names(counted, [WANTED_NAME])
        with pytest.raises(UnwantedImages, match=WANTED_NAME):
            archives.scan_names(read, ["something/else:1"])
    assert sum(reads) < header.size // 4  # the 1 MiB random layer was jumped over


# -- the tar watch on its own ---------------------------------------------------------------------


def _tar(entries: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _names(data: bytes, piece: int = 7) -> set[str]:
    watch = TarWatch()
    for i in range(0, len(data), piece):
        watch.feed(data[i : i + piece])
    assert watch.done
    return watch.names()


MANIFEST = json.dumps([{"Config": "c.json", "RepoTags": ["x/y:1", "docker.io/library/z"], "Layers": []}]).encode()


def test_watch_reads_manifest_repositories_and_index() -> None:
    index = json.dumps({"manifests": [{"annotations": {"io.containerd.image.name": "docker.io/a/b:2"}}]}).encode()
    repos = json.dumps({"r/s": {"3": "abc"}}).encode()
    data = _tar([("blob", b"x" * 5000), ("./manifest.json", MANIFEST), ("repositories", repos), ("index.json", index)])
    assert _names(data) == {"x/y:1", "z:latest", "a/b:2", "r/s:3"}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_watch_follows_long_names_that_hide_a_manifest(fmt: int) -> None:
    long = "d/" * 60 + "x"
    data = _tar([(long, b"1"), ("manifest.json", MANIFEST)], fmt)
    assert _names(data) == {"x/y:1", "z:latest"}
    # A long-name header that renames an ordinary-looking entry to manifest.json.
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("innocent")
        info.size = len(MANIFEST)
        info.pax_headers = {"path": "manifest.json"}
        t.addfile(info, io.BytesIO(MANIFEST))
    assert _names(out.getvalue()) == {"x/y:1", "z:latest"}


def test_watch_refuses_a_broken_header_and_bad_json() -> None:
    data = bytearray(_tar([("manifest.json", MANIFEST)]))
    data[10] ^= 0x01
    with pytest.raises(IntegrityError):
        _names(bytes(data))
    with pytest.raises(IntegrityError):
        _names(_tar([("manifest.json", b"{not json")]))
