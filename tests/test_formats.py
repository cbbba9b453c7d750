"""The daemon and the reference server read the v1 format independently; both must match vectors.

The expected values below were computed once with the openssl command line (openssl dgst
-sha384 -binary | base64, openssl dgst -sha256, openssl enc -aes-256-cbc -K .. -iv ..)
from the formulas in docs/formats.md, not with either implementation, so a slip in a derivation
on either side fails here even when the two sides agree with each other.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from azaiond import crypto, names
from azaiond.errors import InvalidName
from azaiond.seal import archive_key
from tests.support.refserver import v1

HARDWARE = "CPU: Azaion Test CPU. GPU: none. Memory: 16318480 kB. DriveSerial: AZ-DEV-0001."
EMAIL = "operator@azaion.example"
PASSWORD = "Pässwörd-1"  # non-ASCII on purpose: the formulas hash UTF-8 bytes
HW_HASH = "SPLDNvDdcAAACyTB4i8Jv/iiBfsioIpvQ9g22XbEUP3EUyOg+chVtDMUhOLEwDN9"
USER_SECRET = "lma47dGYZsCn+MF8zUnEK7GjZTJS0wQsjLN3pGzJWoFLf0aJWMKa1VDO1iylik4o"
USER_KEY = bytes.fromhex("eed822f72e512127ddc6a53a2285b54fd258fedadf806dfb51cd9f0b0a0fe66c")
IV = bytes(range(16))
# plaintext -> AES-256-CBC(USER_KEY, IV) without the IV in front, as openssl enc printed it
CIPHERTEXTS = {
    b"azaion v1 vector: 33 bytes long.\n": "bdbc61bfa403cfe14011c2bbe14bf073"
    "47ee8a87ca03d4c126a20c04ef306a061587ce8147cd0e1524fa95c954e36a87",
    b"": "06fe830ee00c7bea8ef8114865a03aa2",
    b"0123456789abcdef": "cd3ecb8749f56b4bca31ca0d505bf918ceacba1898247dfb5a02e7e5dd2831d4",
}
FRAGMENT = b"fragment\x00\xff bytes"
ARCHIVE_KEY = bytes.fromhex("5d37da24d137a6e49448c6014356441c7f19edf4234558e59df467d7b1ae8d05")


def test_hardware_hash() -> None:
    assert crypto.hw_hash(HARDWARE) == HW_HASH
    assert v1.hardware_hash(HARDWARE) == HW_HASH


def test_user_secret_and_key() -> None:
    assert crypto.api_key(EMAIL, PASSWORD, HW_HASH) == USER_SECRET
    assert v1.user_secret(EMAIL, PASSWORD, HW_HASH) == USER_SECRET
    assert crypto.aes_key(USER_SECRET) == USER_KEY
    assert v1.aes_key(USER_SECRET) == USER_KEY


def test_archive_key_hashes_raw_bytes() -> None:
    assert archive_key(FRAGMENT) == ARCHIVE_KEY


@pytest.mark.parametrize("plain", list(CIPHERTEXTS))
def test_payload_encryption(plain: bytes) -> None:
    expected = IV + bytes.fromhex(CIPHERTEXTS[plain])
    assert crypto.encrypt_bytes(plain, USER_KEY, IV) == expected
    assert v1.encrypt(plain, USER_KEY, IV) == expected
    assert crypto.decrypt_bytes(expected, USER_KEY) == plain
    assert v1.decrypt(expected, USER_KEY) == plain


def _daemon_accepts(name: str) -> bool:
    try:
        names.check_name(name)
    except InvalidName:
        return False
    return True


NAMES = {
    "model.bin": True,
    "a": True,
    "A" * 128: True,
    "A" * 129: False,
    "0_x-y.z": True,
    "": False,
    ".hidden": False,
    "-rf": False,
    "_x": False,
    "a/b": False,
    "..": False,
    "a b": False,
    "a\x00": False,
    "modèle.bin": False,
    "x\n": False,
}


@pytest.mark.parametrize("name", list(NAMES))
def test_name_rules(name: str) -> None:
    assert _daemon_accepts(name) is NAMES[name]
    assert v1.allowed_name(name) is NAMES[name]


@given(st.text(alphabet=string.printable + "éß\x00", max_size=140))
def test_name_rules_agree(name: str) -> None:
    assert _daemon_accepts(name) is v1.allowed_name(name)
