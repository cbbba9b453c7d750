"""``azaionctl doctor``: check each piece an operator can get wrong, and name the broken ones.

Socket and group, the daemon itself, the config (``azaiond --check-config``), the Resource
API's and the CDN's reachability from this host, the Docker engine, the login and the token's
expiry, and the hardware string (printed: the vendor needs it to reset a binding). Each check
is independent, so one broken piece never hides another.
"""

from __future__ import annotations

import grp
import os
import shutil
import socket
import stat
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml

from azaiond import hardware
from azaiond.client import Client, ClientError, DaemonUnavailable, RpcError

DEFAULT_CONFIG = Path("/etc/azaiond/config.yaml")
PROBE_TIMEOUT = 5.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def _raw_config(path: Path) -> dict[str, Any]:
    """The config as plain YAML (even a config with errors still names its URLs)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def check_socket(path: str) -> Check:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return Check("socket", False, f"no socket at {path}: systemctl start azaiond.socket")
    except OSError as exc:
        return Check("socket", False, f"cannot see {path}: {exc.strerror}")
    if not stat.S_ISSOCK(info.st_mode):
        return Check("socket", False, f"{path} is not a socket")
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    detail = f"{path} (group {group}, mode {stat.S_IMODE(info.st_mode):04o})"
    if os.getuid() != 0 and info.st_gid not in os.getgroups() and info.st_gid != os.getgid():
        return Check("socket", False, f"{detail}: you are not in group {group}")
    return Check("socket", True, detail)


def check_daemon(client: Client) -> tuple[Check, dict[str, Any] | None, dict[str, Any] | None]:
    try:
        status = client.call("status")
        metrics = client.call("metrics")
    except DaemonUnavailable as exc:
        return Check("daemon", False, f"{exc.message}: {exc.hint}"), None, None
    except (RpcError, ClientError) as exc:
        return Check("daemon", False, str(exc)), None, None
    return Check("daemon", True, f"azaiond {status.get('version')} answers"), status, metrics


def check_config(path: Path) -> Check:
    daemon = shutil.which("azaiond")
    argv = [daemon] if daemon else [sys.executable, "-m", "azaiond.daemon"]
    try:
        done = subprocess.run([*argv, "--check-config", str(path)], capture_output=True, text=True,
                              timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("config", False, f"cannot run azaiond --check-config: {exc}")
    if done.returncode == 0:
        return Check("config", True, f"{path}: ok")
    problems = [line.removeprefix("azaiond: ") for line in done.stderr.strip().splitlines()]
    return Check("config", False, "; ".join(problems) or f"azaiond --check-config exited {done.returncode}")


def check_url(name: str, url: str | None, missing: str) -> Check:
    """Reachable: any HTTP answer at all (even 403 or 404); a refused or timed-out connection is not."""
    if not url:
        return Check(name, False, missing)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return Check(name, False, f"{url} is not an http(s) URL")
    try:
        with requests.get(url, timeout=PROBE_TIMEOUT, stream=True, allow_redirects=False) as resp:
            code = resp.status_code
    except requests.RequestException as exc:
        return Check(name, False, f"{url} is unreachable: {type(exc).__name__}")
    return Check(name, True, f"{url} answers (HTTP {code})")


def check_docker(base_url: str) -> Check:
    if not base_url.startswith("unix://"):
        return Check("docker", True, f"{base_url} (not a Unix socket: not probed)")
    path = base_url.removeprefix("unix://")
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(PROBE_TIMEOUT)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            answer = sock.recv(64)
    except OSError as exc:
        return Check("docker", False, f"{path}: {exc.strerror or exc}: systemctl status docker")
    if not answer.startswith(b"HTTP/1.") or b" 200 " not in answer[:16]:
        return Check("docker", False, f"{path} does not answer like a Docker engine")
    return Check("docker", True, f"{path} answers")


def check_login(status: dict[str, Any] | None, metrics: dict[str, Any] | None) -> Check:
    if status is None:
        return Check("login", False, "unknown: the daemon does not answer")
    if not status.get("authenticated"):
        return Check("login", False, "not logged in: azaionctl login EMAIL, or install the login credential")
    user = status.get("user") or {}
    left = ((metrics or {}).get("gauges") or {}).get("token_expiry_seconds")
    if isinstance(left, int | float):
        if left <= 0:
            return Check("login", False, f"{user.get('email')}: the token has expired")
        return Check("login", True, f"{user.get('email')}: the token expires in {left / 3600:.1f} h")
    return Check("login", True, f"{user.get('email')}")


def run(client: Client, socket_path: str, config_path: Path | None) -> list[Check]:
    path = config_path or Path(os.environ.get("AZAIOND_CONFIG") or DEFAULT_CONFIG)
    raw = _raw_config(path)
    api, cdn, docker = _section(raw, "api"), _section(raw, "cdn"), _section(raw, "docker")
    daemon, status, metrics = check_daemon(client)
    checks = [check_socket(socket_path), daemon, check_config(path)]
    checks.append(check_url("api", api.get("url"), "api.url is not set"))
    if cdn.get("endpoint"):
        checks.append(check_url("cdn", cdn.get("endpoint"), ""))
    else:
        checks.append(Check("cdn", True, "the host comes from the Resource API's cdn.yaml (no cdn.endpoint)"))
    checks.append(check_docker(str(docker.get("base_url") or "unix:///run/docker.sock")))
    checks.append(check_login(status, metrics))
    fixed = raw.get("hardware")
    machine = fixed if isinstance(fixed, str) and fixed != "auto" else hardware.describe()
    checks.append(Check("hardware", True, machine))
    return checks
