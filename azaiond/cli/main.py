"""azaionctl: the command line for azaiond (one subcommand per method of docs/protocol.md).

Bytes never travel through this process: for ``load`` and ``cdn-download`` the CLI opens the
output file itself (with the caller's rights) and passes the descriptor; for ``upload`` and
``cdn-upload`` it passes the input file's descriptor, opened read-only. Passwords come from a
prompt or from stdin, never from argv, where any local user could read them in /proc.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from azaiond import __version__, seal
from azaiond.cli import cachecmds, credential, doctor, exitcodes
from azaiond.cli.files import OutputFile
from azaiond.cli.progress import Progress, Sample
from azaiond.client import Client, DaemonUnavailable, ProtocolError, RpcError

PROG = "azaionctl"
POLL_INTERVAL = 0.5  # seconds between unlock_status calls in unlock --wait
UNLOCK_RESTARTS = 3  # times unlock --wait restarts a run the daemon lost (it restarted)


class CliError(Exception):
    """A failure on this side of the socket; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = exitcodes.EXIT_FAILURE, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


@dataclass
class Context:
    client: Client
    json: bool
    stdout: TextIO
    stderr: TextIO

    def say(self, text: str, to_stderr: bool = False) -> None:
        print(text, file=self.stderr if to_stderr else self.stdout)

    def show(self, result: dict[str, Any], human: str, to_stderr: bool = False) -> None:
        """Print the raw result with --json, else the human line. When the payload itself went to
        stdout, both go to stderr, so the payload stays clean."""
        self.say(json.dumps(result, sort_keys=True) if self.json else human, to_stderr)


Command = Callable[[Context, argparse.Namespace], int]


def read_password(prompt: str) -> str:
    """From the terminal without echo, or one line of stdin (for scripts and units)."""
    if sys.stdin.isatty():
        try:
            password = getpass.getpass(prompt)
        except EOFError:  # Ctrl-D
            print(file=sys.stderr)
            raise CliError("no password given", exitcodes.EXIT_USAGE) from None
    else:
        line = sys.stdin.readline()
        if not line:
            raise CliError("no password: stdin is empty", exitcodes.EXIT_USAGE, "pipe the password on stdin")
        password = line.rstrip("\r\n")
    if not password:
        raise CliError("empty password", exitcodes.EXIT_USAGE)
    return password


# ---------------------------------------------------------------------------------------------
# transfers


def _download(ctx: Context, method: str, params: dict[str, Any], target: str | None, label: str) -> int:
    if target is None:
        if sys.stdout.isatty():
            raise CliError(
                "refusing to write binary data to a terminal", exitcodes.EXIT_USAGE, "pass -o FILE"
            )
        target = "-"
    if target == "-":
        sys.stdout.flush()
        # Into a pipe: no file to sample, but the CDN phase of a cold load still shows.
        with Progress(label, ctx.stderr) as bar:
            result = ctx.client.call(method, params, fd=sys.stdout.fileno(), progress=bar.listener)
        ctx.show(result, f"wrote {result.get('size')} bytes to stdout (sha256 {result.get('sha256')})", True)
        return exitcodes.EXIT_OK
    try:
        out = OutputFile(target)
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror or exc}") from exc
    with out:

        def sample() -> Sample:
            return out.size(), None

        with Progress(label, ctx.stderr, sample) as bar:
            result = ctx.client.call(method, params, fd=out.fd, progress=bar.listener)
        written = out.size()
        if written != result.get("size"):
            # The daemon's count and the file disagree: never present a short file as done.
            raise CliError(f"the daemon reported {result.get('size')} bytes but {written} arrived")
        try:
            out.commit()
        except OSError as exc:
            raise CliError(f"cannot write {target}: {exc.strerror or exc}") from exc
    ctx.show(result, f"wrote {written} bytes to {target} (sha256 {result.get('sha256')})")
    return exitcodes.EXIT_OK


