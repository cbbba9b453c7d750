"""The test fault proxy itself, in front of the real reference API and moto."""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
import requests
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ResponseStreamingError,
)
from urllib3.exceptions import ProtocolError

from tests.faultproxy import Fault, FaultProxy, Match
from tests.fixtures_stack import ApiClient
from tests.support.devstack import REGION, DevStack, boto_config


def _proxy_for(url: str) -> FaultProxy:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return FaultProxy(parts.hostname, parts.port).start()


@pytest.fixture
def api_proxy(clean_stack: DevStack) -> Iterator[FaultProxy]:
    proxy = _proxy_for(clean_stack.api_url)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def cdn_proxy(clean_stack: DevStack) -> Iterator[FaultProxy]:
    proxy = _proxy_for(clean_stack.s3_url)
    try:
        yield proxy
    finally:
        proxy.stop()


def _s3(stack: DevStack, proxy: FaultProxy) -> Any:
    return boto3.client(
        "s3", endpoint_url=proxy.url, region_name=REGION,
        aws_access_key_id=stack.admin_keys.access_key,
        aws_secret_access_key=stack.admin_keys.secret_key, config=boto_config(),
    )


def test_pass_counts_requests_and_bytes(stack: DevStack, api_proxy: FaultProxy) -> None:
    http = requests.Session()
    for _ in range(3):  # keep-alive: several requests on one pooled connection
        resp = http.post(f"{api_proxy.url}/login",
                         json={"email": stack.admin.email, "password": stack.admin.password}, timeout=10)
        assert resp.status_code == 200 and "token" in resp.json()
    assert api_proxy.count("POST", "/login") == 3
    assert api_proxy.bytes_up > 0 and api_proxy.bytes_down > 0
    assert api_proxy.faulted == 0


def test_status_rule_applies_per_request_and_times(stack: DevStack, api_proxy: FaultProxy) -> None:
    http = requests.Session()
    creds = {"email": stack.admin.email, "password": stack.admin.password}
    assert http.post(f"{api_proxy.url}/login", json=creds, timeout=10).status_code == 200
    api_proxy.set(Fault.answer(503), Match("POST", "/login"), times=2)
    codes = [http.post(f"{api_proxy.url}/login", json=creds, timeout=10).status_code for _ in range(3)]
    assert codes == [503, 503, 200]
    # A rule for another path leaves this one alone.
    api_proxy.set(Fault.answer(500), Match(path_prefix="/resources"))
    assert http.post(f"{api_proxy.url}/login", json=creds, timeout=10).status_code == 200


def test_hang_never_answers_until_cleared(stack: DevStack, api_proxy: FaultProxy) -> None:
    api_proxy.set(Fault.hang())
    started = time.monotonic()
    with pytest.raises(requests.ReadTimeout):
        requests.post(f"{api_proxy.url}/login", json={}, timeout=0.5)
    assert time.monotonic() - started >= 0.5
    api_proxy.clear()
    creds = {"email": stack.admin.email, "password": stack.admin.password}
    assert requests.post(f"{api_proxy.url}/login", json=creds, timeout=10).status_code == 200


def test_reset_and_cut(stack: DevStack, api_proxy: FaultProxy, api: ApiClient) -> None:
    api_proxy.set(Fault.reset())
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{api_proxy.url}/login", json={}, timeout=5)
    api_proxy.clear()
    # A cut response: the client sees fewer bytes than Content-Length announced.
    token = api.login(stack.admin)
    body = {"fileName": "cdn.yaml", "password": stack.admin.password, "hardware": stack.hardware}
    headers = {"Authorization": f"Bearer {token}"}
    full = requests.post(f"{api_proxy.url}/resources/get/", json=body, headers=headers, timeout=10)
    assert full.status_code == 200 and len(full.content) > 32
    api_proxy.set(Fault.cut(after=10))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.post(f"{api_proxy.url}/resources/get/", json=body, headers=headers, timeout=10)


def test_slow_limits_the_rate(stack: DevStack, bucket: str, cdn_proxy: FaultProxy) -> None:
    s3 = stack.s3_admin_client()
    data = secrets.token_bytes(3000)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    via = _s3(stack, cdn_proxy)
    cdn_proxy.set(Fault.slow(10_000), Match("GET"))
    started = time.monotonic()
    got = via.get_object(Bucket=bucket, Key="k")["Body"].read()
    elapsed = time.monotonic() - started
    assert got == data
    assert elapsed >= 0.25  # > 3000 body bytes (plus the head) at 10 kB/s


def test_cdn_faults_through_boto3(stack: DevStack, bucket: str, cdn_proxy: FaultProxy) -> None:
    s3 = stack.s3_admin_client()
    data = secrets.token_bytes(100_000)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    via = _s3(stack, cdn_proxy)
    # 503 on every GET: boto3 gives up after its retries.
    cdn_proxy.set(Fault.answer(503), Match("GET"))
    with pytest.raises(ClientError):
        via.get_object(Bucket=bucket, Key="k")
    # A cut body: fewer bytes than announced.
    cdn_proxy.set(Fault.cut(), Match("GET"))
    resp = via.get_object(Bucket=bucket, Key="k")
    with pytest.raises((IncompleteReadError, ResponseStreamingError, ProtocolError)):
        resp["Body"].read()
    # An upload whose request body is cut never lands.
    cdn_proxy.set(Fault.cut(upload=True), Match("PUT"))
    with pytest.raises((ConnectionClosedError, EndpointConnectionError, ClientError)):
        via.put_object(Bucket=bucket, Key="cut", Body=io.BytesIO(data))
    cdn_proxy.clear()
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="cut")
    assert cdn_proxy.faulted >= 3
