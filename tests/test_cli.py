"""azaionctl as a subprocess, against the real daemon on the dev stack.

FakeDaemon (tests/support/fakedaemon.py) stands in only for what a real daemon cannot be made
to do on demand: every error kind, half-written loads, lost unlock runs, timeouts.
"""

from __future__ import annotations

import base64
import ctypes
import io
import os
import pty
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from azaiond.cli import exitcodes
from azaiond.cli.progress import Progress, render
from azaiond.errors import ALL_ERRORS, AzaionError
from tests.faultproxy import Fault, FaultProxy, Match
from tests.fixtures_daemon import DaemonHandle
from tests.fixtures_stack import unique_name
from tests.support.devstack import DevStack
from tests.support.fakedaemon import GOOD_PASSWORD, FakeDaemon, blob, fake_daemon

CLI = [sys.executable, "-m", "azaiond.cli.main"]
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


@pytest.fixture
def daemon_on_stack(clean_stack: DevStack, azaiond_factory: Callable[..., DaemonHandle]) -> DaemonHandle:
    """The real daemon on the dev stack, not logged in, no credentials installed."""
    return azaiond_factory(config_writer=clean_stack.write_config)


@pytest.fixture
def logged_in(daemon_on_stack: DaemonHandle, clean_stack: DevStack) -> str:
    """The real daemon, logged in as the stack's admin; its socket path."""
    admin = clean_stack.admin
    assert "result" in daemon_on_stack.call("login", {"email": admin.email, "password": admin.password})
    return str(daemon_on_stack.socket_path)


# FakeDaemon only for what the real daemon cannot be made to do on demand: every error kind,
# half-written loads, replies that never come, unlock runs that end as the test says.
@pytest.fixture
def fake() -> Iterator[FakeDaemon]:
    with fake_daemon() as daemon:
        yield daemon


def run(
    socket_path: str,
    *args: str,
    input: bytes | None = None,
    preexec_fn: Callable[[], None] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    # stdin is never the test runner's terminal: without input it is /dev/null.
    return subprocess.run(
        [*CLI, "--socket", socket_path, *args],
        input=input if input is not None else b"",
        capture_output=True,
        timeout=60,
        check=False,
        preexec_fn=preexec_fn,
        cwd=cwd,
    )


def run_with_pty(socket_path: str, *args: str, tty: str) -> tuple[int, bytes, bytes]:
    """Run with stdout or stderr on a pseudo-terminal; returns (status, pty output, other stream)."""
    master, slave = pty.openpty()
    streams: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, tty: slave}
    proc = subprocess.Popen([*CLI, "--socket", socket_path, *args], stdin=subprocess.DEVNULL, **streams)
    os.close(slave)
    seen = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once the child has closed its end
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    out, err = proc.communicate(timeout=60)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, bytes(seen), out if tty == "stderr" else err


# --- basics -----------------------------------------------------------------------------------


