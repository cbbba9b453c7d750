"""Fixtures: the local dev stack (reference Resource API + moto S3 on loopback).

``stack`` is started once per session. Tests that flip switches, upload small parts or bind
hardware use ``clean_stack`` (or ``api``), which resets the reference server's switches,
counters and hardware bindings after the test, so no test sees another's leftovers.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.faultproxy import FaultProxy
from tests.fixtures_daemon import DaemonHandle
from tests.support.devstack import DevStack
from tests.support.refserver import RefServer, User


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    s = DevStack.start(tmp_path_factory.mktemp("devstack"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def clean_stack(stack: DevStack) -> Iterator[DevStack]:
    """The session stack, with the refserver's switches reset after the test."""
    stack.refserver.reset_switches()
    try:
        yield stack
    finally:
        stack.refserver.reset_switches()


@pytest.fixture
def refserver(clean_stack: DevStack) -> RefServer:
    return clean_stack.refserver


@pytest.fixture
def bucket(clean_stack: DevStack) -> str:
    """A fresh, empty bucket for this test."""
    name = f"t-{secrets.token_hex(6)}"
    clean_stack.ensure_bucket(name)
    return name


@pytest.fixture
def s3_proxy(clean_stack: DevStack) -> Iterator[FaultProxy]:
    """A fault proxy in front of the stack's S3 (moto), cleared and stopped after the test."""
    host, port = clean_stack.s3_url.removeprefix("http://").split(":")
    with FaultProxy(host, int(port)) as proxy:
        yield proxy


@pytest.fixture
def stack_daemon(clean_stack: DevStack, azaiond_factory: Callable[..., DaemonHandle]) -> Callable[..., DaemonHandle]:
    """Start daemons configured for the dev stack: ``stack_daemon(login=True, overrides={...}, **factory_kwargs)``.

    With ``login`` the stack's admin logs in first, so the daemon is ready to load and upload.
    """

    def start(login: bool = True, **kwargs: Any) -> DaemonHandle:
        overrides = kwargs.pop("overrides", {})
        d = azaiond_factory(config_writer=clean_stack.write_config, overrides=overrides, **kwargs)
        if login:
            reply = d.call("login", {"email": clean_stack.admin.email, "password": clean_stack.admin.password})
            assert "result" in reply, reply
        return d

    return start


def unique_name(prefix: str = "res") -> str:
    """A resource or folder name no other test uses (the session stack's storage is shared)."""
    return f"{prefix}-{secrets.token_hex(6)}"


class ApiClient:
    """A thin ``requests`` client of the reference API for tests that talk to it directly."""

    def __init__(self, base: str, hardware: str) -> None:
        self.base = base
        self.hardware = hardware
        self.http = requests.Session()

    def login(self, user: User) -> str:
        creds = {"email": user.email, "password": user.password}
        resp = self.http.post(f"{self.base}/login", json=creds, timeout=10)
        resp.raise_for_status()
        token = resp.json()["token"]
        assert isinstance(token, str)
        return token

    def get(
        self, token: str, folder: str, name: str, user: User, hardware: str | None = None
    ) -> requests.Response:
        body: dict[str, Any] = {
            "fileName": name,
            "password": user.password,
            "hardware": hardware or self.hardware,
        }
        return self.http.post(
            f"{self.base}/resources/get/{folder}", json=body, headers=_bearer(token), timeout=10
        )

    def upload(self, token: str, folder: str, name: str, data: bytes) -> requests.Response:
        return self.http.post(
            f"{self.base}/resources/{folder}",
            files={"data": (name, data, "application/octet-stream")},
            headers=_bearer(token),
            timeout=10,
        )


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(clean_stack: DevStack) -> Iterator[ApiClient]:
    client = ApiClient(clean_stack.api_url, clean_stack.hardware)
    try:
        yield client
    finally:
        client.http.close()


__all__ = ["ApiClient", "unique_name"]
