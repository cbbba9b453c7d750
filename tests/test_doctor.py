"""azaionctl doctor names each broken piece, and passes the pieces that work (real daemon)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.fixtures_daemon import DaemonHandle
from tests.support.devstack import DevStack

Factory = Callable[..., DaemonHandle]


def doctor(socket_path: str, config: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    done = subprocess.run([sys.executable, "-m", "azaiond.cli.main", "--json", "--timeout", "30", "--socket",
                           socket_path, "doctor", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] is (done.returncode == 0)
    return done.returncode, {c["name"]: c for c in out["checks"]}


def test_doctor_names_each_broken_piece(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "api": {"url": "http://127.0.0.1:9/"},  # loopback, so allowed; nothing listens on port 9
        "cdn": {"endpoint": "http://cdn.example.invalid"},  # plain http to a remote host: a config error
        "docker": {"base_url": f"unix://{tmp_path}/no-docker.sock"},
        "hardware": "fixed hardware string",
    }))
    code, checks = doctor(str(tmp_path / "no.sock"), config)
    assert code == 1
    broken = {name for name, c in checks.items() if not c["ok"]}
    assert broken == {"socket", "daemon", "config", "api", "cdn", "docker", "login"}
    assert "cdn.endpoint" in checks["config"]["detail"] and "https://" in checks["config"]["detail"]
    assert "no socket" in checks["socket"]["detail"]
    assert "unreachable" in checks["api"]["detail"] and "unreachable" in checks["cdn"]["detail"]
    assert "no-docker.sock" in checks["docker"]["detail"]
    assert checks["hardware"] == {"name": "hardware", "ok": True, "detail": "fixed hardware string"}


def test_doctor_passes_a_working_daemon(clean_stack: DevStack, azaiond_factory: Factory) -> None:
    d = azaiond_factory(config_writer=clean_stack.write_config)
    assert "result" in d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password})
    _, checks = doctor(str(d.socket_path), d.config_path)
    for name in ("socket", "daemon", "config", "api", "cdn", "login", "hardware"):
        assert checks[name]["ok"], checks[name]
    assert "expires in" in checks["login"]["detail"]
    assert checks["hardware"]["detail"] == clean_stack.hardware
    d.stop()
