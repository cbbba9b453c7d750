"""The login credential: written as JSON by ``azaionctl credential login``, read by the daemon at
start (the boot unlock's login path), for passwords that a YAML recipe would break."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from azaiond.credentials import parse_login
from tests.fixtures_daemon import DaemonHandle
from tests.fixtures_stack import unique_name
from tests.support.devdocker import Dockerd
from tests.support.devstack import DevStack
from tests.support.polling import wait_until
from tests.support.refserver import User

Factory = Callable[..., DaemonHandle]

PASSWORDS = [
    'it\'s "quoted"',
    "p@ss #1",
    "a: b",
    "12345678",
    "*x",
    "пароль-密码-🔑",
    "yes",
    "  spaced {[,]} \\ end  ",
]


def azaionctl(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "azaiond.cli.main", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def test_parse_login_prefers_json_and_keeps_yaml() -> None:
    creds = parse_login('{"email": "a@b.c", "password": "12345678"}')
    assert creds is not None and creds.password == "12345678"
    creds = parse_login("email: a@b.c\npassword: 'quoted: yes'\n")
    assert creds is not None and creds.password == "quoted: yes"
    # The YAML pitfalls are refused (with a log line), never turned into a wrong password.
    assert parse_login("email: a@b.c\npassword: 12345678\n") is None
    assert parse_login("email: a@b.c\npassword: yes\n") is None
    assert parse_login("email: a@b.c\npassword: *x\n") is None
    assert parse_login("[1, 2]") is None


def test_cli_writes_json_that_round_trips(tmp_path: Path) -> None:
    for i, password in enumerate(PASSWORDS):
        out = tmp_path / f"login{i}"
        done = azaionctl("credential", "login", "ops@example.com", "-o", str(out), "--no-encrypt",
                         stdin=password + "\n")
        assert done.returncode == 0, done.stderr
        assert out.stat().st_mode & 0o777 == 0o600
        assert json.loads(out.read_text(encoding="utf-8")) == {"email": "ops@example.com", "password": password}
        creds = parse_login(out.read_text(encoding="utf-8"))
        assert creds is not None and creds.password == password
    done = azaionctl("--json", "credential", "login", "ops@example.com", "-o", str(tmp_path / "j"),
                     "--no-encrypt", stdin="pw\n")
    assert json.loads(done.stdout) == {"encrypted": False, "path": str(tmp_path / "j")}
    done = azaionctl("credential", "login", "ops@example.com", "-o", str(tmp_path / "e"), "--no-encrypt")
    assert done.returncode == 2 and "no password" in done.stderr and "Traceback" not in done.stderr


def _wait_authenticated(d: DaemonHandle, email: str) -> None:
    assert wait_until(lambda: d.call("status")["result"]["authenticated"]), f"never logged in:\n{d.log_text()}"
    assert d.call("status")["result"]["user"]["email"] == email


def test_every_password_logs_in_through_the_credential(
    clean_stack: DevStack, azaiond_factory: Factory, tmp_path: Path
) -> None:
    for i, password in enumerate(PASSWORDS):
        user = User(f"{unique_name('cred')}@example.com", password, "Admin")
        clean_stack.refserver.add_user(user)
        creds = tmp_path / f"creds{i}"
        done = azaionctl("credential", "login", user.email, "-o", str(creds / "login"), "--no-encrypt",
                         stdin=password + "\n")
        assert done.returncode == 0, done.stderr
        d = azaiond_factory(config_writer=clean_stack.write_config, env={"CREDENTIALS_DIRECTORY": str(creds)})
        _wait_authenticated(d, user.email)
        assert password not in d.log_text()
        d.stop()


def test_encrypted_credential_round_trips(clean_stack: DevStack, azaiond_factory: Factory, tmp_path: Path) -> None:
    password = "a: b #1 'x' *y 12345678 🔑"
    user = User(f"{unique_name('enc')}@example.com", password, "Admin")
    clean_stack.refserver.add_user(user)
    creds = tmp_path / "creds"
    sealed = tmp_path / "sealed" / "azaiond.login"
    # A private host key in a directory bound over /var/lib/systemd in a mount namespace of
    # its own: the host's stays untouched. Encrypt with the CLI, then decrypt as systemd would.
    keydir = tmp_path / "hostkey"
    keydir.mkdir(mode=0o700)
    script = (
        f"set -e; mount --bind {keydir} /var/lib/systemd; "
        f'"$PY" -m azaiond.cli.main credential login {user.email} -o {sealed} --encrypt; '
        f"mkdir -p -m 0700 {creds}; systemd-creds decrypt --name=login {sealed} {creds}/login"
    )
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          input=password + "\n", capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PY": sys.executable})
    assert done.returncode == 0, done.stderr
    assert password.encode() not in sealed.read_bytes()
    assert json.loads((creds / "login").read_text(encoding="utf-8"))["password"] == password
    d = azaiond_factory(config_writer=clean_stack.write_config, env={"CREDENTIALS_DIRECTORY": str(creds)})
    _wait_authenticated(d, user.email)
    d.stop()


def _unlock_outcome(d: DaemonHandle) -> dict[str, Any]:
    assert "result" in d.call("unlock")  # no params: the daemon's own login credential, as at boot
    assert wait_until(lambda: d.call("unlock_status")["result"]["state"] in ("ready", "error"), timeout=60), \
        "the unlock did not finish"
    status: dict[str, Any] = d.call("unlock_status")["result"]
    return status


def test_every_password_goes_through_the_boot_unlock_login(
    clean_stack: DevStack, azaiond_factory: Factory, dockerd: Dockerd, tmp_path: Path
) -> None:
    """The boot unlock logs in with the credential, then fetches the key fragment and opens the
    archive. The archive here is noise, so a run that got past the login ends in ``integrity``;
    a password that did not survive the credential ends in ``not_authenticated``."""
    archive = tmp_path / "images.enc"
    archive.write_bytes(os.urandom(4096))
    overrides = {
        "unlock": {"archive": str(archive), "version": "1", "images": [f"azaion/{unique_name('cred')}:1"]},
        "docker": {"base_url": dockerd.url},
    }
    wrong = User(f"{unique_name('cred')}@example.com", "the-right-one", "Admin")
    clean_stack.refserver.add_user(wrong)
    cases = [(User(f"{unique_name('cred')}@example.com", p, "Admin"), p) for p in PASSWORDS]
    for i, (user, typed) in enumerate([*cases, (wrong, "not-the-right-one")]):
        if user is not wrong:
            clean_stack.refserver.add_user(user)
        creds = tmp_path / f"unlock-creds{i}"
        done = azaionctl("credential", "login", user.email, "-o", str(creds / "login"), "--no-encrypt",
                         stdin=typed + "\n")
        assert done.returncode == 0, done.stderr
        d = azaiond_factory(config_writer=clean_stack.write_config, overrides=overrides,
                            env={"CREDENTIALS_DIRECTORY": str(creds)}, name=f"unlock{i}")
        outcome = _unlock_outcome(d)
        want = "not_authenticated" if user is wrong else "integrity"
        assert outcome["state"] == "error" and outcome["error"]["kind"] == want, (typed, outcome)
        assert typed not in d.log_text()
        d.stop()
