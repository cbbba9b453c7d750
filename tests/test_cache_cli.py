"""azaionctl cache ls|drop|prefetch and api-load / api-upload against a real daemon."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from azaiond.cli import exitcodes
from tests.fixtures_daemon import DaemonHandle
from tests.fixtures_stack import unique_name
from tests.support.devstack import DevStack
from tests.support.replies import ok

FOLDER = "cache-models"
CLI = [sys.executable, "-m", "azaiond.cli.main"]


def ctl(d: DaemonHandle, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--socket", str(d.socket_path), *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def start(clean_stack: DevStack, stack_daemon: Callable[..., DaemonHandle]) -> Callable[..., DaemonHandle]:
    clean_stack.ensure_bucket(FOLDER)
    return stack_daemon


def test_cache_and_api_commands(start: Callable[..., DaemonHandle], clean_stack: DevStack, tmp_path: Path) -> None:
    d = start()
    name = unique_name("cli")
    data = os.urandom(80_000)
    ok(d.call("upload", {"name": name, "folder": FOLDER, "data": base64.b64encode(data).decode()}))
    ok(d.call("cache_drop"))

    done = ctl(d, "cache", "prefetch", name, "--folder", FOLDER, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cached"] is True
    listing = ctl(d, "cache", "ls", "--json")
    assert listing.returncode == 0, listing.stderr
    entries = json.loads(listing.stdout)["entries"]
    assert [(e["folder"], e["name"]) for e in entries] == [(FOLDER, name)]
    human = ctl(d, "cache")
    assert f"{FOLDER}/{name}" in human.stdout and "total:" in human.stdout and "(no limit)" in human.stdout
    assert "cache:" in ctl(d, "status").stdout and "MiB" in ctl(d, "status").stdout

    refused = ctl(d, "cache", "drop")
    assert refused.returncode == exitcodes.EXIT_USAGE and "--all" in refused.stderr
    dropped = ctl(d, "cache", "drop", "--folder", FOLDER, name, "--json")
    assert dropped.returncode == 0, dropped.stderr
    assert json.loads(dropped.stdout)["dropped"] == 1
    assert json.loads(ctl(d, "cache", "drop", "--all", "--json").stdout) == {"dropped": 0, "freed_bytes": 0}
    bad = ctl(d, "cache", "drop", "--folder", "../x")
    assert bad.returncode == exitcodes.exit_code_for_kind("invalid_name")

    src = tmp_path / "conf.yaml"
    src.write_bytes(b"threshold: 0.5\n" + os.urandom(3000))
    file_name = unique_name("conf") + ".yaml"
    up = ctl(d, "api-upload", str(src), file_name, "--folder", FOLDER)
    assert up.returncode == 0, up.stderr
    assert clean_stack.refserver.get_part(FOLDER, file_name) == src.read_bytes()
    out = tmp_path / "back.yaml"
    down = ctl(d, "api-load", file_name, "--folder", FOLDER, "-o", str(out))
    assert down.returncode == 0, down.stderr
    assert out.read_bytes() == src.read_bytes()
    missing = ctl(d, "api-load", unique_name("none"), "--folder", FOLDER, "-o", str(tmp_path / "x"))
    assert missing.returncode == exitcodes.exit_code_for_kind("not_found")
    assert not (tmp_path / "x").exists()


def test_the_shipped_conffile_parses_and_documents_the_cache_keys() -> None:
    from azaiond import config

    path = Path(__file__).resolve().parent.parent / "debian" / "config.yaml"
    parsed = config.load(path)
    assert parsed.resources.cache_max_mb == 0 and parsed.resources.prefetch == ()
    assert parsed.resources.api_max_mb == 64
    text = path.read_text()
    for key in ("cache_max_mb:", "prefetch:", "api_max_mb:", "- {folder: models, name: yolo.onnx}"):
        assert key in text
