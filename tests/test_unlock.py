"""Unlock against a real dockerd and a real reference Resource API (HTTP on loopback).

The job runs in-process here (``UnlockJob`` with real ``Account``/``ResourceApi`` and real
``DockerImages``); the crash case runs it in a child process that is killed with SIGKILL.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from azaiond import crypto
from azaiond.apiclient import Credentials
from azaiond.errors import IntegrityError
from azaiond.images import DockerImages
from azaiond.seal import archive_key, seal
from azaiond.unlock import RUNNING, decrypted_tar
from tests.fixtures_daemon import DaemonHandle
from tests.fixtures_docker import build_image, save_images
from tests.fixtures_unlock import (
    BIG_NAME,
    EMAIL,
    FRAGMENT,
    IMAGE,
    NAME,
    PASSWORD,
    Harness,
    daemon_result,
    wait_daemon,
)
from tests.support.devdocker import Dockerd
from tests.support.refserver import RefServer

pytestmark = pytest.mark.docker

PROGRAMS = Path(__file__).parent / "programs"


@dataclass
class Sealed:
    name: str
    image_id: str
    tar: Path
    enc: Path


def _seal_image(engine: Dockerd, name: str, workdir: Path, random_size: int) -> Sealed:
    image_id = build_image(engine, name, workdir, random_size)
    tar = save_images(engine, [name], workdir / f"{name.replace('/', '_')}.tar")
    enc = workdir / f"{name.replace('/', '_')}.enc"
    with open(tar, "rb") as src:
        seal(src, FRAGMENT, enc)
    engine.remove_images(name)
    return Sealed(name, image_id, tar, enc)


@pytest.fixture(scope="module")
def sealed(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Sealed:
    return _seal_image(dockerd, NAME, tmp_path_factory.mktemp("sealed"), 256 * 1024)


@pytest.fixture(scope="module")
def sealed_big(dockerd: Dockerd, tmp_path_factory: pytest.TempPathFactory) -> Sealed:
    """A 64 MiB random layer: long enough to catch a run in the middle."""
    return _seal_image(dockerd, BIG_NAME, tmp_path_factory.mktemp("sealedbig"), 64 * 1024 * 1024)


@pytest.fixture(autouse=True)
def _no_test_images(dockerd: Dockerd) -> Iterator[None]:
    """Every test starts and ends without the unlocked images (and without dangling ones)."""
    dockerd.remove_images(NAME, BIG_NAME)
    yield
    dockerd.remove_images(NAME, BIG_NAME)


def _error_kind(status: dict[str, object]) -> object:
    error = status["error"]
    assert isinstance(error, dict), status
    return error["kind"]


# -- the happy path ---------------------------------------------------------------------------


def test_unlock_loads_the_image_with_its_id_and_a_second_run_is_ready_at_once(
    harness: Callable[..., Harness], sealed: Sealed, dockerd: Dockerd, api_server: RefServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    before = dockerd.all_images()
    h = harness(sealed.enc)
    status = h.run()
    assert status == {"state": "ready", "error": None, "progress": None}
    assert dockerd.cli("image", "inspect", "--format", "{{.Id}}", sealed.name).strip() == sealed.image_id
    assert dockerd.all_images() - before == {sealed.image_id}  # nothing dangling beside it
    assert api_server.calls("/binary-split/key-fragment") == 1
    assert any(line.startswith("unlock: decrypting") for line in h.lines)
    assert h.lines[-1] == "unlock: ready"

    logins = api_server.calls("/login")
    assert h.run()["state"] == "ready"
    assert api_server.calls("/login") == logins  # ready at once: no login, no key fragment
    assert api_server.calls("/binary-split/key-fragment") == 1

    # No secret in any status line, log record or the persisted state.
    persisted = h.config.unlock_state_path.read_text()
    for text in ("\n".join(h.lines), caplog.text, persisted):
        assert PASSWORD not in text
        assert FRAGMENT.hex() not in text
    assert json.loads(persisted)["state"] == "ready"
    assert h.config.unlock_state_path.stat().st_mode & 0o777 == 0o600


def test_progress_is_reported_in_archive_bytes(
    harness: Callable[..., Harness], sealed_big: Sealed
) -> None:
    h = harness(sealed_big.enc, images=(BIG_NAME,))
    h.job.start(None)
    seen: list[dict[str, int]] = []
    while (status := h.job.status())["state"] in RUNNING:
        if status["state"] == "decrypting" and isinstance(status["progress"], dict):
            seen.append(status["progress"])
        time.sleep(0.005)
    assert status["state"] == "ready", status
    total = sealed_big.enc.stat().st_size
    assert seen and all(p["total"] == total and 0 <= p["done"] <= total for p in seen)
    percents = [line for line in h.lines if line.startswith("unlock: decrypting ")]
    assert 5 <= len(percents) <= 22  # about every 5%, not every chunk


# -- integrity ----------------------------------------------------------------------------------


def _assert_integrity_and_no_new_image(h: Harness, dockerd: Dockerd) -> None:
    before = dockerd.all_images()
    status = h.run()
    assert status["state"] == "error"
    assert status["error"] == {
        "kind": "integrity",
        "message": "the image archive could not be decrypted: wrong key fragment, or a damaged archive",
    }
    assert dockerd.all_images() == before
    assert dockerd.cli("images", "-q", "--filter", "dangling=true") == ""


def test_wrong_key_fragment_is_integrity_and_loads_nothing(
    harness: Callable[..., Harness], sealed: Sealed, dockerd: Dockerd, api_server: RefServer
) -> None:
    for _ in range(3):  # a few random wrong keys: each must fail the same way
        api_server.set_key_fragment(secrets.token_bytes(32))
        _assert_integrity_and_no_new_image(harness(sealed.enc), dockerd)


@pytest.mark.parametrize("cut", [16, 4096, 7, 1024 * 1024 + 5])
def test_truncated_archive_is_integrity(
    harness: Callable[..., Harness], sealed: Sealed, dockerd: Dockerd, tmp_path: Path, cut: int
) -> None:
    damaged = tmp_path / "truncated.enc"
    damaged.write_bytes(sealed.enc.read_bytes()[:-cut])
    _assert_integrity_and_no_new_image(harness(damaged), dockerd)


@pytest.mark.parametrize("offset", [-1, -17, -16])
def test_tampered_last_blocks_are_integrity(
    harness: Callable[..., Harness], sealed: Sealed, dockerd: Dockerd, tmp_path: Path, offset: int
) -> None:
    data = bytearray(sealed.enc.read_bytes())
    data[offset] ^= 0x01  # -17 flips the padding byte through CBC; -1/-16 garble the last block
    damaged = tmp_path / "tampered.enc"
    damaged.write_bytes(bytes(data))
    _assert_integrity_and_no_new_image(harness(damaged), dockerd)


def test_padding_failure_raises_before_docker_sees_the_end_of_the_tar(
    sealed: Sealed, dockerd: Dockerd, tmp_path: Path
) -> None:
    """Bypass the up-front tail check: the stream alone must keep docker from loading anything."""
    plain = sealed.tar.read_bytes()
    key = archive_key(FRAGMENT)
    # Well-formed ciphertext of the whole tar whose final block is not PKCS7 padding.
    iv = secrets.token_bytes(16)
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    bad = iv + enc.update(plain + b"\x00" * 16) + enc.finalize()
    path = tmp_path / "badpad.enc"
    path.write_bytes(bad)

    sent = 0

    def counted(stream: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal sent
        for piece in stream:
            sent += len(piece)
            yield piece

    before = dockerd.all_images()
    images = DockerImages(dockerd.url, 600)
    with open(path, "rb", buffering=0) as archive, pytest.raises(IntegrityError):
        images.load(counted(decrypted_tar(archive, key)))
    images.close()
    assert sent <= len(plain) - 1024  # the two zero blocks that end the tar never left
    assert dockerd.all_images() == before


def test_stream_without_tar_end_is_refused(tmp_path: Path, sealed: Sealed) -> None:
    """Correct padding over a tar that lacks its end blocks is refused too, before the tail."""
    key = archive_key(FRAGMENT)
    path = tmp_path / "short.enc"
    with open(path, "wb") as out:
        crypto.encrypt_stream(io.BytesIO(sealed.tar.read_bytes()[:-1024]), out, key)
    with open(path, "rb", buffering=0) as archive, pytest.raises(IntegrityError):
        for _ in decrypted_tar(archive, key):
            pass


def test_wrong_key_that_passes_the_padding_check_is_caught_by_the_tar_header(sealed: Sealed) -> None:
    """About 1 wrong key in 256 yields valid-looking padding; the first tar block still exposes it."""
    data = sealed.enc.read_bytes()
    while True:
        key = secrets.token_bytes(32)
        try:
            crypto.check_tail(data[-32:], key)
            break
        except IntegrityError:
            continue
    yielded: list[bytes] = []
    with pytest.raises(IntegrityError):
        yielded.extend(decrypted_tar(io.BytesIO(data), key))
    assert yielded == []


# -- archive and engine problems ---------------------------------------------------------------


def test_missing_archive_with_images_present_is_ready(
    harness: Callable[..., Harness], sealed: Sealed, dockerd: Dockerd, api_server: RefServer, tmp_path: Path
) -> None:
    dockerd.cli("load", "-i", str(sealed.tar))
    status = harness(tmp_path / "absent.enc").run()
    assert status["state"] == "ready"
    assert api_server.calls("/login") == 0


def test_missing_archive_with_images_absent_is_not_found(
    harness: Callable[..., Harness], api_server: RefServer, tmp_path: Path
) -> None:
    status = harness(tmp_path / "absent.enc").run()
    assert status["state"] == "error"
    assert _error_kind(status) == "not_found"
    assert api_server.calls("/login") == 0


def test_docker_not_running_is_a_clear_docker_error(
    harness: Callable[..., Harness], sealed: Sealed, tmp_path: Path
) -> None:
    url = f"unix://{tmp_path}/dead.sock"
    status = harness(sealed.enc, docker_url=url).run()
    assert status["state"] == "error"
    assert status["error"] == {
        "kind": "docker",
        "message": f"the Docker engine at {url} is not reachable: is docker.service running?",
    }


def test_no_images_configured_is_ready_without_docker(
    harness: Callable[..., Harness], sealed: Sealed, tmp_path: Path, api_server: RefServer
) -> None:
    # A host without Docker must not fail its boot unlock when nothing is asked of it.
    before = sum(api_server.counters().values())
    status = harness(sealed.enc, images=(), docker_url=f"unix://{tmp_path}/no-docker.sock").run()
    assert status["state"] == "ready" and status["error"] is None
    assert sum(api_server.counters().values()) == before  # no login, no key fragment


def test_images_not_in_the_archive_are_reported(
    harness: Callable[..., Harness], sealed: Sealed, dockerd: Dockerd
) -> None:
    status = harness(sealed.enc, images=(IMAGE, "azaion/not-sealed:{version}")).run()
    assert status["state"] == "error"
    assert _error_kind(status) == "docker"
    assert "azaion/not-sealed:1" in str(status["error"])


# -- the Resource API ----------------------------------------------------------------------------


def test_key_fragment_500_is_retried_then_reported(
    harness: Callable[..., Harness], sealed: Sealed, api_server: RefServer
) -> None:
    api_server.fail_next(4, "/binary-split", 500)  # retries=3: four attempts, all fail
    status = harness(sealed.enc).run()
    assert status["state"] == "error"
    assert _error_kind(status) == "upstream"
    assert api_server.calls("/binary-split/key-fragment") == 4


def test_key_fragment_500_then_success(
    harness: Callable[..., Harness], sealed: Sealed, api_server: RefServer
) -> None:
    api_server.fail_next(2, "/binary-split", 503)
    assert harness(sealed.enc).run()["state"] == "ready"
    assert api_server.calls("/binary-split/key-fragment") == 3


def test_refused_login_is_not_authenticated(
    harness: Callable[..., Harness], sealed: Sealed
) -> None:
    status = harness(sealed.enc).run(Credentials(EMAIL, "wrong password"))
    assert status["state"] == "error"
    assert _error_kind(status) == "not_authenticated"
    assert "wrong password" not in str(status)


def test_no_credentials_is_not_authenticated(harness: Callable[..., Harness], sealed: Sealed) -> None:
    status = harness(sealed.enc, fallback=None).run()
    assert status["state"] == "error"
    assert _error_kind(status) == "not_authenticated"


# -- one job at a time, persistence ---------------------------------------------------------------


def test_ten_concurrent_starts_run_one_job(
    harness: Callable[..., Harness], sealed: Sealed, api_server: RefServer
) -> None:
    h = harness(sealed.enc)
    barrier = threading.Barrier(10)
    replies: list[dict[str, object]] = []

    def call() -> None:
        barrier.wait()
        replies.append(h.job.start(None))

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 10 and all(r["state"] in RUNNING for r in replies)
    assert h.wait()["state"] == "ready"
    assert api_server.calls("/binary-split/key-fragment") == 1
    assert api_server.calls("/login") == 1


def test_a_new_run_never_shows_the_previous_outcome(
    harness: Callable[..., Harness], sealed: Sealed, api_server: RefServer
) -> None:
    api_server.fail_next(4, "/binary-split", 500)
    h = harness(sealed.enc)
    assert h.run()["state"] == "error"
    api_server.set_latency(0.2)  # keep the second run busy long enough to look at it
    reply = h.job.start(None)
    assert reply["state"] in RUNNING
    status = h.job.status()
    assert status["state"] in RUNNING and status["error"] is None
    assert h.wait()["state"] == "ready"


def test_outcome_survives_a_restart_of_the_job(
    harness: Callable[..., Harness], sealed: Sealed, tmp_path: Path
) -> None:
    missing = harness(tmp_path / "absent.enc")
    assert missing.run()["state"] == "error"
    missing.job.close()
    again = harness(tmp_path / "absent.enc")
    assert again.job.status() == missing.job.status()
    assert _error_kind(again.job.status()) == "not_found"

    assert again.job.start(None)["state"] in RUNNING  # a new run replaces the old outcome
    again.wait()
    ok = harness(sealed.enc)
    assert ok.run()["state"] == "ready"
    assert harness(sealed.enc).job.status() == {"state": "ready", "error": None, "progress": None}


def test_close_cancels_a_running_job(
    harness: Callable[..., Harness], sealed_big: Sealed, dockerd: Dockerd
) -> None:
    before = dockerd.all_images()
    h = harness(sealed_big.enc, images=(BIG_NAME,))
    h.job.start(None)
    while h.job.status()["state"] != "decrypting":
        assert h.job.status()["state"] in RUNNING, h.job.status()
        time.sleep(0.001)
    h.job.close()
    status = h.job.status()
    assert status["state"] == "idle" and _error_kind(status) == "interrupted"
    assert dockerd.all_images() == before
    assert harness(sealed_big.enc, images=(BIG_NAME,)).job.status() == status


# -- a crash in the middle of a run -------------------------------------------------------------



def test_kill_9_mid_unlock_then_unlock_again(
    harness: Callable[..., Harness],
    sealed_big: Sealed,
    dockerd: Dockerd,
    api_server: RefServer,
    tmp_path: Path,
) -> None:
    before = dockerd.all_images()
    state = tmp_path / "state"
    args = [state, api_server.url, dockerd.url, sealed_big.enc, BIG_NAME, EMAIL, PASSWORD]
    child = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "unlock_child.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert child.stdout is not None
    seen: list[str] = []
    for line in child.stdout:
        seen.append(line.strip())
        if line.startswith("unlock: decrypting "):  # a percentage line: mid-stream
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait(10)
    assert child.returncode == -signal.SIGKILL, seen
    assert "unlock: ready" not in seen

    h = harness(sealed_big.enc, images=(BIG_NAME,))
    status = h.job.status()
    assert status["state"] == "idle" and _error_kind(status) == "interrupted"
    time.sleep(0.5)  # docker notices the dropped connection and drops its temp files
    assert dockerd.all_images() == before  # the aborted stream created no image

    assert h.run()["state"] == "ready"
    assert dockerd.cli("image", "inspect", "--format", "{{.Id}}", BIG_NAME).strip() == sealed_big.image_id
    assert dockerd.all_images() - before == {sealed_big.image_id}
    assert dockerd.cli("images", "-q", "--filter", "dangling=true") == ""
    # No temp file left behind: only the outcome, the login token and the (empty) cache dir.
    assert sorted(p.name for p in state.iterdir()) == ["cache", "token.json", "unlock.json"]
    assert not list((dockerd.root / "data" / "tmp").glob("docker-import-*"))


# -- through the daemon (a separate process, JSON-RPC on its socket) ---------------------------


def test_daemon_unlock_happy_path_and_status_after_restart(
    unlockd: Callable[..., DaemonHandle], sealed: Sealed, dockerd: Dockerd, api_server: RefServer
) -> None:
    before = dockerd.all_images()
    d = unlockd(sealed.enc)
    assert daemon_result(d.call("unlock"))["state"] in RUNNING
    assert wait_daemon(d) == {"state": "ready", "error": None, "progress": None}
    assert dockerd.cli("image", "inspect", "--format", "{{.Id}}", sealed.name).strip() == sealed.image_id
    assert dockerd.all_images() - before == {sealed.image_id}
    assert daemon_result(d.call("status"))["unlock"] == {"state": "ready", "error": None, "progress": None}

    assert daemon_result(d.call("unlock"))["state"] in {*RUNNING, "ready"}
    assert wait_daemon(d)["state"] == "ready"
    assert api_server.calls("/binary-split/key-fragment") == 1
    d.stop()
    for secret in (PASSWORD, FRAGMENT.hex()):
        assert secret not in d.log_text()

    again = unlockd(sealed.enc)  # same state dir: the outcome survived the restart
    assert daemon_result(again.call("unlock_status")) == {"state": "ready", "error": None, "progress": None}


def test_daemon_ten_concurrent_unlock_calls_start_one_job(
    unlockd: Callable[..., DaemonHandle], sealed: Sealed, api_server: RefServer
) -> None:
    d = unlockd(sealed.enc)
    # The daemon logs in with its credential once it serves; count the job's logins after that.
    deadline = time.monotonic() + 20
    while not daemon_result(d.call("status"))["authenticated"] and time.monotonic() < deadline:
        time.sleep(0.05)
    logins = api_server.calls("/login")
    barrier = threading.Barrier(10)
    states: list[object] = []

    def call() -> None:
        barrier.wait()
        states.append(daemon_result(d.call("unlock"))["state"])

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(states) == 10
    assert wait_daemon(d)["state"] == "ready"
    assert api_server.calls("/binary-split/key-fragment") == 1
    assert api_server.calls("/login") == logins + 1  # one job, one login


def test_daemon_reports_integrity_and_docker_errors(
    unlockd: Callable[..., DaemonHandle], sealed: Sealed, dockerd: Dockerd, api_server: RefServer, tmp_path: Path
) -> None:
    before = dockerd.all_images()
    api_server.set_key_fragment(secrets.token_bytes(32))
    d = unlockd(sealed.enc)
    d.call("unlock")
    status = wait_daemon(d)
    assert status["state"] == "error" and _error_kind(status) == "integrity"
    assert dockerd.all_images() == before
    d.stop()

    dead = unlockd(sealed.enc, docker_url=f"unix://{tmp_path}/dead.sock")
    assert daemon_result(dead.call("unlock_status"))["error"] == status["error"]  # persisted until a new run
    dead.call("unlock")
    status = wait_daemon(dead)
    assert status["state"] == "error" and _error_kind(status) == "docker"
    assert "is not reachable: is docker.service running?" in str(status["error"])


def test_daemon_kill_9_mid_unlock_then_unlock_again(
    unlockd: Callable[..., DaemonHandle], sealed_big: Sealed, dockerd: Dockerd
) -> None:
    before = dockerd.all_images()
    d = unlockd(sealed_big.enc, images=(BIG_NAME,))
    d.call("unlock")
    while True:
        status = daemon_result(d.call("unlock_status"))
        progress = status["progress"]
        if status["state"] == "decrypting" and isinstance(progress, dict) and progress["done"] > 0:
            break
        assert status["state"] in RUNNING, status
        time.sleep(0.002)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)
    time.sleep(0.5)  # docker notices the dropped connection and drops its temp files
    assert dockerd.all_images() == before

    again = unlockd(sealed_big.enc, images=(BIG_NAME,))
    status = daemon_result(again.call("unlock_status"))
    assert status["state"] == "idle" and _error_kind(status) == "interrupted"
    again.call("unlock")
    assert wait_daemon(again)["state"] == "ready"
    assert dockerd.cli("image", "inspect", "--format", "{{.Id}}", BIG_NAME).strip() == sealed_big.image_id
    assert dockerd.all_images() - before == {sealed_big.image_id}
    assert dockerd.cli("images", "-q", "--filter", "dangling=true") == ""
    leftovers = [p for p in again.state_dir.rglob("*") if p.name.endswith(".tmp") or p.suffix == ".tar"]
    assert leftovers == []
    assert not list((dockerd.root / "data" / "tmp").glob("docker-import-*"))
    again.stop()


# -- Debian's docker SDK (python3-docker 5.0.3) ---------------------------------------------------



def test_images_work_with_debians_docker_sdk(sealed: Sealed, dockerd: Dockerd, tmp_path: Path) -> None:
    python = "/usr/bin/python3"
    probe = subprocess.run([python, "-c", "import docker"], capture_output=True, check=False)
    if probe.returncode:
        pytest.fail("Debian's python3-docker is not installed: run scripts/setup.sh (apt-get install python3-docker)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    args = [dockerd.url, sealed.name, str(sealed.tar), f"unix://{tmp_path}/dead.sock"]
    proc = subprocess.run(
        [python, str(PROGRAMS / "debian_docker_check.py"), *args], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sdk 5." in proc.stdout
    assert f"id {sealed.image_id}" in proc.stdout
    assert "is not reachable: is docker.service running?" in proc.stdout
