"""Pure functions: v1 crypto, key derivations, names and config parsing."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from azaiond import config, crypto, hardware
from azaiond.errors import ConfigError, IntegrityError, InvalidName
from azaiond.names import check_bucket, check_name

KEY = crypto.aes_key("unit-test-secret")


def test_jsonrpcserver_imports() -> None:
    # jsonrpcserver 5.0.9 is reported broken on some Pythons; fail loudly here.
    from jsonrpcserver import JsonRpcError
    from jsonrpcserver.async_main import dispatch_to_response

    assert callable(dispatch_to_response) and JsonRpcError is not None


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=5000), chunk=st.integers(min_value=16, max_value=4096))
def test_stream_round_trip_any_chunking(data: bytes, chunk: int) -> None:
    ct = io.BytesIO()
    n = crypto.encrypt_stream(io.BytesIO(data), ct, KEY, chunk=chunk)
    assert n == len(ct.getvalue()) == crypto.ciphertext_size(len(data))
    out = io.BytesIO()
    size, digest = crypto.decrypt_stream(io.BytesIO(ct.getvalue()), out, KEY, chunk=chunk)
    assert out.getvalue() == data and size == len(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert crypto.decrypt_bytes(ct.getvalue(), KEY) == data


@pytest.mark.parametrize("size", [0, 15, 16, 17, 100_000])
def test_openssl_decrypts_ours(size: int) -> None:
    plain = os.urandom(size)
    ct = crypto.encrypt_bytes(plain, KEY)
    out = subprocess.run(
        ["openssl", "enc", "-d", "-aes-256-cbc", "-K", KEY.hex(), "-iv", ct[:16].hex()],
        input=ct[16:],
        capture_output=True,
        check=True,
    ).stdout
    assert out == plain


def _fails(data: bytes, key: bytes = KEY) -> str:
    with pytest.raises(IntegrityError) as a:
        crypto.decrypt_bytes(data, key)
    with pytest.raises(IntegrityError) as b:
        crypto.decrypt_stream(io.BytesIO(data), io.BytesIO(), key)
    assert a.value.message == b.value.message
    return a.value.message


IV = bytes(range(16))  # fixed, so every tamper below has one deterministic outcome


def test_every_decryption_failure_looks_the_same() -> None:
    ct = crypto.encrypt_bytes(b"some plaintext that spans blocks!", KEY, iv=IV)
    tampered = bytearray(ct)
    tampered[-1] ^= 1
    messages = {
        _fails(ct[:-1]),  # wrong length
        _fails(ct[:-16]),  # truncated by a block
        _fails(bytes(tampered)),  # bad padding
        _fails(ct, crypto.aes_key("other key")),  # wrong key
        _fails(b""),
        _fails(ct[:16]),  # IV only
    }
    assert messages == {"decryption failed"}


def test_check_tail() -> None:
    ct = crypto.encrypt_bytes(b"a" * 1000, KEY, iv=IV)
    crypto.check_tail(ct[-32:], KEY)
    bad = bytearray(ct[-32:])
    bad[-1] ^= 0x40
    with pytest.raises(IntegrityError):
        crypto.check_tail(bytes(bad), KEY)
    with pytest.raises(IntegrityError):
        crypto.check_tail(ct[-31:], KEY)


@pytest.mark.parametrize("good", ["a", "model.bin", "A-1_b.c", "x" * 128, "9"])
def test_good_names(good: str) -> None:
    assert check_name(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "-x", ".x", "x" * 129, "a\x00b", "a b", "é", 5, None])
def test_bad_names(bad: object) -> None:
    with pytest.raises(InvalidName):
        check_name(bad)


@pytest.mark.parametrize("bad", ["ab", "Models", "-ab", "ab-", "a" * 64, "a..b", "192.168.1.1", "a_b"])
def test_bad_buckets(bad: str) -> None:
    with pytest.raises(InvalidName):
        check_bucket(bad)


def test_good_buckets() -> None:
    for name in ("abc", "models", "my.bucket-1", "a" * 63):
        assert check_bucket(name) == name


def test_config_defaults_match_spec() -> None:
    c = config.parse({})
    assert c.socket.path == Path("/run/azaiond/azaiond.sock")
    assert c.socket.group == "azaion" and c.socket.admin_groups == ("azaion-admin",)
    assert c.socket.max_message_mb == 32 and c.api.retries == 3
    assert c.resources.small_part_kb == 3 and c.resources.inline_limit_mb == 16
    assert c.unlock.archive == Path("/var/lib/azaiond/images.enc") and c.unlock.version == "latest"
    assert c.docker.base_url == "unix:///run/docker.sock"


def test_config_errors_name_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("api:\n  retries: lots\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: api\.retries: expected an integer 0-10, got 'lots'"):
        config.load(p)
    p.write_text("socket:\n  pth: /x\n")
    with pytest.raises(ConfigError, match=r"socket\.pth: unknown key"):
        config.load(p)
    p.write_text("state_dir: relative/dir\n")
    with pytest.raises(ConfigError, match="state_dir: expected an absolute path"):
        config.load(p)
    p.write_text("api: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(p)
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "missing.yaml")


def test_config_is_frozen_and_derives_archive(tmp_path: Path) -> None:
    c = config.parse({"state_dir": str(tmp_path), "resources": {"key": "s3cret"}})
    assert c.unlock.archive == tmp_path / "images.enc"
    assert "s3cret" not in repr(c)
    with pytest.raises(AttributeError):
        c.state_dir = Path("/")  # type: ignore[misc]


def test_hardware_description_from_a_fake_root(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor: 0\nmodel name\t: Test CPU 3000\n")
    (tmp_path / "proc/meminfo").write_text("MemTotal:       16384 kB\n")
    (tmp_path / "sys/block/nvme0n1/device").mkdir(parents=True)
    (tmp_path / "sys/block/nvme0n1/device/serial").write_text("SN123 \n")
    (tmp_path / "sys/block/loop0").mkdir(parents=True)
    assert hardware.describe(tmp_path) == "CPU: Test CPU 3000. GPU: none. Memory: 16384. DriveSerial: SN123."


REPO = Path(__file__).resolve().parent.parent


def test_conffile_states_the_socket_limits_at_their_defaults() -> None:
    import yaml

    shipped = config.parse(yaml.safe_load((REPO / "debian" / "config.yaml").read_text()))
    assert shipped.socket == config.SocketConfig()
    d = config.SocketConfig()
    assert (d.max_connections, d.max_connections_per_uid, d.max_buffered_mb) == (256, 32, 96)
    assert (d.idle_timeout, d.stall_timeout) == (300.0, 30.0)
    with pytest.raises(ConfigError, match=r"socket\.stall_timeout"):
        config.parse({"socket": {"stall_timeout": 0}})


def test_unit_limits_sit_above_the_per_peer_limits(tmp_path: Path) -> None:
    unit = (REPO / "systemd" / "azaiond.service").read_text()
    keys = dict(line.split("=", 1) for line in unit.splitlines() if line and line[0].isalpha() and "=" in line)
    d = config.SocketConfig()
    # Every allowed connection may hold a few descriptors (a message's, the unfinished one's).
    assert int(keys["LimitNOFILE"]) >= 10 * d.max_connections
    assert keys["MemoryHigh"] == "1G" and keys["MemoryMax"] == "1536M"
    assert int(keys["TasksMax"]) >= 1024
    # The whole unit still verifies cleanly (ExecStart= must exist on the checking machine).
    (tmp_path / "azaiond.service").write_text(unit.replace("/usr/bin/azaiond", "/bin/true"))
    socket_unit = (REPO / "systemd" / "azaiond.socket").read_text()
    (tmp_path / "azaiond.socket").write_text(socket_unit)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", "azaiond.service", "azaiond.socket"],
                          check=False, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
