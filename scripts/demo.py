"""A walk through every flow on one machine, all on loopback: ``python -m scripts.demo``.

It starts the dev stack (the reference Resource API and moto's S3), then azaiond as a
separate process on a temporary socket with a temporary state dir, and drives it with
azaionctl exactly as an operator would: health, status, login, upload, load, CDN transfer,
and, when a Docker engine is reachable, sealing and unlocking an image. Each command is
printed before it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import docker

from azaiond.client import DaemonUnavailable, wait_until_listening
from scripts.demo_unlock import DEMO_IMAGE, prepare_sealed_image
from tests.support.devdocker import start_dockerd
from tests.support.devstack import DevStack

FOLDER = "models"


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    def __init__(self, work: Path, docker_url: str | None) -> None:
        self.work = work
        self.docker_url = docker_url
        self.socket = work / "azaiond.sock"
        self.archive = work / "images.enc"
        self.stack = DevStack.start(work / "stack")
        self.daemon: subprocess.Popen[bytes] | None = None

    def ctl(self, *args: str, stdin: bytes | None = None, shown: str | None = None) -> str:
        argv = [sys.executable, "-m", "azaiond.cli.main", "--socket", str(self.socket), *args]
        print("$ azaionctl " + (shown or " ".join(shlex.quote(a) for a in args)), flush=True)
        proc = subprocess.run(argv, input=stdin, capture_output=True, check=False)
        out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        print("  " + out.strip().replace("\n", "\n  "), flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"demo: azaionctl {args[0]} failed with exit code {proc.returncode}")
        return out

    def start_daemon(self) -> None:
        extra: dict[str, object] = {}
        if self.docker_url:
            extra = {
                "docker": {"base_url": self.docker_url},
                "unlock": {"archive": str(self.archive), "images": [f"{DEMO_IMAGE}:{{version}}"], "version": "latest"},
            }
        config = self.stack.write_config(self.work / "config.yaml", self.work / "state", self.socket, **extra)
        _say(f"starting azaiond on {self.socket} (config {config}, log {self.work / 'azaiond.log'})")
        log = open(self.work / "azaiond.log", "wb")  # noqa: SIM115 - lives as long as the daemon
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "azaiond.daemon", "--config", str(config)], stderr=log, stdout=log
        )
        try:
            wait_until_listening(str(self.socket), proc=self.daemon)
        except DaemonUnavailable as exc:
            raise SystemExit(f"demo: {exc.message}; see {self.work / 'azaiond.log'}") from exc

    def run(self) -> None:
        self.start_daemon()
        admin = self.stack.admin
        _say("health and status: anyone in group azaion may ask")
        self.ctl("health")
        self.ctl("status")
        _say(f"login as {admin.email} (the password goes in on stdin, never in argv)")
        self.ctl("login", admin.email, stdin=admin.password.encode() + b"\n")

        _say("upload a split resource: encrypted, small part to the API, big part to the CDN")
        self.stack.ensure_bucket(FOLDER)
        model = self.work / "model.bin"
        model.write_bytes(os.urandom(8 * 1024 * 1024))
        self.ctl("upload", str(model), "model.bin", "--folder", FOLDER)

        _say("load it back: the daemon streams the plaintext into a descriptor the CLI opened")
        out = self.work / "model.out"
        self.ctl("load", "model.bin", "--folder", FOLDER, "-o", str(out))
        same = hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(model.read_bytes()).digest()
        print(f"  round trip identical: {same}")
        if not same:
            raise SystemExit("demo: the loaded resource differs from the uploaded one")

        _say("plain CDN transfer with the separate write and read keys")
        blob = self.work / "notes.txt"
        blob.write_text("hello from the azaiond demo\n")
        self.stack.ensure_bucket("shared")
        self.ctl("cdn-upload", str(blob), "shared", "notes.txt")
        self.ctl("cdn-download", "shared", "notes.txt", "-o", str(self.work / "notes.out"))

        self.unlock()
        _say("status after the walk")
        self.ctl("status")

    def unlock(self) -> None:
        if not self.docker_url:
            _say("unlock: skipped, no Docker engine reachable (run as root with docker.io installed, or --docker-url)")
            return
        _say(f"unlock: seal a small image, remove it, and let the daemon load it back ({self.docker_url})")
        image = prepare_sealed_image(self.docker_url, self.archive, self.stack.key_fragment)
        self.ctl("unlock", "--wait")
        self.ctl("unlock-status")
        client = docker.DockerClient(base_url=self.docker_url, version="auto")
        try:
            print(f"  image {image} is back: {client.images.get(image).id[:19]}")
        finally:
            client.close()

    def close(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                code = self.daemon.wait(30)
                print(f"\n== azaiond stopped on SIGTERM with exit code {code}")
            except subprocess.TimeoutExpired:
                self.daemon.kill()
        self.stack.stop()


def _docker_url(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else [os.environ.get("DOCKER_HOST"), "unix:///run/docker.sock"]
    for url in candidates:
        if url and url.startswith("unix://") and os.path.exists(url[len("unix://") :]):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(url[len("unix://") :])
                return url
            except OSError:
                continue
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__)
    parser.add_argument("--docker-url", help="a Docker engine for the unlock step (default: /run/docker.sock)")
    parser.add_argument(
        "--no-private-dockerd",
        action="store_true",
        help="when no engine is reachable, skip unlock instead of starting a private dockerd (needs root)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="azdemo-"))
    with contextlib.ExitStack() as stack:
        url = _docker_url(args.docker_url)
        if url is None and not args.no_private_dockerd and os.geteuid() == 0 and shutil.which("dockerd"):
            _say("no Docker engine reachable: starting a private dockerd for the unlock step")
            url = stack.enter_context(start_dockerd()).url
        demo = Demo(work, url)
        try:
            demo.run()
        finally:
            demo.close()
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    print("\ndemo: every flow worked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
