"""Every error kind a real daemon can be made to produce, walked through azaionctl: the
message names the kind and the exit status is the kind's own (10 + its index in ALL_ERRORS).

Provoked here against the daemon process (with the fault proxy and a tmpfs state dir):
not_authenticated, not_found, invalid_name, upstream, cdn, integrity, hardware_mismatch,
forbidden (the API refusing a role), storage. The kinds a test cannot make a real daemon
produce on demand (busy, too_large, invalid_params, docker, config, cancelled, rollback,
stale) are walked through a stand-in server in tests/test_cli.py (test_exit_code_per_kind);
``test_every_kind_has_code_and_exit_status`` pins the table for all of them.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from azaiond.cli import exitcodes
from azaiond.errors import ALL_ERRORS, ERROR_BY_KIND, AzaionError
from tests.faultproxy import Fault, Match
from tests.fixtures_daemon import DaemonHandle
from tests.support.devstack import DevStack
from tests.support.faultkit import FAST, start_proxy, tmpfs
from tests.support.replies import ok

CLI = [sys.executable, "-m", "azaiond.cli.main"]
FOLDER = "kinds-models"
Factory = Callable[..., DaemonHandle]


def ctl(d: DaemonHandle, *args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, "--socket", str(d.socket_path), *args], input=input,
                          capture_output=True, timeout=60, check=False)


def expect(done: subprocess.CompletedProcess[bytes], kind: str, seen: set[str]) -> None:
    assert done.returncode == exitcodes.exit_code_for_kind(kind), (kind, done.returncode, done.stderr)
    assert f"azaionctl: {kind}:".encode() in done.stderr, done.stderr
    seen.add(kind)


def test_every_kind_has_code_and_exit_status() -> None:
    codes = [cls.code for cls in ALL_ERRORS if cls.kind != "config"]
    assert len(set(codes)) == len(codes)
    for index, cls in enumerate(ALL_ERRORS):
        assert issubclass(cls, AzaionError) and cls.kind != "internal"
        assert ERROR_BY_KIND[cls.kind] is cls
        assert exitcodes.exit_code_for_kind(cls.kind) == 10 + index
    assert {"cancelled", "docker", "storage", "stale", "rollback"} <= set(ERROR_BY_KIND)


def test_kinds_through_the_cli(clean_stack: DevStack, azaiond_factory: Factory, tmp_path: Path) -> None:
    clean_stack.ensure_bucket(FOLDER)
    api, cdn = start_proxy(clean_stack.api_url), start_proxy(clean_stack.s3_url)
    mnt = tmp_path / "mnt"
    seen: set[str] = set()
    try:
        with tmpfs(mnt, "16m"):
            state = mnt / "state"

            def writer(path: Path, state_dir: Path, socket_path: Path, **overrides: Any) -> None:
                clean_stack.write_config(path, state, socket_path, **overrides)

            d = azaiond_factory(config_writer=writer, overrides={
                "api": {**FAST["api"], "url": api.url}, "cdn": {**FAST["cdn"], "endpoint": cdn.url}})
            out = str(tmp_path / "out")
            expect(ctl(d, "load", "m.bin", "--folder", FOLDER, "-o", out), "not_authenticated", seen)
            user = clean_stack.user
            login = ctl(d, "login", user.email, input=user.password.encode() + b"\n")
            assert login.returncode == 0, login.stderr
            expect(ctl(d, "load", "bad/name", "--folder", FOLDER, "-o", out), "invalid_name", seen)
            expect(ctl(d, "load", "nothing-here.bin", "--folder", FOLDER, "-o", out), "not_found", seen)
            src = tmp_path / "in.bin"
            src.write_bytes(b"y" * 50_000)
            # A plain User may not upload: the API refuses the role.
            expect(ctl(d, "upload", str(src), "m.bin", "--folder", FOLDER), "forbidden", seen)
            admin = clean_stack.admin
            assert ctl(d, "login", admin.email, input=admin.password.encode() + b"\n").returncode == 0
            assert ctl(d, "upload", str(src), "m.bin", "--folder", FOLDER).returncode == 0
            cached = state / "cache" / FOLDER / "m.bin.big"
            api.set(Fault.answer(503), Match("POST", "/resources/get/"))
            expect(ctl(d, "load", "m.bin", "--folder", FOLDER, "-o", out), "upstream", seen)
            api.clear()
            cached.unlink()
            cdn.set(Fault.answer(503), Match("GET"))
            expect(ctl(d, "load", "m.bin", "--folder", FOLDER, "-o", out), "cdn", seen)
            cdn.clear()
            # A big part with a few bytes too many on the CDN cannot decrypt.
            s3 = clean_stack.s3_admin_client()
            body = s3.get_object(Bucket=FOLDER, Key="m.bin.big")["Body"].read()
            s3.put_object(Bucket=FOLDER, Key="m.bin.big", Body=body + b"12345")
            cached.unlink(missing_ok=True)
            expect(ctl(d, "load", "m.bin", "--folder", FOLDER, "-o", out), "integrity", seen)
            s3.put_object(Bucket=FOLDER, Key="m.bin.big", Body=body)
            # The host's own disk: the state dir turns read-only under the daemon.
            cached.unlink(missing_ok=True)
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            done = ctl(d, "load", "m.bin", "--folder", FOLDER, "-o", out)
            subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
            expect(done, "storage", seen)
            assert str(state).encode() in done.stderr
            # Another machine for a user bound to this one.
            other = azaiond_factory(config_writer=clean_stack.write_config,
                                    overrides={"hardware": "a different machine", "api": {"retries": 0}})
            assert ctl(other, "login", user.email, input=user.password.encode() + b"\n").returncode == 0
            expect(ctl(other, "load", "m.bin", "--folder", FOLDER, "-o", out), "hardware_mismatch", seen)
            assert clean_stack.user.email.encode() not in ctl(other, "load", "m.bin", "--folder", FOLDER,
                                                              "-o", out).stderr
            ok(d.call("health"))
            d.stop()
    finally:
        api.stop()
        cdn.stop()
    assert seen == {"not_authenticated", "invalid_name", "not_found", "forbidden", "upstream", "cdn",
                    "integrity", "storage", "hardware_mismatch"}
