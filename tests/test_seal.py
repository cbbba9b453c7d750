"""Sealing images.enc (SPEC section 4): the format is checked with openssl, the CLI end to end."""

from __future__ import annotations

import hashlib
import io
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from azaiond import crypto
from azaiond.seal import archive_key, main, seal
from azaiond.unlock import decrypted_tar
from tests.fixtures_docker import build_image
from tests.support.devdocker import Dockerd


def _openssl_decrypt(enc: Path, fragment: bytes) -> bytes:
    data = enc.read_bytes()
    key = hashlib.sha256(fragment).hexdigest()
    proc = subprocess.run(
        ["openssl", "enc", "-d", "-aes-256-cbc", "-K", key, "-iv", data[:16].hex()],
        input=data[16:],
        capture_output=True,
        check=True,
    )
    return proc.stdout


def test_archive_key_is_sha256_of_the_raw_fragment() -> None:
    fragment = b"\xff\x00 not utf-8 \x80"
    assert archive_key(fragment) == hashlib.sha256(fragment).digest()
    with pytest.raises(ValueError):
        archive_key(b"")


@pytest.mark.parametrize("size", [0, 1, 15, 16, 1024 * 1024, 3 * 1024 * 1024 + 7])
def test_sealed_archive_decrypts_with_openssl(tmp_path: Path, size: int) -> None:
    plain = secrets.token_bytes(size)
    fragment = secrets.token_bytes(32)
    out = tmp_path / "images.enc"
    written = seal(io.BytesIO(plain), fragment, out)
    assert written == out.stat().st_size == crypto.ciphertext_size(size)
    assert _openssl_decrypt(out, fragment) == plain
    assert [p.name for p in tmp_path.iterdir()] == ["images.enc"]


class _Failing(io.RawIOBase):
    """Gives some bytes, then fails like a dying disk or a broken docker save."""

    def __init__(self) -> None:
        self._calls = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        self._calls += 1
        if self._calls > 2:
            raise OSError(5, "Input/output error")
        buf[:1000] = b"x" * 1000
        return 1000


def test_a_failed_seal_leaves_the_old_archive_and_no_temp_file(tmp_path: Path) -> None:
    out = tmp_path / "images.enc"
    out.write_bytes(b"previous archive")
    with pytest.raises(OSError):
        seal(io.BufferedReader(_Failing()), b"fragment", out)
    assert out.read_bytes() == b"previous archive"
    assert [p.name for p in tmp_path.iterdir()] == ["images.enc"]


def test_cli_new_fragment_is_private_and_never_overwritten(tmp_path: Path) -> None:
    frag = tmp_path / "fragment.bin"
    assert main(["--fragment-file", str(frag), "--new-fragment"]) == 0
    assert frag.stat().st_mode & 0o777 == 0o600
    assert len(frag.read_bytes()) == 32
    first = frag.read_bytes()
    assert main(["--fragment-file", str(frag), "--new-fragment"]) == 1
    assert frag.read_bytes() == first


def test_cli_seals_a_tar_file_and_stdin(tmp_path: Path) -> None:
    frag = tmp_path / "fragment.bin"
    frag.write_bytes(secrets.token_bytes(20))
    tar = tmp_path / "saved.tar"
    tar.write_bytes(secrets.token_bytes(2 * 1024 * 1024 + 3))
    out = tmp_path / "a.enc"
    assert main(["--fragment-file", str(frag), "--tar", str(tar), "-o", str(out)]) == 0
    key = archive_key(frag.read_bytes())
    sink = io.BytesIO()
    with open(out, "rb") as src:
        crypto.decrypt_stream(src, sink, key)
    assert sink.getvalue() == tar.read_bytes()

    out2 = tmp_path / "b.enc"
    proc = subprocess.run(
        [sys.executable, "-m", "azaiond.seal", "--fragment-file", str(frag), "--tar", "-", "-o", str(out2)],
        input=tar.read_bytes(),
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    sink = io.BytesIO()
    with open(out2, "rb") as src:
        crypto.decrypt_stream(src, sink, key)
    assert sink.getvalue() == tar.read_bytes()


def test_cli_refuses_to_run_without_a_source_or_output(tmp_path: Path) -> None:
    frag = tmp_path / "fragment.bin"
    frag.write_bytes(b"x")
    with pytest.raises(SystemExit):
        main(["--fragment-file", str(frag)])
    with pytest.raises(SystemExit):
        main(["--fragment-file", str(frag), "--tar", str(frag)])


@pytest.mark.docker
def test_cli_seals_images_straight_from_docker(dockerd: Dockerd, tmp_path: Path) -> None:
    tag = secrets.token_hex(3)
    names = [f"azaion/seal-a-{tag}:1", f"azaion/seal-b-{tag}:1"]
    ids = {build_image(dockerd, name, tmp_path, 4096) for name in names}
    frag = tmp_path / "fragment.bin"
    out = tmp_path / "images.enc"
    args = ["--fragment-file", str(frag), "--new-fragment", "--image", *names, "-o", str(out)]
    assert main([*args, "--docker-url", dockerd.url]) == 0
    dockerd.remove_images(*names)
    try:
        key = archive_key(frag.read_bytes())
        plain = tmp_path / "check.tar"
        with open(out, "rb", buffering=0) as archive, open(plain, "wb") as sink:
            for piece in decrypted_tar(archive, key):  # the unlock's own stream accepts it
                sink.write(piece)
        dockerd.cli("load", "-i", str(plain))
        for name in names:
            assert dockerd.cli("image", "inspect", "--format", "{{.Id}}", name).strip() in ids
    finally:
        dockerd.remove_images(*names)


@pytest.mark.docker
def test_cli_reports_an_unknown_image_and_writes_nothing(
    dockerd: Dockerd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frag = tmp_path / "fragment.bin"
    frag.write_bytes(b"fragment")
    out = tmp_path / "images.enc"
    argv = ["--fragment-file", str(frag), "--image", "azaion/none:0", "-o", str(out)]
    argv += ["--docker-url", dockerd.url]
    assert main(argv) == 1
    assert "no such image" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fragment.bin"]
