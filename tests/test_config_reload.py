"""Config checking, https-only URLs and live reload (SIGHUP), against the real daemon process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from azaiond import config, wiring
from azaiond.cdn import endpoint_for
from azaiond.errors import CdnError, ConfigError
from azaiond.reload import ReloadHooks, changed_keys
from tests.fixtures_daemon import DaemonHandle, daemon_env, recv_line
from tests.support.polling import wait_until

Factory = Callable[..., DaemonHandle]


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "azaiond.daemon", "--check-config", str(path)],
                          capture_output=True, text=True, env=daemon_env(), timeout=30, check=False)


def _wait_log(d: DaemonHandle, text: str) -> str:
    assert wait_until(lambda: text in d.log_text()), f"{text!r} never logged:\n{d.log_text()}"
    return d.log_text()


def test_check_config_lists_every_error_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "api:\n  url: http://api.example.com\n  retries: lots\n"
        "socket:\n  colour: blue\n  max_message_mb: 0\n"
        "cdn:\n  endpoint: ftp://cdn.example.com\n"
        "log_level: loud\n"
    )
    done = _check(path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    for key in ("api.url", "api.retries", "socket.colour", "socket.max_message_mb", "cdn.endpoint", "log_level"):
        assert any(f"{path}: {key}:" in line for line in lines), (key, lines)
    assert len(lines) == 6
    assert "https://" in next(line for line in lines if "api.url" in line)


def test_check_config_good_file_and_default_path(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text("api:\n  url: https://api.example.com/\nlog_level: debug\n")
    done = _check(path)
    assert done.returncode == 0, done.stderr
    assert f"{path}: ok" in done.stdout
    # Without PATH it checks the file --config names.
    done = subprocess.run([sys.executable, "-m", "azaiond.daemon", "--config", str(path), "--check-config"],
                          capture_output=True, text=True, env=daemon_env(), timeout=30, check=False)
    assert done.returncode == 0 and f"{path}: ok" in done.stdout
    done = _check(tmp_path / "none.yaml")
    assert done.returncode == 2 and "no such file" in done.stderr


@pytest.mark.parametrize(
    "url",
    ["http://api.example.com", "http://10.0.0.1:8080", "http://[2001:db8::1]/x", "http://127.example.com"],
)
def test_plain_http_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match=r"api\.url: plain http://") as info:
        config.parse({"api": {"url": url}, "cdn": {"endpoint": url}})
    assert len(info.value.problems) == 2
    assert any("cdn.endpoint: plain http://" in p for p in info.value.problems)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080", "http://127.3.4.5", "http://[::1]:9000/", "http://localhost:1", "https://x.org"]
)
def test_loopback_and_https_are_accepted(url: str) -> None:
    c = config.parse({"api": {"url": url}, "cdn": {"endpoint": url}})
    assert c.api.url == url.rstrip("/") and c.cdn.endpoint == url.rstrip("/")


@pytest.mark.parametrize(
    ("url", "problem"),
    [("https://", "has no host"), ("https://u:pw@h.org", "user name or password"),
     ("https://h.org/?a=1", "query"), ("https://h.org:99999", "not a valid URL"), ("h.org", "https://")],
)
def test_malformed_urls_are_refused_without_echoing_them(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as info:
        config.parse({"api": {"url": url}})
    assert "pw" not in info.value.message


def test_allow_insecure_http_accepts_and_the_daemon_warns(azaiond_factory: Factory) -> None:
    c = config.parse({"allow_insecure_http": True, "api": {"url": "http://api.example.com"}})
    assert c.api.url == "http://api.example.com"
    d = azaiond_factory(overrides={"allow_insecure_http": True, "api": {"url": "http://api.example.com"}})
    log = _wait_log(d, "allow_insecure_http is true")
    assert "WARNING" in log.split("allow_insecure_http is true")[0].splitlines()[-1]
    d.stop()


def test_cdn_yaml_host_must_be_https() -> None:
    assert endpoint_for("cdn.example.com") == "https://cdn.example.com"
    assert endpoint_for("http://127.0.0.1:9000") == "http://127.0.0.1:9000"
    with pytest.raises(CdnError, match=r"cdn\.yaml"):
        endpoint_for("http://cdn.example.com")
    assert endpoint_for("http://cdn.example.com", allow_insecure_http=True) == "http://cdn.example.com"


def test_reload_hooks_name_what_needs_a_restart() -> None:
    old = config.parse({"api": {"retries": 1}})
    new = config.parse({"api": {"retries": 2}, "socket": {"max_message_mb": 4}, "log_level": "debug"})
    assert changed_keys(old, new) == ["api.retries", "log_level", "socket.max_message_mb"]
    seen: list[int] = []
    hooks = ReloadHooks()
    hooks.register("api", ("api.retries",), lambda c: seen.append(c.api.retries))

    def broken(new: config.Config) -> None:
        raise RuntimeError("cannot")

    hooks.register("broken", ("log_level",), broken)
    report = hooks.apply(old, new)
    assert seen == [2]
    assert report.applied == ["api.retries"]
    assert report.failed == ["log_level"]
    assert report.needs_restart == ["socket.max_message_mb"]


def _rewrite(d: DaemonHandle, **changes: object) -> None:
    data = yaml.safe_load(d.config_path.read_text())
    data.update(changes)
    d.config_path.write_text(yaml.safe_dump(data))


def test_reload_changes_the_log_level_live(azaiond_factory: Factory) -> None:
    d = azaiond_factory()
    d.call("health")
    assert "connection from pid" not in d.log_text()  # a debug line: not at info
    _rewrite(d, log_level="debug", socket={**yaml.safe_load(d.config_path.read_text())["socket"],
                                           "max_message_mb": 2})
    d.proc.send_signal(signal.SIGHUP)
    log = _wait_log(d, "reload applied: log_level")
    assert "need a restart (systemctl restart azaiond): socket.max_message_mb" in log
    assert d.call("health")["result"] == {"status": "healthy"}
    _wait_log(d, "connection from pid")

    # A bad config on reload changes nothing, and the log says why.
    d.config_path.write_text("log_level: loud\napi:\n  url: http://api.example.com\n")
    d.proc.send_signal(signal.SIGHUP)
    log = _wait_log(d, "reload refused, the running config is kept")
    line = next(x for x in log.splitlines() if "reload refused" in x)
    assert "log_level: expected one of debug, info, warning, error" in line and "api.url: plain http://" in line
    before = log.count("connection from pid")
    assert d.call("health")["result"] == {"status": "healthy"}  # still serving, still at debug
    assert wait_until(lambda: d.log_text().count("connection from pid") > before)
    assert d.proc.poll() is None
    d.stop()


def test_reload_applies_cache_limit_and_socket_limits_live(azaiond_factory: Factory) -> None:
    d = azaiond_factory()
    assert d.call("status")["result"]["cache_limit_bytes"] == 0
    data = yaml.safe_load(d.config_path.read_text())
    data["resources"] = {**data.get("resources", {}), "cache_max_mb": 7}
    data["socket"] = {**data["socket"], "max_batch": 2}
    d.config_path.write_text(yaml.safe_dump(data))
    d.proc.send_signal(signal.SIGHUP)
    log = _wait_log(d, "reload applied:")
    line = next(x for x in log.splitlines() if "reload applied:" in x)
    assert "resources.cache_max_mb" in line and "socket.max_batch" in line, line
    assert d.call("status")["result"]["cache_limit_bytes"] == 7 * 1024 * 1024
    # The new batch limit holds from the next message on.
    with d.connect() as sock:
        batch = [{"jsonrpc": "2.0", "method": "health", "id": i} for i in range(3)]
        sock.sendall(json.dumps(batch).encode() + b"\n")
        reply = json.loads(recv_line(sock))
    assert reply["error"]["data"]["kind"] == "too_large", reply
    assert d.proc.poll() is None
    d.stop()


def test_the_documented_live_keys_are_the_ones_the_daemon_takes(tmp_path: Path) -> None:
    cfg = config.parse({"state_dir": str(tmp_path / "state"), "hardware": "test"})
    services = wiring.build_services(cfg)
    try:
        live = set(services.reload_hooks.live_keys) | set(wiring.LIVE_SOCKET_KEYS)
    finally:
        services.close()
    text = (Path(__file__).parent.parent / "docs" / "operators.md").read_text()
    section = text.split("### Reload", 1)[1].split("Any other changed key", 1)[0]
    documented = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", section)) - {"systemctl"}
    assert documented == live


def test_the_daemon_will_not_start_on_a_plain_http_url(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"socket:\n  path: {tmp_path / 'd.sock'}\nstate_dir: {tmp_path / 'state'}\nhardware: test\n"
        "api:\n  url: http://api.example.com\n"
    )
    done = subprocess.run([sys.executable, "-m", "azaiond.daemon", "--config", str(path)],
                          capture_output=True, text=True, env=daemon_env(), timeout=60, check=False)
    assert done.returncode == 2  # RestartPreventExitStatus=2: systemd does not loop on it
    assert f"{path}: api.url: plain http://" in done.stderr
    assert not (tmp_path / "d.sock").exists()
    assert not (tmp_path / "state").exists()