def _upload(ctx: Context, method: str, params: dict[str, Any], source: str, label: str) -> dict[str, Any]:
    if source == "-":
        fd, owned = sys.stdin.fileno(), False
    else:
        try:
            fd, owned = os.open(source, os.O_RDONLY | os.O_CLOEXEC), True
        except OSError as exc:
            raise CliError(f"cannot read {source}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise CliError(f"{source} is a directory")
        total = info.st_size if stat.S_ISREG(info.st_mode) else None
        if total is not None:
            # The daemon reads from the current offset to the end: that many bytes, or it
            # refuses the upload (a file that changes meanwhile is never half uploaded).
            params = {**params, "size": max(0, total - os.lseek(fd, 0, os.SEEK_CUR))}

        def sample() -> Sample | None:
            # The daemon reads through a duplicate of this descriptor, which shares the file
            # offset with ours; pipes have no offset, so they get no progress line.
            if total is None:
                return None
            return os.lseek(fd, 0, os.SEEK_CUR), total

        with Progress(label, ctx.stderr, sample):
            return ctx.client.call(method, params, fd=fd)
    finally:
        if owned:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# commands


def cmd_health(ctx: Context, args: argparse.Namespace) -> int:
    result = ctx.client.call("health")
    ctx.show(result, str(result.get("status")))
    return exitcodes.EXIT_OK


def _user_text(user: Any) -> str:
    if isinstance(user, dict):
        return f"{user.get('email')} ({user.get('role')})"
    return "nobody logged in"


def _unlock_text(status: Any) -> str:
    if not isinstance(status, dict):
        return "unknown"
    text = str(status.get("state"))
    progress = status.get("progress")
    if isinstance(progress, dict) and progress.get("total"):
        done, total = int(progress.get("done") or 0), int(progress["total"])
        text += f" ({done * 100 // total}% of {total / (1024 * 1024):.1f} MiB)"
    error = status.get("error")
    if isinstance(error, dict):
        text += f" ({error.get('kind')}: {error.get('message')})"
    return text


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    result = ctx.client.call("status")
    lines = [
        f"version:       {result.get('version')}",
        f"authenticated: {'yes' if result.get('authenticated') else 'no'}",
        f"user:          {_user_text(result.get('user'))}",
        f"cache:         {result.get('cache_dir')}"
        + (f" ({cachecmds.cache_text(result['cache_bytes'], result.get('cache_limit_bytes'))})"
           if "cache_bytes" in result else ""),
        f"unlock:        {_unlock_text(result.get('unlock'))}",
    ]
    ctx.show(result, "\n".join(lines))
    return exitcodes.EXIT_OK


def cmd_login(ctx: Context, args: argparse.Namespace) -> int:
    password = read_password(f"password for {args.email}: ")
    result = ctx.client.call("login", {"email": args.email, "password": password})
    ctx.show(result, f"logged in as {_user_text(result.get('user'))}")
    return exitcodes.EXIT_OK


def cmd_logout(ctx: Context, args: argparse.Namespace) -> int:
    result = ctx.client.call("logout")
    ctx.show(result, "logged out")
    return exitcodes.EXIT_OK


def cmd_load(ctx: Context, args: argparse.Namespace) -> int:
    params = {"name": args.name, "folder": args.folder}
    return _download(ctx, "load", params, args.output, f"load {args.folder}/{args.name}")


def cmd_cdn_download(ctx: Context, args: argparse.Namespace) -> int:
    params = {"bucket": args.bucket, "key": args.key}
    return _download(ctx, "cdn_download", params, args.output, f"download {args.bucket}/{args.key}")


def cmd_upload(ctx: Context, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"name": args.name, "folder": args.folder}
    if args.format is not None:
        params["format"] = args.format
    result = _upload(ctx, "upload", params, args.file, f"upload {args.folder}/{args.name}")
    ctx.show(
        result,
        f"uploaded {result.get('size')} bytes as {args.folder}/{args.name} "
        f"(small part {result.get('small_size')}, big part {result.get('big_size')})",
    )
    return exitcodes.EXIT_OK


def cmd_cdn_upload(ctx: Context, args: argparse.Namespace) -> int:
    params = {"bucket": args.bucket, "key": args.key}
    result = _upload(ctx, "cdn_upload", params, args.file, f"upload {args.bucket}/{args.key}")
    ctx.show(result, f"uploaded {result.get('size')} bytes to {args.bucket}/{args.key}")
    return exitcodes.EXIT_OK


def _wait_for_unlock(ctx: Context, params: dict[str, Any] | None, state: str, timeout: float | None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    restarts = 0
    status: dict[str, Any] = {"state": state}
    with Progress("unlock", ctx.stderr, interval=0.2) as bar:
        while state not in ("ready", "error"):
            if deadline is not None and time.monotonic() >= deadline:
                raise CliError(
                    f"gave up waiting for the unlock after {timeout:g} s (state: {state})",
                    exitcodes.EXIT_TIMEOUT,
                    "see: azaionctl unlock-status",
                )
            time.sleep(POLL_INTERVAL)
            try:
                status = ctx.client.call("unlock_status")
                state = str(status.get("state"))
            except ProtocolError:
                state = "idle"  # the daemon went away mid-run; it may come back (socket activation)
            if state == "idle":
                # The run we started is gone (the daemon restarted): start it again, a few times.
                restarts += 1
                if restarts > UNLOCK_RESTARTS:
                    raise CliError("the unlock run keeps stopping; is the daemon restarting?")
                state = str(ctx.client.call("unlock", params).get("state"))
                continue
            progress = status.get("progress")
            if isinstance(progress, dict):
                total = progress.get("total")
                bar.update(int(progress.get("done") or 0), int(total) if total else None, f"unlock: {state}")
    if state == "ready":
        ctx.show(status, "unlock: ready")
        return exitcodes.EXIT_OK
    if "error" not in status:
        status = ctx.client.call("unlock_status")
    error = status.get("error")
    if not isinstance(error, dict):
        error = {}
    kind = str(error.get("kind") or "internal")
    message = str(error.get("message") or "the unlock failed")
    if ctx.json:
        ctx.say(json.dumps(status, sort_keys=True))
    report_error(ctx.stderr, kind, f"unlock failed: {message}", exitcodes.HINTS.get(kind))
    return exitcodes.exit_code_for_kind(kind)


def cmd_unlock(ctx: Context, args: argparse.Namespace) -> int:
    params: dict[str, Any] | None = None
    if args.email is not None:
        params = {"email": args.email, "password": read_password(f"password for {args.email}: ")}
    result = ctx.client.call("unlock", params)
    state = str(result.get("state"))
    if args.wait:
        return _wait_for_unlock(ctx, params, state, getattr(args, "timeout", None))
    ctx.show(result, f"unlock: {state} (follow with: azaionctl unlock-status)")
    return exitcodes.EXIT_OK


def cmd_credential_login(ctx: Context, args: argparse.Namespace) -> int:
    password = read_password(f"password for {args.email}: ")
    if sys.stdin.isatty() and read_password("the same password again: ") != password:
        raise CliError("the passwords differ", exitcodes.EXIT_USAGE)
    try:
        written = credential.write_login(args.email, password, output=args.output, encrypt=args.encrypt)
    except credential.CredentialError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot write the credential: {exc.strerror or exc}") from exc
    if written.path == "-":
        return exitcodes.EXIT_OK
    result = {"path": written.path, "encrypted": written.encrypted}
    how = " (encrypted with systemd-creds)" if written.encrypted else ""
    ctx.show(result, f"wrote the login credential for {args.email} to {written.path}{how}")
    if not ctx.json:
        if written.encrypted:
            ctx.say("next: a drop-in with LoadCredentialEncrypted=login:azaiond.login (see operators.md), "
                    "then: systemctl restart azaiond", to_stderr=True)
        else:
            ctx.say("next: systemctl restart azaiond", to_stderr=True)
    return exitcodes.EXIT_OK


def cmd_unlock_status(ctx: Context, args: argparse.Namespace) -> int:
    result = ctx.client.call("unlock_status")
    ctx.show(result, f"unlock: {_unlock_text(result)}")
    if result.get("state") == "error":
        # Scripts and monitors branch on this: a failed unlock is not a success.
        error = result.get("error")
        kind = str(error.get("kind")) if isinstance(error, dict) else "internal"
        return exitcodes.exit_code_for_kind(kind)
    return exitcodes.EXIT_OK


def cmd_metrics(ctx: Context, args: argparse.Namespace) -> int:
    result = ctx.client.call("metrics")
    if ctx.json:
        ctx.say(json.dumps(result, sort_keys=True))
    else:
        ctx.stdout.write(str(result.get("text", "")))
    return exitcodes.EXIT_OK


def cmd_version(ctx: Context, args: argparse.Namespace) -> int:
    try:
        daemon: str | None = str(ctx.client.call("status").get("version"))
        problem = None
    except (RpcError, DaemonUnavailable, ProtocolError) as exc:
        daemon, problem = None, str(exc)
    result = {"client": __version__, "daemon": daemon}
    human = f"{PROG} {__version__}\nazaiond {daemon if daemon else f'unknown ({problem})'}"
    ctx.show(result, human)
    return exitcodes.EXIT_OK if daemon else exitcodes.EXIT_UNAVAILABLE


def cmd_doctor(ctx: Context, args: argparse.Namespace) -> int:
    checks = doctor.run(ctx.client, ctx.client.socket_path, args.config)
    if ctx.json:
        ctx.say(json.dumps({"ok": all(c.ok for c in checks), "checks": [c.as_dict() for c in checks]}))
    else:
        for c in checks:
            ctx.say(f"{'ok ' if c.ok else 'BAD'}  {c.name:<9} {c.detail}")
    return exitcodes.EXIT_OK if all(c.ok for c in checks) else exitcodes.EXIT_FAILURE


def cmd_help(ctx: Context, args: argparse.Namespace) -> int:
    parser = build_parser()
    if not args.topic:
        parser.print_help(ctx.stdout)
        return exitcodes.EXIT_OK
    if args.topic == "seal-images":
        return seal.main(["--help"], prog=f"{PROG} seal-images")
    try:
        parser.parse_args([args.topic, "--help"])  # prints the command's help and exits 0
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise CliError(f"no such command: {args.topic}", exitcodes.EXIT_USAGE, f"see: {PROG} help") from None
    return exitcodes.EXIT_OK


# ---------------------------------------------------------------------------------------------
# argument parsing


def build_parser() -> argparse.ArgumentParser:
    # The global flags work before or after the subcommand; SUPPRESS keeps a subcommand's parser
    # from overwriting a value given before it with its default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="daemon socket (default: $AZAIOND_SOCKET or /run/azaiond/azaiond.sock)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS,
        help="print the raw result as JSON on stdout, and errors as {\"error\": {...}} on stdout too",
    )
    common.add_argument(
        "--timeout", type=float, metavar="SECONDS", default=argparse.SUPPRESS,
        help="give up on the daemon after this long: connecting and each reply (with unlock --wait: "
        "the whole wait); default: wait as long as it takes",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Control azaiond, the Azaion resource and image-unlock daemon.",
        epilog=exitcodes.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    add("health", cmd_health, "check that the daemon answers")
    add("status", cmd_status, "show login, cache and unlock state")
    p = add("login", cmd_login, "log in to the Resource API (password from the terminal or stdin)")
    p.add_argument("email")
    add("logout", cmd_logout, "forget the credentials")

    p = add("load", cmd_load, "fetch, decrypt and write a resource")
    p.add_argument("name")
    p.add_argument("--folder", required=True)
    p.add_argument("-o", "--output", metavar="FILE", help="output file, - for stdout")

    p = add("upload", cmd_upload, "encrypt, split and upload a file as a resource")
    p.add_argument("file", help="input file, - for stdin")
    p.add_argument("name")
    p.add_argument("--folder", required=True)
    p.add_argument(
        "--format", type=int, choices=(1, 2), help="1 (readable by every loader) or 2 (authenticated); "
        "default: the daemon's resources.format"
    )

    p = add("cdn-upload", cmd_cdn_upload, "put a file on the CDN as-is")
    p.add_argument("file", help="input file, - for stdin")
    p.add_argument("bucket")
    p.add_argument("key")

    p = add("cdn-download", cmd_cdn_download, "get an object from the CDN as-is")
    p.add_argument("bucket")
    p.add_argument("key")
    p.add_argument("-o", "--output", metavar="FILE", help="output file, - for stdout")

    p = add("unlock", cmd_unlock, "decrypt and load the Docker images")
    p.add_argument("--wait", action="store_true", help="wait until the images are ready or the run fails")
    p.add_argument(
        "--email", help="log in as this user (password from the terminal or stdin); default: the daemon's own"
    )
    add("unlock-status", cmd_unlock_status, "show the progress or outcome of the unlock")

    add("metrics", cmd_metrics, "show the daemon's counters (Prometheus text; --json for the object)")
    add("version", cmd_version, "show the versions of azaionctl and of the daemon")
    p = add("doctor", cmd_doctor, "check socket, daemon, config, API, CDN, Docker and login; print the hardware string")
    p.add_argument("--config", type=Path, metavar="PATH",
                   help="the daemon's config (default: $AZAIOND_CONFIG, else /etc/azaiond/config.yaml)")
    p = add("help", cmd_help, "show the help of azaionctl or of one command")
    p.add_argument("topic", nargs="?", metavar="COMMAND")

    p = add("credential", cmd_credential_login, "write the daemon's credentials (no daemon needed)")
    creds = p.add_subparsers(dest="credential", metavar="CREDENTIAL", required=True)
    p = creds.add_parser(
        "login",
        parents=[common],
        help="write the login credential as JSON (any password round-trips)",
        description="Write the daemon's login credential (password from the terminal or stdin) as JSON, "
        "encrypted with systemd-creds where it is installed.",
    )
    p.set_defaults(func=cmd_credential_login)
    p.add_argument("email")
    p.add_argument(
        "-o", "--output", metavar="PATH",
        help=f"where to write it, - for stdout (default: {credential.ENCRYPTED_PATH} when encrypted, "
        f"else {credential.PLAIN_PATH})",
    )
    enc = p.add_mutually_exclusive_group()
    enc.add_argument("--encrypt", dest="encrypt", action="store_true", default=None,
                     help="encrypt with systemd-creds (default: when it is installed)")
    enc.add_argument("--no-encrypt", dest="encrypt", action="store_false", help="write a plain 0600 file")
    # Publisher side: needs no daemon. main() hands its arguments to azaiond.seal before parsing,
    # so this entry only lists it in --help.
    add("seal-images", cmd_seal_images, "seal a docker save tar or images into images.enc (no daemon)")
    cachecmds.register(add, common, _download, _upload)
    return parser


def cmd_seal_images(ctx: Context, args: argparse.Namespace) -> int:
    return seal.main(["--help"], prog=f"{PROG} seal-images")


def report_error(stream: TextIO, kind: str | None, message: str, hint: str | None) -> None:
    prefix = f"{PROG}: {kind}: " if kind else f"{PROG}: "
    print(prefix + message, file=stream)
    if hint:
        print(f"{PROG}: {hint}", file=stream)


def _json_failure(stream: TextIO, exc: Exception, code: int) -> None:
    """Under --json, the error as one JSON object on stdout, for scripts that parse stdout."""
    kind = exc.kind if isinstance(exc, RpcError) else None
    if isinstance(exc, DaemonUnavailable):
        kind = "unavailable" if exc.reason != "permission" else "no_permission"
    message = getattr(exc, "message", None) or str(exc)
    hint = exitcodes.HINTS.get(kind or "") if isinstance(exc, RpcError) else getattr(exc, "hint", None)
    error = {"kind": kind or "failure", "message": message, "hint": hint, "exit_status": code}
    print(json.dumps({"error": error}, sort_keys=True), file=stream)


def _failure(stream: TextIO, exc: Exception) -> int:
    """Report an error for a person and pick the exit status."""
    if isinstance(exc, RpcError):
        report_error(stream, exc.kind, exc.message, exitcodes.HINTS.get(exc.kind))
        return exitcodes.exit_code_for_kind(exc.kind)
    if isinstance(exc, DaemonUnavailable):
        report_error(stream, None, exc.message, exc.hint)
        if exc.reason == "permission":
            return exitcodes.EXIT_NO_PERMISSION
        return exitcodes.EXIT_UNAVAILABLE
    if isinstance(exc, CliError):
        report_error(stream, None, exc.message, exc.hint)
        return exc.code
    report_error(stream, None, str(exc), "see: journalctl -u azaiond")
    return exitcodes.EXIT_FAILURE


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through the with blocks, so a download's temp file is removed on
    # SIGTERM too (systemctl stop, a timeout), not only on Ctrl-C.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["seal-images"]:
        return seal.main(argv[1:], prog=f"{PROG} seal-images")
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    client = Client(getattr(args, "socket", None), timeout=getattr(args, "timeout", None))
    ctx = Context(client, getattr(args, "json", False), sys.stdout, sys.stderr)
    func: Command = args.func
    try:
        with client:
            return func(ctx, args)
    except (RpcError, DaemonUnavailable, ProtocolError, CliError) as exc:
        code = _failure(ctx.stderr, exc)
        if ctx.json:
            _json_failure(ctx.stdout, exc, code)
        return code
    except KeyboardInterrupt:  # Ctrl-C, at a prompt or during a call: no traceback
        print(file=ctx.stderr)
        if ctx.json:
            _json_failure(ctx.stdout, CliError("interrupted"), 130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
