"""``azaion-refserver``: run the reference Resource API in the foreground.

Users come from ``--users-file`` (YAML list of ``{email, password, role}``; preferred, since
command lines are visible to every local user) and/or ``--user email:password:role``.
The only thing printed on stdout is the ``listening on URL`` line, so scripts can read it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from tests.support.refserver.server import RefServer
from tests.support.refserver.state import ROLES, User


def _user_flag(value: str) -> User:
    # email has no ':' and the role is the last field, so a password may contain ':'.
    email, sep, rest = value.partition(":")
    password, sep2, role = rest.rpartition(":")
    if not (sep and sep2 and email and password):
        raise argparse.ArgumentTypeError("expected EMAIL:PASSWORD:ROLE")
    try:
        return User(email, password, role)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _users_file(path: Path) -> list[User]:
    data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("users")
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a list of {{email, password, role}} (or users: [...])")
    users = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not {"email", "password"} <= item.keys():
            raise SystemExit(f"{path}: entry {i} needs email and password")
        try:
            users.append(User(str(item["email"]), str(item["password"]), str(item.get("role", "User"))))
        except ValueError as exc:
            raise SystemExit(f"{path}: entry {i}: {exc}") from exc
    return users


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="azaion-refserver",
        description="Reference Resource API for tests and demos (not for production). "
        f"Roles: {', '.join(ROLES)}.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--user", action="append", type=_user_flag, default=[], metavar="EMAIL:PASSWORD:ROLE")
    p.add_argument("--users-file", type=Path, help="YAML list of {email, password, role}")
    p.add_argument("--key-fragment-file", type=Path, help="raw bytes served by /binary-split/key-fragment")
    p.add_argument("--cdn-yaml-file", type=Path, help="cdn.yaml served from folder '' (POST /resources/get/)")
    p.add_argument("--token-ttl", type=float, default=3600, metavar="SECONDS")
    p.add_argument("--storage", type=Path, help="keep uploaded files in DIR (default: in memory)")
    p.add_argument("--no-control", action="store_true", help="do not serve the /_control/ test switches")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    users: list[User] = list(args.user)
    if args.users_file:
        users += _users_file(args.users_file)
    server = RefServer(
        users=users,
        key_fragment=args.key_fragment_file.read_bytes() if args.key_fragment_file else None,
        cdn_yaml=args.cdn_yaml_file.read_bytes() if args.cdn_yaml_file else None,
        token_ttl=args.token_ttl,
        host=args.host,
        port=args.port,
        storage=args.storage,
        control=not args.no_control,
    ).start()
    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"listening on {server.url}", flush=True)
    logging.getLogger("tests.support.refserver").info(
        "%d user(s), key fragment %s, cdn.yaml %s, control endpoints %s",
        len(users),
        "set" if args.key_fragment_file else "unset",
        "set" if args.cdn_yaml_file else "unset",
        "off" if args.no_control else "on",
    )
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
