"""Environmental faults against the daemon process: a faulty API or CDN (through the fault
proxy), a login the API refuses, state files with garbage, kill -9 mid-upload, a full or
read-only state dir. Each asserts the reply kind, that ``health`` kept answering promptly, and
that nothing was lost or corrupted."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import Fault, FaultProxy, Match
from tests.fixtures_daemon import DaemonHandle, start_daemon
from tests.support.devstack import DevStack
from tests.support.faultkit import FAST, start_proxy, tmpfs
from tests.support.polling import wait_until
from tests.support.replies import kind, ok

FOLDER = "fault-models"
Factory = Callable[..., DaemonHandle]
HEALTH_BOUND = 0.100  # seconds: every health round trip, throughout every fault


def assert_prompt(times: list[float], what: str) -> None:
    # Measured from a process of its own (HealthProbe): round trips timed inside the test
    # process waited for its GIL behind the fault proxies' threads, up to about 90 ms.
    assert times, f"{what}: nothing measured"
    worst = max(times)
    assert worst < HEALTH_BOUND, f"{what}: worst round trip {worst * 1000:.1f} ms (of {len(times)})"


@pytest.fixture
def proxies(clean_stack: DevStack) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    api, cdn = start_proxy(clean_stack.api_url), start_proxy(clean_stack.s3_url)
    try:
        yield api, cdn
    finally:
        api.stop()
        cdn.stop()


PROBE = Path(__file__).resolve().parent / "programs" / "probe.py"


class HealthProbe:
    """A quick method (``health`` by default) in a loop in a process of its own, on a
    connection of its own, recording each round trip (tests/programs/probe.py)."""

    def __init__(self, d: DaemonHandle, method: str = "health", expect: str | None = None) -> None:
        self._argv = [sys.executable, str(PROBE), str(d.socket_path), method, *([expect] if expect else [])]
        self._method = method
        self._proc: subprocess.Popen[bytes] | None = None
        self.times: list[float] = []
        self.failures = 0

    def __enter__(self) -> HealthProbe:
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        assert self._proc.stderr is not None
        assert self._proc.stderr.readline() == b"ready\n"  # connected: the probe runs from here on
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        out, err = self._proc.communicate(b"", timeout=60)  # EOF on its stdin stops it
        assert self._proc.returncode == 0, err
        report = json.loads(out)
        self.times, self.failures = report["times"], report["failures"]

    def assert_prompt(self, what: str) -> None:
        assert self.failures == 0, what
        assert_prompt(self.times, f"{what}: {self._method}")


def _start(clean_stack: DevStack, factory: Factory, api: FaultProxy, cdn: FaultProxy, **extra: Any) -> DaemonHandle:
    clean_stack.ensure_bucket(FOLDER)
    overrides: dict[str, Any] = {
        "api": {**FAST["api"], "url": api.url},
        "cdn": {**FAST["cdn"], "endpoint": cdn.url},
    }
    overrides.update(extra)
    return factory(config_writer=clean_stack.write_config, overrides=overrides)


def _login(d: DaemonHandle, stack: DevStack) -> None:
    ok(d.call("login", {"email": stack.admin.email, "password": stack.admin.password}))


def _upload_inline(d: DaemonHandle, name: str, data: bytes) -> dict[str, Any]:
    return d.call("upload", {"name": name, "folder": FOLDER, "data": base64.b64encode(data).decode()}, timeout=60)


def _load_inline(d: DaemonHandle, name: str, timeout: float = 60) -> dict[str, Any]:
    return d.call("load", {"name": name, "folder": FOLDER}, timeout=timeout)


def _assert_loads(d: DaemonHandle, name: str, data: bytes) -> None:
    got = ok(_load_inline(d, name))
    assert base64.b64decode(got["data"]) == data
    assert got["sha256"] == hashlib.sha256(data).hexdigest()


def _temp_files(root: Path) -> list[Path]:
    return list(root.rglob(".*.tmp"))


# ---- the fault matrix ----------------------------------------------------------------------

CELLS: list[tuple[str, Fault]] = [
    ("hang", Fault.hang()),
    ("slow", Fault.slow(500)),  # bytes per second: far slower than the deadline allows
    ("cut", Fault.cut()),
    ("5xx", Fault.answer(503)),
    ("reset", Fault.reset()),
]


def test_fault_matrix(
    clean_stack: DevStack, azaiond_factory: Factory, proxies: tuple[FaultProxy, FaultProxy], tmp_path: Path
) -> None:
    api, cdn = proxies
    d = _start(clean_stack, azaiond_factory, api, cdn)
    _login(d, clean_stack)
    data = os.urandom(300_000)
    name = f"matrix-{os.getpid()}-{time.monotonic_ns()}"
    ok(_upload_inline(d, name, data))
    cached = d.state_dir / "cache" / FOLDER / f"{name}.big"
    assert cached.is_file()
    big = cached.read_bytes()
    s3 = clean_stack.s3_admin_client()
    results: dict[str, str] = {}
    for side, proxy, match, want in (
        ("api", api, Match("POST", "/resources/get/"), "upstream"),
        ("cdn", cdn, Match("GET"), "cdn"),
    ):
        for label, fault in CELLS:
            cell = f"{side} {label}"
            if side == "cdn":
                cached.unlink(missing_ok=True)  # the load must go to the CDN
            proxy.set(fault, match)
            out = tmp_path / f"{side}-{label}.out"
            with HealthProbe(d) as probe:
                started = time.monotonic()
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    reply = d.call("load", {"name": name, "folder": FOLDER}, fd=fd, timeout=60)
                finally:
                    os.close(fd)
                elapsed = time.monotonic() - started
                # status reads a snapshot: it never waits behind the faulty call.
                status_started = time.monotonic()
                ok(d.call("status"))
                status_took = time.monotonic() - status_started
            proxy.clear()
            assert "error" in reply, f"{cell}: {reply}"
            results[cell] = kind(reply)
            assert kind(reply) == want, f"{cell}: {reply}"
            assert elapsed < 20, f"{cell}: the load took {elapsed:.1f}s"
            assert status_took < 1.0, f"{cell}: status took {status_took:.2f}s"
            probe.assert_prompt(cell)
            assert out.read_bytes() == b"", f"{cell}: bytes were written before the failure"
            # Nothing half-written stays behind, and a cache entry, if any, is the right one.
            assert not _temp_files(d.state_dir), cell
            if cached.exists():
                assert cached.read_bytes() == big, cell
            # The resource upstream is intact: a load through the healed proxies gives it back.
            _assert_loads(d, name, data)
    assert set(results.values()) == {"upstream", "cdn"}
    assert s3.get_object(Bucket=FOLDER, Key=f"{name}.big")["Body"].read() == big
    d.stop()


def test_hung_login_does_not_stall_status_or_health(
    clean_stack: DevStack, azaiond_factory: Factory, proxies: tuple[FaultProxy, FaultProxy]
) -> None:
    """The original stall: login holds its lock across I/O; status and health must not wait."""
    api, cdn = proxies
    d = _start(clean_stack, azaiond_factory, api, cdn)
    api.set(Fault.hang(), Match("POST", "/login"))
    replies: list[dict[str, Any]] = []
    with HealthProbe(d) as probe, HealthProbe(d, "status", "authenticated=false") as status:
        login = threading.Thread(target=lambda: replies.append(
            d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password}, timeout=30)))
        login.start()
        assert wait_until(lambda: api.count("POST", "/login") >= 1)
        login.join()
    assert kind(replies[0]) == "upstream"
    status.assert_prompt("behind a hung login")
    probe.assert_prompt("hung login")
    api.clear()
    _login(d, clean_stack)
    assert ok(d.call("status"))["authenticated"] is True


# ---- login backoff -------------------------------------------------------------------------


def test_refused_stored_login_backs_off(
    clean_stack: DevStack, azaiond_factory: Factory, tmp_path: Path
) -> None:
    clean_stack.ensure_bucket(FOLDER)
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    (creds / "login").write_text(f"email: {clean_stack.admin.email}\npassword: Zz-not-the-password\n")
    before = clean_stack.refserver.calls("/login")
    d = azaiond_factory(config_writer=clean_stack.write_config, env={"CREDENTIALS_DIRECTORY": str(creds)},
                        overrides={"api": {"login_backoff": 30}})
    assert wait_until(lambda: clean_stack.refserver.calls("/login") == before + 1)
    assert wait_until(lambda: "login with the 'login' credential failed" in d.log_text())
    # A burst of loads: every one answers not_authenticated at once, none reaches /login.
    worst = 0.0
    for i in range(60):
        started = time.perf_counter()
        reply = d.call("load", {"name": f"any-{i}", "folder": FOLDER})
        worst = max(worst, time.perf_counter() - started)
        assert kind(reply) == "not_authenticated", reply
        assert clean_stack.admin.email not in reply["error"]["message"]
    assert clean_stack.refserver.calls("/login") == before + 1
    assert worst < 1.0, f"a load under backoff took {worst:.2f}s"
    # An admin's login call is tried at once and clears the backoff.
    _login(d, clean_stack)
    assert clean_stack.refserver.calls("/login") == before + 2
    assert ok(d.call("status"))["authenticated"] is True


# ---- state files -------------------------------------------------------------------------

GARBAGE: list[bytes] = [b"", b"\x00\xff garbage", b'{"state": []}', b"[1, 2]", b'{"state": "ready"',
                        b'{"state": {"a": 1}, "error": 5}', b"null", b'"text"', b"[" * 100_000]


@pytest.mark.parametrize("content", GARBAGE, ids=[f"g{i}" for i in range(len(GARBAGE))])
def test_state_files_are_untrusted(azaiond_factory: Factory, tmp_path: Path, content: bytes) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for name in ("unlock.json", "token.json"):
        (state / name).write_bytes(content)
    (state / "uploads").mkdir(mode=0o700)
    (state / "uploads" / "x.json").write_bytes(content)
    (state / ".leftover.tmp").write_bytes(b"half")

    def writer(path: Path, state_dir: Path, socket_path: Path, **overrides: Any) -> None:
        from tests.fixtures_daemon import write_config
        write_config(path, state, socket_path, **overrides)

    d = azaiond_factory(config_writer=writer)
    status = ok(d.call("status"))
    assert status["authenticated"] is False and status["user"] is None
    assert status["unlock"]["state"] == "idle" and status["unlock"]["error"] is None
    assert not (state / ".leftover.tmp").exists()
    d.stop()


# ---- kill -9 mid-upload --------------------------------------------------------------------


def _uploads_on_cdn(stack: DevStack, bucket: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = stack.s3_admin_client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return uploads


def _restart(d: DaemonHandle, stack: DevStack, env: dict[str, str] | None = None) -> DaemonHandle:
    """A new daemon process on the same config and state dir."""
    return start_daemon(d.config_path.parent, d.socket_path.parent, name=d.config_path.stem,
                        config_writer=lambda *a, **k: None, env=env)


@pytest.mark.parametrize("step", ["streaming", "small_part_pending"])
def test_kill_9_during_upload_leaves_no_orphans(
    clean_stack: DevStack, azaiond_factory: Factory, proxies: tuple[FaultProxy, FaultProxy],
    tmp_path: Path, step: str,
) -> None:
    api, cdn = proxies
    creds = clean_stack.write_credentials(tmp_path / "creds")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    d = azaiond_factory(
        config_writer=clean_stack.write_config, env=env,
        overrides={"api": {**FAST["api"], "url": api.url, "deadline": 60.0},
                   "cdn": {**FAST["cdn"], "endpoint": cdn.url, "deadline": 60.0},
                   "resources": {"small_part_kb": 3}})
    clean_stack.ensure_bucket(FOLDER)
    assert wait_until(lambda: ok(d.call("status"))["authenticated"] is True)
    name = f"kill-{step}-{time.monotonic_ns()}"
    old = os.urandom(100_000)
    ok(_upload_inline(d, name, old))
    assert _uploads_on_cdn(clean_stack, FOLDER) == [] or all(
        u["Key"] != f"{name}.big" for u in _uploads_on_cdn(clean_stack, FOLDER))

    if step == "small_part_pending":
        api.set(Fault.hang(), Match("POST", f"/resources/{FOLDER}"))
    r, w = os.pipe()
    replies: list[Any] = []

    def upload() -> None:
        with contextlib.suppress(OSError, ConnectionError, ValueError):
            replies.append(d.call("upload", {"name": name, "folder": FOLDER}, fd=r, timeout=120))

    caller = threading.Thread(target=upload, daemon=True)
    caller.start()
    chunk = os.urandom(1024 * 1024)
    if step == "streaming":
        for _ in range(12):  # two whole 5 MiB parts: the multipart upload is open
            os.write(w, chunk)
        assert wait_until(lambda: any(u["Key"] == f"{name}.big" for u in _uploads_on_cdn(clean_stack, FOLDER)))
        assert wait_until(lambda: any((d.state_dir / "uploads").glob("*.json")))
    else:
        for _ in range(12):
            os.write(w, chunk)
        os.close(w)
        w = -1
        assert wait_until(lambda: api.count("POST", f"/resources/{FOLDER}") >= 1, timeout=60)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    d.stopped = True
    if w >= 0:
        os.close(w)
    os.close(r)
    api.clear()

    d2 = _restart(d, clean_stack, env)
    try:
        # After the restart's login, nothing is left open on the CDN, in the journal or on disk.
        assert wait_until(lambda: all(u["Key"] != f"{name}.big" for u in _uploads_on_cdn(clean_stack, FOLDER)), 30)
        assert wait_until(lambda: not any((d2.state_dir / "uploads").glob("*.json")), 30)
        assert not _temp_files(d2.state_dir)
        # Every host loads the old resource or is told `stale`, never other bytes: this one
        # (whose cache may hold either big part) and another with an empty cache.
        other = azaiond_factory(name="otherhost", config_writer=clean_stack.write_config, env=env)
        assert wait_until(lambda: ok(other.call("status"))["authenticated"] is True)
        outcomes = []
        for host in (d2, other):
            reply = _load_inline(host, name)
            if "result" in reply:
                got = base64.b64decode(reply["result"]["data"])
                assert got == old, "the load gave other bytes than the old resource"
                outcomes.append("old")
            else:
                assert kind(reply) == "stale", reply
                outcomes.append("stale")
        if step == "streaming":  # the new big part never completed: the old one is whole
            assert outcomes == ["old", "old"]
        other.stop()
    finally:
        d2.stop()


# ---- the state dir's own disk ----------------------------------------------------------------


def test_full_and_read_only_state_dir(
    clean_stack: DevStack, azaiond_factory: Factory, tmp_path: Path, short_tmp: Path
) -> None:
    clean_stack.ensure_bucket(FOLDER)
    mnt = tmp_path / "mnt"
    with tmpfs(mnt, "2m"):
        state = mnt / "state"

        def writer(path: Path, state_dir: Path, socket_path: Path, **overrides: Any) -> None:
            clean_stack.write_config(path, state, socket_path, **overrides)

        d = azaiond_factory(config_writer=writer)
        _login(d, clean_stack)
        small = os.urandom(20_000)
        ok(_upload_inline(d, "fits", small))
        # Full: a 6 MB upload cannot be cached on a 2 MB tmpfs.
        big = os.urandom(6 * 1024 * 1024)
        src = tmp_path / "big.bin"
        src.write_bytes(big)
        fd = os.open(src, os.O_RDONLY)
        try:
            reply = d.call("upload", {"name": "toobig", "folder": FOLDER}, fd=fd, timeout=120)
        finally:
            os.close(fd)
        assert kind(reply) == "storage", reply
        assert str(state) in reply["error"]["message"]
        assert not _temp_files(state)
        assert all(u["Key"] != "toobig.big" for u in _uploads_on_cdn(clean_stack, FOLDER))
        assert not any((state / "uploads").glob("*.json"))
        assert ok(d.call("health")) == {"status": "healthy"}
        _assert_loads(d, "fits", small)  # what was cached is intact
        # Read-only: an upload and an uncached load answer storage; the daemon stays up.
        (state / "cache" / FOLDER / "fits.big").unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        reply = _upload_inline(d, "ro", b"x" * 10_000)
        assert kind(reply) == "storage", reply
        reply = _load_inline(d, "fits")
        assert kind(reply) == "storage", reply
        assert ok(d.call("health")) == {"status": "healthy"}
        assert ok(d.call("status"))["authenticated"] is True
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        assert not _temp_files(state)
        _assert_loads(d, "fits", small)
        d.stop()
