"""The unlock fixtures shared by the unlock test modules: a reference Resource API that serves the
key fragment, an in-process unlock job harness, and a daemon set up to unlock an archive."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from azaiond import wiring
from azaiond.apiclient import Credentials
from azaiond.config import ApiConfig, Config, DockerConfig, UnlockConfig
from azaiond.unlock import RUNNING, UnlockJob
from tests.fixtures_daemon import DaemonHandle
from tests.support.devdocker import Dockerd
from tests.support.refserver import RefServer, User

EMAIL = "unlock@example.com"
PASSWORD = "unlock-" + secrets.token_hex(8)
FRAGMENT = secrets.token_bytes(32)
TAG = f"u{secrets.token_hex(3)}"
IMAGE = f"azaion/unlocktest-{TAG}:{{version}}"
VERSION = "1"
NAME = IMAGE.replace("{version}", VERSION)
BIG_NAME = f"azaion/unlockbig-{TAG}:{VERSION}"
CREDS = Credentials(EMAIL, PASSWORD)


@pytest.fixture(scope="module")
def ref() -> Iterator[RefServer]:
    with RefServer([User(EMAIL, PASSWORD, "Operator")], key_fragment=FRAGMENT) as srv:
        yield srv


@pytest.fixture
def api_server(ref: RefServer) -> Iterator[RefServer]:
    ref.reset_switches()
    ref.set_key_fragment(FRAGMENT)
    yield ref
    ref.reset_switches()
    ref.set_key_fragment(FRAGMENT)


@dataclass
class Harness:
    services: wiring.Services
    config: Config
    lines: list[str] = field(default_factory=list)

    @property
    def job(self) -> UnlockJob:
        return self.services.unlock

    def wait(self, timeout: float = 120) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.job.status()
            if status["state"] not in RUNNING:
                return status
            time.sleep(0.02)
        raise AssertionError(f"unlock still running after {timeout}s: {self.job.status()}")

    def run(self, credentials: Credentials | None = None) -> dict[str, object]:
        reply = self.job.start(credentials)
        assert reply["state"] in RUNNING
        return self.wait()


def make_config(
    state_dir: Path, api_url: str, docker_url: str, archive: Path, images: tuple[str, ...] = (IMAGE,)
) -> Config:
    return Config(
        api=ApiConfig(url=api_url, retries=3, timeout=10, backoff=0.01),
        state_dir=state_dir,
        hardware="CPU: test. GPU: none. Memory: 1 kB. DriveSerial: x.",
        unlock=UnlockConfig(archive=archive, version=VERSION, images=images),
        docker=DockerConfig(base_url=docker_url, timeout=600),
    )


@pytest.fixture
def harness(
    tmp_path: Path, api_server: RefServer, dockerd: Dockerd
) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(
        archive: Path,
        *,
        images: tuple[str, ...] = (IMAGE,),
        docker_url: str | None = None,
        fallback: Credentials | None = CREDS,
    ) -> Harness:
        config = make_config(tmp_path / "state", api_server.url, docker_url or dockerd.url, archive, images)
        lines: list[str] = []
        # This Resource API serves no cdn.yaml: an unlock that reached for the CDN would fail.
        services = wiring.build_services(
            config, wiring.Overrides(login_credentials=lambda: fallback), status_line=lines.append
        )
        h = Harness(services, config, lines)
        made.append(h)
        return h

    yield make
    for h in made:
        h.services.close()


@pytest.fixture
def unlockd(
    azaiond_factory: Callable[..., DaemonHandle], api_server: RefServer, dockerd: Dockerd, tmp_path: Path
) -> Callable[..., DaemonHandle]:
    """Start (or restart: same name, same state dir) a daemon set up to unlock ``archive``."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "login").write_text(f"email: {EMAIL}\npassword: {PASSWORD}\n")
    creds.chmod(0o700)

    def start(archive: Path, images: tuple[str, ...] = (IMAGE,), docker_url: str | None = None) -> DaemonHandle:
        overrides = {
            "api": {"url": api_server.url, "retries": 3, "backoff": 0.01},
            "unlock": {"archive": str(archive), "version": VERSION, "images": list(images)},
            "docker": {"base_url": docker_url or dockerd.url},
        }
        return azaiond_factory(name="unlockd", overrides=overrides, env={"CREDENTIALS_DIRECTORY": str(creds)})

    return start


def daemon_result(reply: dict[str, object]) -> dict[str, object]:
    assert "result" in reply, reply
    result = reply["result"]
    assert isinstance(result, dict)
    return result


def wait_daemon(d: DaemonHandle, timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = daemon_result(d.call("unlock_status"))
        if status["state"] not in RUNNING:
            return status
        time.sleep(0.02)
    raise AssertionError(f"unlock still running after {timeout}s")
