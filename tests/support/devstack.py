"""A complete local stack on loopback: the reference Resource API plus moto's S3 as the CDN.

Used by the demo (``python3 -m scripts.demo``), the system test (``python3 -m tests.support.devstack
--workdir DIR``), the tests and the benchmarks. The CDN gets three IAM users with their own key
pairs: a reader (get/list/head), a writer (put and multipart) and an admin (everything, for tests
that inspect or tamper with objects). moto checks signatures and policies once IAM enforcement is
switched on, so the wrong key pair fails for real, as on a real store.

moto keeps its backends and its auth switch per *process*: stacks started in one process share
buckets and IAM users, and while any stack is running every moto call in the process is
authenticated. IAM user names carry a random suffix so stacks never collide.
"""

from __future__ import annotations

import argparse
import grp
import json
import logging
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import boto3
import requests
import yaml
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from azaiond.cdn import botocore_config
from azaiond.names import check_bucket
from tests.support.refserver import RefServer, User

log = logging.getLogger("tests.support.devstack")

REGION = "us-east-1"
HARDWARE = "CPU: Azaion Test CPU. GPU: none. Memory: 16318480 kB. DriveSerial: AZ-DEV-0001."
# The bootstrap keys only work while moto's auth is off; they create the real IAM users.
_BOOTSTRAP_KEYS = ("bootstrap", "bootstrap")
_READ_ACTIONS = ["s3:GetObject", "s3:ListBucket", "s3:HeadObject", "s3:GetBucketLocation"]
_WRITE_ACTIONS = [
    "s3:PutObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
    "s3:ListBucketMultipartUploads",
]

# Process-wide: moto's auth switch is global, so the first stack turns it on and the last turns it off.
_active: list[DevStack] = []
_active_lock = threading.Lock()


def boto_config() -> BotoConfig:
    """What every client of the stack's S3 needs: the daemon's own settings (path-style
    addressing, no optional checksums where botocore has them), with one retry."""
    return botocore_config(retries=1)


@dataclass(frozen=True)
class KeyPair:
    access_key: str
    secret_key: str = field(repr=False)


def _client(service: str, endpoint: str, keys: KeyPair) -> Any:
    kwargs: dict[str, Any] = {
        "endpoint_url": endpoint,
        "region_name": REGION,
        "aws_access_key_id": keys.access_key,
        "aws_secret_access_key": keys.secret_key,
        "config": boto_config(),
    }
    # Two literal calls: boto3's typing stubs overload client() on the service name.
    if service == "iam":
        return boto3.client("iam", **kwargs)
    return boto3.client("s3", **kwargs)


