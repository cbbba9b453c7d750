"""azaionctl --json against the real daemon: every subcommand's output (results and errors)
is one JSON document on stdout; unlock-status fails when the unlock failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from azaiond.cli import exitcodes
from tests.fixtures_daemon import DaemonHandle
from tests.fixtures_stack import unique_name
from tests.support.devstack import DevStack

Factory = Callable[..., DaemonHandle]


def ctl(d: DaemonHandle | None, *args: str, stdin: str = "") -> tuple[int, Any]:
    sock = str(d.socket_path) if d else "/nonexistent/azaiond.sock"
    done = subprocess.run([sys.executable, "-m", "azaiond.cli.main", "--json", "--timeout", "60",
                           "--socket", sock, *args], input=stdin, capture_output=True, text=True,
                          timeout=120, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)  # exactly one JSON document


def test_every_subcommand_prints_json(clean_stack: DevStack, azaiond_factory: Factory, tmp_path: Path) -> None:
    folder = unique_name("clijson")
    clean_stack.ensure_bucket(folder)
    overrides = {"unlock": {"images": ["azaion/none:1"]}, "docker": {"base_url": f"unix://{tmp_path}/no.sock"}}
    d = azaiond_factory(config_writer=clean_stack.write_config, overrides=overrides)
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(50_000))
    admin = clean_stack.admin

    results = {
        "health": ctl(d, "health"),
        "status": ctl(d, "status"),
        "login": ctl(d, "login", admin.email, stdin=admin.password + "\n"),
        "upload": ctl(d, "upload", str(src), "r.bin", "--folder", folder),
        "load": ctl(d, "load", "r.bin", "--folder", folder, "-o", str(tmp_path / "out.bin")),
        "cdn-upload": ctl(d, "cdn-upload", str(src), folder, "raw.bin"),
        "cdn-download": ctl(d, "cdn-download", folder, "raw.bin", "-o", str(tmp_path / "raw.out")),
        "cache prefetch": ctl(d, "cache", "prefetch", "r.bin", "--folder", folder),
        "cache ls": ctl(d, "cache", "ls"),
        "cache drop": ctl(d, "cache", "drop", "--folder", folder),
        "api-upload": ctl(d, "api-upload", str(src), "whole.bin", "--folder", folder),
        "api-load": ctl(d, "api-load", "whole.bin", "--folder", folder, "-o", str(tmp_path / "whole.out")),
        "metrics": ctl(d, "metrics"),
        "version": ctl(d, "version"),
        "credential": ctl(d, "credential", "login", "a@b.c", "-o", str(tmp_path / "login"), "--no-encrypt",
                          stdin="pw\n"),
        "logout": ctl(d, "logout"),
    }
    for name, (code, out) in results.items():
        assert code == 0 and isinstance(out, dict) and "error" not in out, (name, code, out)
    assert results["health"][1] == {"status": "healthy"}
    assert results["version"][1]["daemon"] == results["version"][1]["client"]
    assert "azaiond_calls_total" in results["metrics"][1]["text"]
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
    assert (tmp_path / "whole.out").read_bytes() == src.read_bytes()
    assert results["cache drop"][1]["dropped"] == 1
    assert any(e["name"] == "r.bin" for e in results["cache ls"][1]["entries"])
    # doctor: one JSON report; Docker is unreachable and the daemon logged out: exit 1, both named.
    code, out = ctl(d, "doctor", "--config", str(d.config_path))
    assert code == 1 and out["ok"] is False, (code, out)
    broken = {c["name"] for c in out["checks"] if not c["ok"]}
    assert broken == {"docker", "login"}, out  # logged out above

    errors = {
        "load": (ctl(d, "load", "absent.bin", "--folder", folder, "-o", str(tmp_path / "x")), "not_authenticated"),
        "login": (ctl(d, "login", admin.email, stdin="wrong\n"), "not_authenticated"),
        "unavailable": (ctl(None, "status"), "unavailable"),
        "usage": (ctl(d, "login", admin.email, stdin=""), "failure"),
        "help": (ctl(d, "help", "nope"), "failure"),
    }
    for name, ((code, out), kind) in errors.items():
        assert code != 0 and out["error"]["kind"] == kind, (name, code, out)
        assert out["error"]["exit_status"] == code and out["error"]["message"]

    # The unlock fails (no Docker there): --wait and unlock-status both exit with its kind.
    code, out = ctl(d, "unlock", "--wait")
    assert code == exitcodes.exit_code_for_kind("docker") and out["state"] == "error"
    code, out = ctl(d, "unlock-status")
    assert code == exitcodes.exit_code_for_kind("docker")
    assert out["state"] == "error" and out["error"]["kind"] == "docker"
    d.stop()
