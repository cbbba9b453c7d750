"""The reference Resource API over real HTTP, and the dev stack's CDN key enforcement."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import requests
import yaml
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from azaiond import config, crypto
from azaiond.errors import IntegrityError
from tests.fixtures_stack import ApiClient, unique_name
from tests.support.devstack import DevStack, KeyPair
from tests.support.refserver import RefServer, User
from tests.support.refserver.handler import parse_multipart


def _api_key(user: User, hardware: str) -> bytes:
    return crypto.aes_key(crypto.api_key(user.email, user.password, crypto.hw_hash(hardware)))


def _error(resp: requests.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"ErrorCode", "Message"}
    assert isinstance(body, dict)
    return body


# ---- login and tokens ----------------------------------------------------------------------


def test_login_returns_jwt_with_claims(stack: DevStack, api: ApiClient) -> None:
    token = api.login(stack.admin)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["email"] == stack.admin.email
    assert claims["role"] == "Admin"
    assert 3500 < claims["exp"] - time.time() <= 3600


@pytest.mark.parametrize("email_ok", [True, False])
def test_login_bad_credentials_is_401(stack: DevStack, api: ApiClient, email_ok: bool) -> None:
    email = stack.admin.email if email_ok else "nobody@azaion.local"
    resp = api.http.post(f"{api.base}/login", json={"email": email, "password": "hunter2-x"}, timeout=10)
    body = _error(resp, 401)
    assert "hunter2" not in str(body)  # the password is not echoed


def test_missing_or_garbage_token_is_401(api: ApiClient) -> None:
    url = f"{api.base}/binary-split/key-fragment"
    _error(api.http.get(url, timeout=10), 401)
    _error(api.http.get(url, headers={"Authorization": "Bearer not.a.jwt"}, timeout=10), 401)
    forged = jwt.encode({"email": "admin@azaion.local", "role": "Admin", "exp": 2**31}, "g" * 32, "HS256")
    _error(api.http.get(url, headers={"Authorization": f"Bearer {forged}"}, timeout=10), 401)


def test_expire_tokens_switch(stack: DevStack, api: ApiClient, refserver: RefServer) -> None:
    token = api.login(stack.user)
    url = f"{api.base}/binary-split/key-fragment"
    headers = {"Authorization": f"Bearer {token}"}
    assert api.http.get(url, headers=headers, timeout=10).status_code == 200
    refserver.expire_tokens()
    _error(api.http.get(url, headers=headers, timeout=10), 401)
    fresh = api.login(stack.user)  # a new login works at once
    assert api.http.get(url, headers={"Authorization": f"Bearer {fresh}"}, timeout=10).status_code == 200


def test_token_ttl_expiry_is_honoured(stack: DevStack, api: ApiClient, refserver: RefServer) -> None:
    refserver.set_token_ttl(1)
    token = api.login(stack.user)
    time.sleep(2.1)
    resp = api.http.get(
        f"{api.base}/binary-split/key-fragment", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    _error(resp, 401)


# ---- injected failures, latency and counters -------------------------------------------------


def test_fail_switch_and_counters(stack: DevStack, api: ApiClient, refserver: RefServer) -> None:
    refserver.fail_next(2, prefix="/login")
    for _ in range(2):
        _error(api.http.post(f"{api.base}/login", json={}, timeout=10), 500)
    api.login(stack.admin)  # the third call goes through
    assert refserver.counters()["/login"] == 3
    assert refserver.calls("/login") == 3
    assert refserver.calls("/resources") == 0


def test_fail_switch_only_hits_its_prefix(stack: DevStack, api: ApiClient, refserver: RefServer) -> None:
    refserver.fail_next(1, prefix="/binary-split", status=503)
    token = api.login(stack.admin)  # not affected
    url = f"{api.base}/binary-split/key-fragment"
    headers = {"Authorization": f"Bearer {token}"}
    _error(api.http.get(url, headers=headers, timeout=10), 503)
    assert api.http.get(url, headers=headers, timeout=10).status_code == 200


def test_control_endpoints(stack: DevStack, api: ApiClient, refserver: RefServer) -> None:
    ctl = f"{api.base}/_control"
    assert api.http.post(f"{ctl}/fail", json={"count": 1, "prefix": "/login"}, timeout=10).ok
    _error(api.http.post(f"{api.base}/login", json={}, timeout=10), 500)
    calls = api.http.get(f"{ctl}/counters", timeout=10).json()["calls"]
    assert calls == {"/login": 1}  # control calls are not counted
    # With 3 s of added latency a client that waits 0.5 s must give up; after a reset it is served.
    assert api.http.post(f"{ctl}/latency", json={"seconds": 3}, timeout=10).ok
    with pytest.raises(requests.exceptions.ReadTimeout):
        api.http.post(f"{api.base}/login", json={"email": stack.user.email, "password": "x"}, timeout=0.5)
    assert api.http.post(f"{ctl}/reset", json={}, timeout=10).ok
    api.login(stack.user)
    assert api.http.get(f"{ctl}/counters", timeout=10).json()["calls"] == {"/login": 1}
    _error(api.http.post(f"{ctl}/fail", json={"count": "many"}, timeout=10), 400)
    _error(api.http.post(f"{ctl}/nope", json={}, timeout=10), 404)


def test_control_endpoints_for_tokens_bindings_and_corruption(stack: DevStack, api: ApiClient) -> None:
    ctl = f"{api.base}/_control"
    token = api.login(stack.user)
    assert api.get(token, "", "cdn.yaml", stack.user).status_code == 200
    bindings = api.http.get(f"{ctl}/bindings", timeout=10).json()["bindings"]
    assert bindings == {stack.user.email: crypto.hw_hash(stack.hardware)}
    assert api.http.post(f"{ctl}/reset-bindings", json={}, timeout=10).ok
    assert api.http.get(f"{ctl}/bindings", timeout=10).json()["bindings"] == {}
    assert api.http.post(f"{ctl}/corrupt", json={"count": 1}, timeout=10).ok
    bad = api.get(token, "", "cdn.yaml", stack.user)
    with pytest.raises(IntegrityError):
        crypto.decrypt_bytes(bad.content, _api_key(stack.user, stack.hardware))
    assert api.http.post(f"{ctl}/expire-tokens", json={}, timeout=10).ok
    _error(api.get(token, "", "cdn.yaml", stack.user), 401)
    assert api.http.post(f"{ctl}/token-ttl", json={"seconds": 100}, timeout=10).ok
    claims = jwt.decode(api.login(stack.user), options={"verify_signature": False})
    assert claims["exp"] - time.time() <= 100


# ---- resources/get, hardware binding -------------------------------------------------------


def test_cdn_yaml_decrypts_and_parses(stack: DevStack, api: ApiClient) -> None:
    token = api.login(stack.user)
    resp = api.get(token, "", "cdn.yaml", stack.user)
    assert resp.status_code == 200
    cdn = yaml.safe_load(crypto.decrypt_bytes(resp.content, _api_key(stack.user, stack.hardware)))
    assert cdn["host"] == stack.s3_url
    assert cdn["downloader_access_key"] == stack.read_keys.access_key
    assert cdn["uploader_access_key"] == stack.write_keys.access_key
    assert cdn["downloader_access_key"] != cdn["uploader_access_key"]
    assert {"downloader_access_secret", "uploader_access_secret"} <= cdn.keys()


def test_unknown_file_is_404(stack: DevStack, api: ApiClient) -> None:
    token = api.login(stack.user)
    _error(api.get(token, "models", unique_name(), stack.user), 404)


def test_bad_get_requests(stack: DevStack, api: ApiClient) -> None:
    token = api.login(stack.user)
    url = f"{api.base}/resources/get/models"
    headers = {"Authorization": f"Bearer {token}"}
    _error(api.http.post(url, json={"fileName": "x"}, headers=headers, timeout=10), 400)
    _error(api.http.post(url, data=b"{not json", headers=headers, timeout=10), 400)
    _error(api.http.post(f"{api.base}/resources/get/-bad", json={}, headers=headers, timeout=10), 400)
    _error(api.get(token, "", "../cdn.yaml", stack.user), 400)
    other = User(stack.user.email, "not-the-password", "User")
    _error(api.get(token, "", "cdn.yaml", other), 403)


def test_hardware_binding_409(stack: DevStack, api: ApiClient, refserver: RefServer) -> None:
    token = api.login(stack.user)
    assert api.get(token, "", "cdn.yaml", stack.user).status_code == 200
    assert refserver.bindings()[stack.user.email] == crypto.hw_hash(stack.hardware)
    body = _error(api.get(token, "", "cdn.yaml", stack.user, hardware="CPU: other."), 409)
    assert stack.user.password not in str(body)
    # Binding is per user: the admin may still bind to the other machine.
    admin_token = api.login(stack.admin)
    assert api.get(admin_token, "", "cdn.yaml", stack.admin, hardware="CPU: other.").status_code == 200
    refserver.reset_bindings()
    assert api.get(token, "", "cdn.yaml", stack.user, hardware="CPU: other.").status_code == 200


def test_upload_then_get_roundtrip(stack: DevStack, api: ApiClient, refserver: RefServer) -> None:
    folder, name = unique_name("f"), unique_name() + ".small"
    # Binary content with CR, LF and a boundary-like line must survive the multipart parser.
    data = bytes(range(256)) * 4 + b"\r\n--boundary\r\n\r\n" + b"\n\r"
    token = api.login(stack.admin)
    resp = api.upload(token, folder, name, data)
    assert resp.status_code == 200, resp.text
    assert refserver.get_part(folder, name) == data
    user_token = api.login(stack.user)
    got = api.get(user_token, folder, name, stack.user)
    assert got.status_code == 200
    assert crypto.decrypt_bytes(got.content, _api_key(stack.user, stack.hardware)) == data


def test_upload_roles(stack: DevStack, api: ApiClient, refserver: RefServer) -> None:
    folder = unique_name("f")
    token = api.login(stack.user)
    _error(api.upload(token, folder, "a.small", b"x"), 403)
    for role in ("ApiAdmin", "ResourceUploader"):
        uploader = User(f"{role.lower()}@azaion.local", "pw-" + role, role)
        refserver.add_user(uploader)
        assert api.upload(api.login(uploader), folder, f"{role}.small", b"x").status_code == 200
    for role in ("Validator", "Operator"):
        other = User(f"{role.lower()}@azaion.local", "pw-" + role, role)
        refserver.add_user(other)
        _error(api.upload(api.login(other), folder, "b.small", b"x"), 403)
    _error(api.upload("garbage", folder, "c.small", b"x"), 401)


def test_upload_needs_data_field_with_valid_name(stack: DevStack, api: ApiClient) -> None:
    token = api.login(stack.admin)
    url = f"{api.base}/resources/models"
    headers = {"Authorization": f"Bearer {token}"}
    resp = api.http.post(url, files={"other": ("a.small", b"x")}, headers=headers, timeout=10)
    _error(resp, 400)
    _error(api.upload(token, "models", "../evil", b"x"), 400)
    _error(api.http.post(url, data=b"x", headers=headers, timeout=10), 400)


def test_parse_multipart_edge_cases() -> None:
    body = (
        b"preamble\r\n--B\r\nContent-Disposition: form-data; name=\"data\"; filename=\"x.small\"\r\n"
        b"Content-Type: application/octet-stream\r\n\r\nline1\r\n--Bnot\r\n\r\n--B--\r\n"
    )
    fields = parse_multipart('multipart/form-data; boundary="B"', body)
    assert fields == {"data": ("x.small", b"line1\r\n--Bnot\r\n")}


def test_corrupt_switch_breaks_decryption(stack: DevStack, api: ApiClient, refserver: RefServer) -> None:
    token = api.login(stack.user)
    refserver.corrupt_next_get()
    bad = api.get(token, "", "cdn.yaml", stack.user)
    assert bad.status_code == 200
    with pytest.raises(IntegrityError):
        crypto.decrypt_bytes(bad.content, _api_key(stack.user, stack.hardware))
    good = api.get(token, "", "cdn.yaml", stack.user)  # only the next one was corrupted
    crypto.decrypt_bytes(good.content, _api_key(stack.user, stack.hardware))


def test_part_switch_replaces_stored_file(stack: DevStack, api: ApiClient, refserver: RefServer) -> None:
    folder, name = unique_name("f"), "p.small"
    refserver.put_part(folder, name, b"original")
    ctl = f"{api.base}/_control/part"
    assert api.http.get(ctl, params={"folder": folder, "name": name}, timeout=10).content == b"original"
    assert api.http.put(ctl, params={"folder": folder, "name": name}, data=b"tampered", timeout=10).ok
    token = api.login(stack.user)
    got = api.get(token, folder, name, stack.user)
    assert crypto.decrypt_bytes(got.content, _api_key(stack.user, stack.hardware)) == b"tampered"
    assert api.http.delete(ctl, params={"folder": folder, "name": name}, timeout=10).ok
    _error(api.get(token, folder, name, stack.user), 404)


# ---- key fragment ----------------------------------------------------------------------------


def test_key_fragment(stack: DevStack, api: ApiClient, refserver: RefServer) -> None:
    token = api.login(stack.user)
    url = f"{api.base}/binary-split/key-fragment"
    resp = api.http.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert resp.status_code == 200
    assert resp.content == stack.key_fragment
    refserver.set_key_fragment(None)
    try:
        _error(api.http.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10), 404)
    finally:
        refserver.set_key_fragment(stack.key_fragment)


def test_unknown_route_is_404(api: ApiClient) -> None:
    _error(api.http.get(f"{api.base}/nothing", timeout=10), 404)


# ---- a standalone server and the CLI ---------------------------------------------------------


def test_standalone_server_with_storage_dir(tmp_path: Path) -> None:
    user = User("a@b.c", "pw", "ResourceUploader")
    with RefServer(users=[user], storage=tmp_path / "store", control=False) as srv:
        api = ApiClient(srv.url, "hw")
        token = api.login(user)
        assert api.upload(token, "models", "m.small", b"abc").status_code == 200
        assert (tmp_path / "store" / "models" / "m.small").read_bytes() == b"abc"
        assert api.http.get(f"{srv.url}/_control/counters", timeout=10).status_code == 404
        _error(api.get(token, "", "cdn.yaml", user), 404)
        with pytest.raises(ValueError):
            srv.put_part("models", "../escape", b"x")


def test_cli_prints_url_and_serves(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.refserver.cli", "--user", "a@b.c:p:w:Admin", "--log-level", "error"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        resp = requests.post(f"{url}/login", json={"email": "a@b.c", "password": "p:w"}, timeout=10)
        assert resp.status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


# ---- the CDN's key pairs on moto -------------------------------------------------------------


def test_cdn_keys_are_enforced(stack: DevStack, bucket: str) -> None:
    assert stack.enforced
    reader, writer = stack.s3_client(stack.read_keys), stack.s3_client(stack.write_keys)
    writer.put_object(Bucket=bucket, Key="obj.big", Body=b"payload")
    assert reader.get_object(Bucket=bucket, Key="obj.big")["Body"].read() == b"payload"
    assert reader.head_object(Bucket=bucket, Key="obj.big")["ContentLength"] == 7
    with pytest.raises(ClientError) as exc:
        reader.put_object(Bucket=bucket, Key="evil.big", Body=b"x")
    assert exc.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError) as exc:
        writer.get_object(Bucket=bucket, Key="obj.big")
    assert exc.value.response["Error"]["Code"] == "AccessDenied"
    with pytest.raises(ClientError):
        wrong = stack.s3_client(KeyPair(stack.read_keys.access_key, "wrong-secret"))
        wrong.get_object(Bucket=bucket, Key="obj.big")
    admin = stack.s3_admin_client()
    admin.put_object(Bucket=bucket, Key="obj.big", Body=b"tampered")
    assert reader.get_object(Bucket=bucket, Key="obj.big")["Body"].read() == b"tampered"


def test_writer_can_multipart_upload(stack: DevStack, bucket: str) -> None:
    writer, reader = stack.s3_client(stack.write_keys), stack.s3_client(stack.read_keys)
    data = b"z" * (6 * 1024 * 1024)
    writer.upload_fileobj(
        io.BytesIO(data), bucket, "big.big", Config=TransferConfig(multipart_threshold=5 * 1024 * 1024)
    )
    out = io.BytesIO()
    reader.download_fileobj(bucket, "big.big", out)
    assert out.getvalue() == data


def test_write_config_loads(stack: DevStack, tmp_path: Path) -> None:
    path = stack.write_config(
        tmp_path / "c.yaml", tmp_path / "state", tmp_path / "s.sock", api={"retries": 0}, log_level="debug"
    )
    assert path.stat().st_mode & 0o777 == 0o600
    cfg = config.load(path)
    assert cfg.api.url == stack.api_url and cfg.api.retries == 0
    assert cfg.cdn.endpoint == stack.s3_url
    assert cfg.resources.key == stack.resource_key
    assert cfg.hardware == stack.hardware
    assert cfg.socket.path == tmp_path / "s.sock"