class DevStack:
    """Reference Resource API + moto S3, both on 127.0.0.1. Build it with ``DevStack.start``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.hardware = HARDWARE
        self.resource_key = secrets.token_urlsafe(32)
        self.key_fragment = secrets.token_bytes(32)
        # Random passwords: the demo reads them from the credentials files, never from output.
        self.users: dict[str, User] = {
            "admin": User("admin@azaion.local", secrets.token_urlsafe(16), "Admin"),
            "user": User("user@azaion.local", secrets.token_urlsafe(16), "User"),
        }
        self.enforced = False
        self._moto: ThreadedMotoServer | None = None
        self._ref: RefServer | None = None
        self.s3_url = ""
        self.read_keys = self.write_keys = self.admin_keys = KeyPair("", "")

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(cls, workdir: Path, *, enforce_keys: bool = True) -> DevStack:
        """Start moto and the reference server; ``enforce_keys=False`` leaves moto's auth off."""
        stack = cls(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            stack._start_moto(enforce_keys)
            stack._ref = RefServer(
                users=stack.users.values(),
                key_fragment=stack.key_fragment,
                cdn_yaml=stack.cdn_yaml(),
                storage=None,
            ).start()
        except BaseException:
            stack.stop()
            raise
        log.info("dev stack up: api %s, s3 %s", stack.api_url, stack.s3_url)
        return stack

    def _start_moto(self, enforce: bool) -> None:
        # werkzeug logs every S3 request at INFO; the tests do not need that noise.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.s3_url = f"http://{host}:{port}"
        with _active_lock:
            # While another stack enforces auth, bootstrap with its admin keys (backends are shared).
            enforcing = next((s for s in _active if s.enforced), None)
            boot = enforcing.admin_keys if enforcing else KeyPair(*_BOOTSTRAP_KEYS)
            iam = _client("iam", self.s3_url, boot)
            suffix = secrets.token_hex(4)
            self.admin_keys = self._iam_user(iam, f"azaion-admin-{suffix}", ["*"])
            self.read_keys = self._iam_user(iam, f"azaion-reader-{suffix}", _READ_ACTIONS)
            self.write_keys = self._iam_user(iam, f"azaion-writer-{suffix}", _WRITE_ACTIONS)
            if enforce and enforcing is None:
                self._set_auth("0")  # from now on every request must be signed by a known, allowed key
            self.enforced = enforce or enforcing is not None
            _active.append(self)

    @staticmethod
    def _iam_user(iam: Any, name: str, actions: list[str]) -> KeyPair:
        statement = {"Effect": "Allow", "Action": actions, "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [statement]}
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return KeyPair(key["AccessKeyId"], key["SecretAccessKey"])

    def _set_auth(self, count: str) -> None:
        # moto's own switch: after `count` more unauthenticated calls, IAM checks apply.
        resp = requests.post(f"{self.s3_url}/moto-api/reset-auth", data=count.encode(), timeout=10)
        resp.raise_for_status()

    def stop(self) -> None:
        if self._ref is not None:
            self._ref.stop()
            self._ref = None
        if self._moto is not None:
            with _active_lock:
                if self in _active:
                    _active.remove(self)
                    if self.enforced and not any(s.enforced for s in _active):
                        try:
                            self._set_auth("inf")  # give the process back to unauthenticated moto
                        except requests.RequestException:
                            log.warning("could not switch moto's auth off")
            self._moto.stop()
            self._moto = None

    def __enter__(self) -> DevStack:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- what tests use --------------------------------------------------------------------

    @property
    def refserver(self) -> RefServer:
        if self._ref is None:
            raise RuntimeError("the dev stack is not running")
        return self._ref

    @property
    def api_url(self) -> str:
        return self.refserver.url

    @property
    def admin(self) -> User:
        return self.users["admin"]

    @property
    def user(self) -> User:
        return self.users["user"]

    def cdn_yaml(self) -> bytes:
        return yaml.safe_dump(
            {
                "host": self.s3_url,
                "downloader_access_key": self.read_keys.access_key,
                "downloader_access_secret": self.read_keys.secret_key,
                "uploader_access_key": self.write_keys.access_key,
                "uploader_access_secret": self.write_keys.secret_key,
            },
            sort_keys=False,
        ).encode()

    def s3_client(self, keys: KeyPair) -> Any:
        """A boto3 S3 client on the stack's moto with the given key pair."""
        return _client("s3", self.s3_url, keys)

    def s3_admin_client(self) -> Any:
        """Full rights, for tests that inspect or tamper with objects."""
        return self.s3_client(self.admin_keys)

    def ensure_bucket(self, name: str) -> None:
        """Create bucket ``name`` unless it exists (the daemon never creates buckets itself)."""
        s3 = self.s3_admin_client()
        try:
            s3.head_bucket(Bucket=check_bucket(name))
        except ClientError:
            s3.create_bucket(Bucket=name)

    def write_config(self, path: Path, state_dir: Path, socket_path: Path, **overrides: Any) -> Path:
        """Write an azaiond config (SPEC section 3) for this stack; ``overrides`` merge into it.

        E.g. ``write_config(p, s, sock, api={"retries": 0}, hardware="other")``. The socket group
        is the caller's own primary group so the file works on any test machine. Mode 0600: it
        holds the resource key.
        """
        group = grp.getgrgid(os.getgid()).gr_name
        data: dict[str, Any] = {
            "api": {"url": self.api_url, "retries": 3, "timeout": 10, "backoff": 0.02},
            "socket": {"path": str(socket_path), "group": group, "admin_groups": [group]},
            "state_dir": str(state_dir),
            "hardware": self.hardware,
            "resources": {"key": self.resource_key},
            "cdn": {"endpoint": self.s3_url},
        }
        _merge(data, overrides)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False)
        return path

    def write_credentials(self, directory: Path, user: User | None = None) -> Path:
        """A systemd-style credentials dir: ``login`` (YAML email/password) and ``resource-key``."""
        user = user or self.admin
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name, text in (
            ("login", yaml.safe_dump({"email": user.email, "password": user.password})),
            ("resource-key", self.resource_key),
        ):
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        return directory


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.support.devstack", description="Run the dev stack (Resource API + S3) on loopback."
    )
    p.add_argument("--workdir", type=Path, required=True, help="where config, state and credentials go")
    p.add_argument("--no-enforce-keys", action="store_true", help="leave moto's IAM checks off")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir: Path = args.workdir.resolve()
    stack = DevStack.start(workdir, enforce_keys=not args.no_enforce_keys)
    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        config = stack.write_config(workdir / "config.yaml", workdir / "state", workdir / "azaiond.sock")
        creds = stack.write_credentials(workdir / "credentials")
        info = {
            "api_url": stack.api_url,
            "s3_url": stack.s3_url,
            "config": str(config),
            "credentials": str(creds),
        }
        (workdir / "stack.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        for key, value in info.items():
            print(f"{key}: {value}", flush=True)
        done.wait()
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
