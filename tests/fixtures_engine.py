"""The services wired in-process against the dev stack (reference Resource API + moto S3), through
``wiring.build_services`` with a recording boto3 session: the ``engine`` and ``make_engine`` fixtures."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from azaiond import wiring
from azaiond.account import Account
from azaiond.apiclient import Credentials, ResourceApi
from azaiond.config import ApiConfig, CdnConfig, Config
from azaiond.resources import SplitResources
from tests.support.devstack import DevStack

FOLDER = "models"


@dataclass
class Engine:
    api: ResourceApi
    account: Account
    resources: SplitResources
    gets: list[str]  # GetObject calls this engine's CDN client made
    state_dir: Path

    def load_bytes(self, name: str, folder: str = FOLDER) -> bytes:
        out = io.BytesIO()
        result = self.resources.load(name, folder, out)
        data = out.getvalue()
        assert result.size == len(data)
        assert result.sha256 == hashlib.sha256(data).hexdigest()
        return data

    def upload_bytes(self, name: str, data: bytes, folder: str = FOLDER) -> Any:
        return self.resources.upload(name, folder, io.BytesIO(data))


@pytest.fixture
def make_engine(clean_stack: DevStack, tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    stack = clean_stack
    built: list[wiring.Services] = []

    def make(
        *,
        email: str | None = None,
        password: str | None = None,
        hardware: str | None = None,
        api_url: str | None = None,
        cdn_endpoint: str | None = None,
        retries: int = 3,
        state: str = "state",
        login: bool = True,
    ) -> Engine:
        state_dir = tmp_path / state
        session = requests.Session()  # closed with the services
        gets: list[str] = []
        boto = boto3.session.Session()
        boto.events.register("before-send.s3.GetObject", lambda **kw: gets.append(kw["request"].url))
        config = Config(
            api=ApiConfig(url=api_url or stack.api_url, retries=retries, timeout=5, backoff=0.01),
            state_dir=state_dir,
            hardware=hardware or stack.hardware,
            cdn=CdnConfig(endpoint=cdn_endpoint or stack.s3_url, retries=0),
        )
        services = wiring.build_services(
            config,
            wiring.Overrides(
                session=session,
                boto_session=boto,
                login_credentials=lambda: None,
                resource_key=lambda: stack.resource_key,
            ),
        )
        built.append(services)
        api, account, resources = services.account.api, services.account, services.resources
        if login:
            account.login(Credentials(email or stack.admin.email, password or stack.admin.password))
        return Engine(api, account, resources, gets, state_dir)

    stack.ensure_bucket(FOLDER)
    yield make
    for services in built:
        services.close()


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()