def test_health_human_and_json(daemon_on_stack: DaemonHandle) -> None:
    path = str(daemon_on_stack.socket_path)
    done = run(path, "health")
    assert (done.returncode, done.stdout) == (0, b"healthy\n")
    # Global flags also work after the subcommand.
    done = subprocess.run([*CLI, "health", "--json", "--socket", path], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0
    assert done.stdout == b'{"status": "healthy"}\n'


def test_status_human(logged_in: str, clean_stack: DevStack) -> None:
    done = run(logged_in, "status")
    assert done.returncode == 0
    assert f"{clean_stack.admin.email} ({clean_stack.admin.role})".encode() in done.stdout
    assert b"authenticated: yes" in done.stdout


def test_version() -> None:
    done = subprocess.run([*CLI, "--version"], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0
    assert done.stdout.startswith(b"azaionctl 0.1.0")


def test_socket_from_environment(daemon_on_stack: DaemonHandle) -> None:
    env = {**os.environ, "AZAIOND_SOCKET": str(daemon_on_stack.socket_path)}
    done = subprocess.run([*CLI, "health"], capture_output=True, timeout=60, check=False, env=env)
    assert (done.returncode, done.stdout) == (0, b"healthy\n")


def test_exit_codes_documented() -> None:
    done = subprocess.run([*CLI, "--help"], capture_output=True, timeout=60, check=False)
    docs = DOCS.read_text()
    for code, meaning in exitcodes.table_rows():
        assert re.search(rf"^\s*{code}\s+{re.escape(meaning)}$", done.stdout.decode(), re.M), meaning
        assert re.search(rf"^\| {code} \| .*{re.escape(meaning.split(' (')[0])}", docs, re.M), meaning
    for index, cls in enumerate(ALL_ERRORS):
        assert exitcodes.exit_code_for_kind(cls.kind) == 10 + index


# --- login: the password from stdin, never argv ---------------------------------------------------


def test_login_reads_password_from_stdin(daemon_on_stack: DaemonHandle, clean_stack: DevStack) -> None:
    admin = clean_stack.admin
    done = run(str(daemon_on_stack.socket_path), "login", admin.email, input=admin.password.encode() + b"\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"logged in as {admin.email} ({admin.role})\n".encode()
    assert daemon_on_stack.call("status")["result"]["authenticated"] is True
    assert admin.password.encode() not in done.stdout + done.stderr + daemon_on_stack.log_text().encode()


def test_login_refused(daemon_on_stack: DaemonHandle, clean_stack: DevStack) -> None:
    done = run(str(daemon_on_stack.socket_path), "login", clean_stack.admin.email, input=b"wrong-password\n")
    assert done.returncode == exitcodes.exit_code_for_kind("not_authenticated") == 10
    assert b"run: azaionctl login EMAIL" in done.stderr
    assert b"wrong-password" not in done.stderr


@pytest.mark.parametrize("extra", [["hunter2"], ["--password", "hunter2"], ["--password=hunter2"]])
def test_password_is_never_an_argument(daemon_on_stack: DaemonHandle, clean_stack: DevStack, extra: list[str]) -> None:
    done = run(str(daemon_on_stack.socket_path), "login", clean_stack.admin.email, *extra, input=b"hunter2\n")
    assert done.returncode == 2
    assert clean_stack.refserver.calls("/login") == 0  # refused before anything reached the daemon


def test_login_without_password_on_stdin(daemon_on_stack: DaemonHandle, clean_stack: DevStack) -> None:
    done = run(str(daemon_on_stack.socket_path), "login", clean_stack.admin.email, input=b"")
    assert done.returncode == 2
    assert clean_stack.refserver.calls("/login") == 0


def test_logout(logged_in: str) -> None:
    done = run(logged_in, "logout")
    assert (done.returncode, done.stdout) == (0, b"logged out\n")
    assert b"authenticated: no" in run(logged_in, "status").stdout


# --- load and cdn-download: temp file + rename ------------------------------------------------------


def test_load_to_file(logged_in: str, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "in" / "model.bin"
    source.parent.mkdir()
    source.write_bytes(blob(300000))
    assert run(logged_in, "upload", str(source), "model.bin", "--folder", bucket).returncode == 0
    out = tmp_path / "out"
    out.mkdir()
    target = out / "model.bin"
    done = run(logged_in, "load", "model.bin", "--folder", bucket, "-o", str(target))
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == blob(300000)
    assert os.listdir(out) == ["model.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert done.stdout.startswith(b"wrote 300000 bytes to ")
    assert b"sha256 " in done.stdout
    assert done.stderr == b""  # no progress line when stderr is not a terminal


@pytest.mark.parametrize(("name", "code"), [("err-busy", 16), ("partial", 15), ("err-not_found", 12)])
def test_load_failure_leaves_no_file(fake: FakeDaemon, tmp_path: Path, name: str, code: int) -> None:
    target = tmp_path / "model.bin"
    done = run(fake.path, "load", name, "--folder", "models", "-o", str(target))
    assert done.returncode == code
    assert os.listdir(tmp_path) == []


def test_load_failure_keeps_the_old_file(fake: FakeDaemon, tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    done = run(fake.path, "load", "partial", "--folder", "models", "-o", str(target))
    assert done.returncode == 15
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_load_to_unwritable_place(fake: FakeDaemon, tmp_path: Path) -> None:
    done = run(fake.path, "load", "blob-10", "--folder", "f", "-o", str(tmp_path / "no" / "dir" / "x"))
    assert done.returncode == 1
    assert b"cannot write" in done.stderr
    assert fake.calls == []


@pytest.mark.parametrize("how", [["-o", "-"], []])
def test_load_to_stdout(logged_in: str, bucket: str, how: list[str]) -> None:
    assert run(logged_in, "upload", "-", "b.bin", "--folder", bucket, input=blob(200000)).returncode == 0
    done = run(logged_in, "load", "b.bin", "--folder", bucket, *how)
    assert done.returncode == 0, done.stderr
    assert done.stdout == blob(200000)
    assert b"wrote 200000 bytes to stdout" in done.stderr


def test_load_refuses_a_terminal_stdout(fake: FakeDaemon) -> None:
    status, _, err = run_with_pty(fake.path, "load", "blob-10", "--folder", "f", tty="stdout")
    assert status == 2
    assert b"pass -o FILE" in err
    assert fake.calls == []


def test_cdn_upload_and_download(logged_in: str, bucket: str, tmp_path: Path) -> None:
    tmp_path = tmp_path / "files"  # the daemon's own files live in tmp_path too
    tmp_path.mkdir()
    source = tmp_path / "in.bin"
    source.write_bytes(blob(70000))
    done = run(logged_in, "cdn-upload", str(source), bucket, "m.big")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"uploaded 70000 bytes to {bucket}/m.big\n".encode()
    target = tmp_path / "out.bin"
    done = run(logged_in, "cdn-download", bucket, "m.big", "-o", str(target))
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == blob(70000)
    done = run(logged_in, "cdn-download", bucket, "missing", "-o", str(tmp_path / "x"))
    assert done.returncode == 12
    assert sorted(os.listdir(tmp_path)) == ["in.bin", "out.bin"]


# --- upload -----------------------------------------------------------------------------------


def test_upload_file(logged_in: str, bucket: str, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(blob(40000))
    done = run(logged_in, "--json", "upload", str(source), "model", "--folder", bucket)
    assert done.returncode == 0, done.stderr
    assert b'"size": 40000' in done.stdout
    assert run(logged_in, "load", "model", "--folder", bucket, "-o", "-").stdout == blob(40000)


def test_upload_stdin(logged_in: str, bucket: str) -> None:
    done = run(logged_in, "upload", "-", "model", "--folder", bucket, input=blob(5000))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"uploaded 5000 bytes as {bucket}/model".encode())


def test_upload_missing_file(logged_in: str, bucket: str, tmp_path: Path) -> None:
    done = run(logged_in, "upload", str(tmp_path / "nope"), "model", "--folder", bucket)
    assert done.returncode == 1
    assert b"cannot read" in done.stderr


# --- exit codes per kind ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.kind)
def test_exit_code_per_kind(fake: FakeDaemon, tmp_path: Path, cls: type[AzaionError]) -> None:
    done = run(fake.path, "load", f"err-{cls.kind}", "--folder", "f", "-o", str(tmp_path / "x"))
    assert done.returncode == 10 + ALL_ERRORS.index(cls)
    first = done.stderr.decode().splitlines()[0]
    assert first == f"azaionctl: {cls.kind}: failing on purpose with {cls.kind}"
    assert exitcodes.HINTS.get(cls.kind, "") in done.stderr.decode()


def test_forbidden_says_what_is_needed(fake: FakeDaemon, tmp_path: Path) -> None:
    done = run(fake.path, "load", "err-forbidden", "--folder", "f", "-o", str(tmp_path / "x"))
    assert b"this needs root or membership in azaion-admin" in done.stderr


# --- unlock -----------------------------------------------------------------------------------


def _status(state: str, done: int = 0, error: dict[str, str] | None = None) -> dict[str, Any]:
    return {"state": state, "error": error, "progress": {"done": done, "total": 1000}}


def test_unlock_wait_ready(fake: FakeDaemon) -> None:
    fake.unlock_script = [_status("authenticating"), _status("decrypting", 500), _status("ready", 1000)]
    done = run(fake.path, "unlock", "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"unlock: ready\n"
    assert fake.methods() == ["unlock", "unlock_status", "unlock_status"]
    assert fake.calls[0]["params"] == {}  # the daemon's own credentials


def test_unlock_wait_error(fake: FakeDaemon) -> None:
    failure = {"kind": "docker", "message": "the docker engine is not running"}
    fake.unlock_script = [_status("authenticating"), _status("loading", 900), _status("error", 900, failure)]
    done = run(fake.path, "unlock", "--wait")
    assert done.returncode == exitcodes.exit_code_for_kind("docker") == 21
    assert b"the docker engine is not running" in done.stderr
    assert b"systemctl status docker" in done.stderr


def test_unlock_wait_restarts_a_lost_run(fake: FakeDaemon) -> None:
    fake.unlock_script = [_status("authenticating"), _status("idle"), _status("decrypting"), _status("ready")]
    fake.unlock_restarts_script = False
    done = run(fake.path, "unlock", "--wait")
    assert done.returncode == 0, done.stderr
    assert fake.methods().count("unlock") == 2


def test_unlock_wait_timeout(fake: FakeDaemon) -> None:
    fake.unlock_script = [_status("decrypting")]
    done = run(fake.path, "unlock", "--wait", "--timeout", "1")
    assert done.returncode == exitcodes.EXIT_TIMEOUT
    assert b"gave up waiting" in done.stderr


def test_unlock_with_email_reads_password(fake: FakeDaemon) -> None:
    done = run(fake.path, "unlock", "--email", "a@example.com", input=GOOD_PASSWORD.encode() + b"\n")
    assert done.returncode == 0, done.stderr
    assert fake.calls[0]["params"] == {"email": "a@example.com", "password": GOOD_PASSWORD}
    assert b"unlock: ready" in done.stdout


def test_unlock_status(fake: FakeDaemon) -> None:
    fake.unlock_script = [_status("idle"), _status("decrypting", 250)]
    done = run(fake.path, "unlock-status")
    assert done.returncode == 0
    assert done.stdout.startswith(b"unlock: decrypting (25% of")


# --- the daemon out of reach ----------------------------------------------------------------------


def test_daemon_missing() -> None:
    done = run("/nonexistent/azaiond.sock", "health")
    assert done.returncode == exitcodes.EXIT_UNAVAILABLE == 3
    assert b"is azaiond.socket running? systemctl start azaiond.socket" in done.stderr


def test_stale_socket() -> None:
    directory = tempfile.mkdtemp(prefix="azc-")
    path = os.path.join(directory, "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    try:
        done = run(path, "health")
        assert done.returncode == exitcodes.EXIT_UNAVAILABLE
        assert b"stale socket" in done.stderr
    finally:
        shutil.rmtree(directory)


def _without_file_override() -> None:
    # Root passes every permission check on files and sockets (CAP_DAC_OVERRIDE), so chmod 000
    # alone would not stop it. Dropping the two DAC capabilities from the bounding set means the
    # exec'd CLI runs as uid 0 without them, and gets the EACCES a user outside group azaion gets.
    # (Switching to nobody is not an option here: the interpreter lives under /root.)
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied(daemon_on_stack: DaemonHandle) -> None:
    if os.geteuid() != 0:
        pytest.fail("run the suite as root (this test drops capabilities)", pytrace=False)
    path = daemon_on_stack.socket_path
    os.chmod(path, 0)
    try:
        done = run(str(path), "health", preexec_fn=_without_file_override, cwd="/")
        assert done.returncode == exitcodes.EXIT_NO_PERMISSION == 4, done.stderr
        assert b"sudo usermod -aG azaion $USER, then log in again" in done.stderr
    finally:
        os.chmod(path, 0o660)
    assert run(str(path), "health").returncode == 0  # the daemon itself was fine all along


# --- progress -----------------------------------------------------------------------------------


def test_progress_on_a_terminal_for_load(fake: FakeDaemon, tmp_path: Path) -> None:
    target = tmp_path / "m.bin"
    args = ["load", "slow-4000000", "--folder", "f", "-o", str(target)]
    status, seen, _ = run_with_pty(fake.path, *args, tty="stderr")
    assert status == 0
    assert target.read_bytes() == blob(4000000)
    assert b"\r" in seen
    assert b"MiB" in seen


def test_progress_on_a_terminal_for_upload(fake: FakeDaemon, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(blob(60000))
    status, seen, _ = run_with_pty(fake.path, "upload", str(source), "slow", "--folder", "f", tty="stderr")
    assert status == 0
    assert re.search(rb"upload f/slow:\s+\d+% [\d.]+/0\.1 MiB", seen), seen


def test_progress_render_and_updates() -> None:
    assert render("x", 512 * 1024, 1024 * 1024) == "x:  50% 0.5/1.0 MiB"
    assert render("x", 3 * 1024 * 1024, None) == "x: 3.0 MiB"
    assert render("x", 512 * 1024, 1024 * 1024, 256 * 1024) == "x:  50% 0.5/1.0 MiB  0.2 MiB/s  ETA 0:02"
    assert render("x", 0, 7200 * 1024 * 1024, 1024 * 1024) == "x:   0% 0.0/7200.0 MiB  1.0 MiB/s  ETA 2:00:00"
    assert render("x", 3 * 1024 * 1024, None, 1024 * 1024) == "x: 3.0 MiB  1.0 MiB/s"

    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> int:
            self.text += text
            return len(text)

        def flush(self) -> None:
            pass

    stream = Tty()
    with Progress("unlock", stream, interval=0.01) as bar:  # type: ignore[arg-type]
        bar.update(10, 100, "unlock: decrypting")
        threading.Event().wait(0.1)
    assert "unlock: decrypting:  10%" in stream.text
    assert stream.text.endswith("\r\x1b[K")


def test_progress_rate_window_and_daemon_phase() -> None:
    now = [100.0]
    bar = Progress("load f/m", io.StringIO(), lambda: (5, None), enabled=False, clock=lambda: now[0])
    assert bar.rate("a", 0) is None  # one sample: no rate yet
    now[0] += 1.0
    assert bar.rate("a", 1024) == 1024.0
    now[0] += 1.0
    assert bar.rate("b", 4096) is None  # a new label (phase) starts the history over
    # The daemon's (done, total) wins over the sampler while it has a total and is not done.
    bar.daemon(10, 100)
    assert bar._sample() == ("load f/m (from the CDN)", (10, 100))
    bar.daemon(100, 100)
    assert bar._sample() == ("load f/m", (5, None))


def test_progress_of_a_cold_load_shows_the_cdn_phase_with_rate_and_eta(
    clean_stack: DevStack, s3_proxy: FaultProxy, stack_daemon: Callable[..., DaemonHandle], tmp_path: Path
) -> None:
    bucket = unique_name("progress")
    clean_stack.ensure_bucket(bucket)
    d = stack_daemon(overrides={"cdn": {"endpoint": s3_proxy.url, "range_mb": 1, "parallel": 1}})
    data = os.urandom(2 * 1024 * 1024)
    assert "result" in d.call("upload", {"name": "m.bin", "folder": bucket, "data": base64.b64encode(data).decode()})
    assert d.call("cache_drop", {"folder": bucket})["result"]["dropped"] == 1
    # About four seconds of CDN phase: enough frames for a rate, whatever the machine's speed.
    s3_proxy.set(Fault.slow(512 * 1024), Match(method="GET", path_prefix=f"/{bucket}/"))
    out = tmp_path / "m.out"
    status, seen, _ = run_with_pty(str(d.socket_path), "load", "m.bin", "--folder", bucket, "-o", str(out),
                                   tty="stderr")
    assert status == 0, seen
    assert out.read_bytes() == data
    frame = rb"load \S+ \(from the CDN\):\s+\d+% [\d.]+/2\.0 MiB  [\d.]+ MiB/s  ETA \d+:\d\d"
    assert re.search(frame, seen), seen


# --- the real daemon ----------------------------------------------------------------------------


@pytest.fixture
def real_daemon(clean_stack: DevStack, azaiond_factory: Callable[..., DaemonHandle], tmp_path: Path) -> str:
    """The real daemon against the dev stack, with its login credential installed; the socket path."""
    creds = clean_stack.write_credentials(tmp_path / "creds")
    handle = azaiond_factory(config_writer=clean_stack.write_config, env={"CREDENTIALS_DIRECTORY": str(creds)})
    return str(handle.socket_path)


def test_round_trip_through_the_real_daemon(
    real_daemon: str, clean_stack: DevStack, bucket: str, tmp_path: Path
) -> None:
    password = clean_stack.admin.password.encode() + b"\n"
    done = run(real_daemon, "login", clean_stack.admin.email, input=password)
    assert done.returncode == 0, done.stderr
    assert password.strip() not in done.stdout + done.stderr

    source = tmp_path / "in.bin"
    source.write_bytes(blob(300_000))
    done = run(real_daemon, "upload", str(source), "model", "--folder", bucket)
    assert done.returncode == 0, done.stderr

    target = tmp_path / "out" / "model.bin"
    target.parent.mkdir()
    done = run(real_daemon, "load", "model", "--folder", bucket, "-o", str(target))
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == blob(300_000)
    assert os.listdir(target.parent) == ["model.bin"]

    done = run(real_daemon, "load", "model", "--folder", bucket, "-o", "-")
    assert (done.returncode, done.stdout) == (0, blob(300_000))

    done = run(real_daemon, "load", "absent", "--folder", bucket, "-o", str(tmp_path / "out" / "x"))
    assert done.returncode == exitcodes.exit_code_for_kind("not_found")
    assert os.listdir(target.parent) == ["model.bin"]

    done = run(real_daemon, "cdn-upload", str(source), bucket, "raw.bin")
    assert done.returncode == 0, done.stderr
    done = run(real_daemon, "cdn-download", bucket, "raw.bin", "-o", str(tmp_path / "raw.bin"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "raw.bin").read_bytes() == blob(300_000)

    done = run(real_daemon, "load", "../etc", "--folder", bucket, "-o", str(tmp_path / "y"))
    assert done.returncode == exitcodes.exit_code_for_kind("invalid_name")


def test_sigterm_during_load_removes_the_temp_file(fake: FakeDaemon, tmp_path: Path) -> None:
    target = tmp_path / "m.bin"
    proc = subprocess.Popen(
        [*CLI, "--socket", fake.path, "load", "slow-4000000", "--folder", "f", "-o", str(target)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    for _ in range(200):  # wait until the temp file exists and the daemon is writing
        if os.listdir(tmp_path):
            break
        threading.Event().wait(0.02)
    threading.Event().wait(0.3)
    proc.terminate()
    proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert os.listdir(tmp_path) == []


def _at_the_password_prompt(key: bytes) -> tuple[int, bytes]:
    """azaionctl login on a real terminal (a pty as its controlling tty); press ``key`` at the
    prompt. Returns the exit status and everything the terminal showed."""
    pid, master = pty.fork()
    if pid == 0:  # the child: its stdin, stdout and stderr are the pty
        os.execv(sys.executable, [*CLI, "--socket", "/nonexistent/azaiond.sock", "login", "a@example.com"])
    seen = bytearray()
    try:
        while b"assword" not in seen:
            chunk = os.read(master, 1024)
            assert chunk, seen
            seen += chunk
        os.write(master, key)
        while True:
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO once the child is gone
                break
            if not chunk:
                break
            seen += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(master)
    return os.waitstatus_to_exitcode(status), bytes(seen)


def test_ctrl_d_and_ctrl_c_at_the_password_prompt_end_without_a_traceback() -> None:
    status, seen = _at_the_password_prompt(b"\x04")  # Ctrl-D: end of input
    assert status == exitcodes.EXIT_USAGE, seen
    assert b"no password given" in seen and b"Traceback" not in seen
    status, seen = _at_the_password_prompt(b"\x03")  # Ctrl-C: SIGINT from the terminal
    assert status == 130, seen
    assert b"Traceback" not in seen
