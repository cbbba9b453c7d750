"""The vendor's v1 rules as the reference server knows them, written from docs/formats.md alone.

This module deliberately imports nothing from ``azaiond``: the daemon and this server are two
independent readings of the same format, so a wrong key derivation or name rule on either side
breaks the round trips in the tests instead of being mirrored on both sides.
``tests/test_formats.py`` pins both readings to fixed vectors made with the openssl command line.
"""

from __future__ import annotations

import base64
import hashlib
import os
import string

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_FIRST = frozenset(string.ascii_letters + string.digits)
_LATER = _FIRST | frozenset("._-")
NAME_MAX = 128


def allowed_name(value: object) -> bool:
    """A file or folder name: 1 to 128 of ASCII letters, digits, ``.``, ``_``, ``-``; the first a
    letter or digit."""
    if not isinstance(value, str) or not 0 < len(value) <= NAME_MAX:
        return False
    return value[0] in _FIRST and all(c in _LATER for c in value[1:])


def _b64_sha384(text: str) -> str:
    return base64.b64encode(hashlib.sha384(text.encode("utf-8")).digest()).decode("ascii")


def hardware_hash(hardware: str) -> str:
    """What a user's machine is bound to: base64 of SHA-384 over ``Azaion_<hardware>_%$$$)0_``."""
    return _b64_sha384("Azaion_" + hardware + "_%$$$)0_")


def user_secret(email: str, password: str, hw_hash: str) -> str:
    """The secret a download is encrypted for: base64 of SHA-384 over the joined fields."""
    return _b64_sha384("-".join((email, password, hw_hash, "#%@AzaionKey@%#---")))


def aes_key(secret: str) -> bytes:
    """Every v1 secret becomes an AES-256 key as the SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def encrypt(plain: bytes, key: bytes, iv: bytes | None = None) -> bytes:
    """v1 payload: a 16-byte IV, then AES-256-CBC of the PKCS7-padded plaintext."""
    iv = os.urandom(16) if iv is None else iv
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return iv + enc.update(padded) + enc.finalize()


def decrypt(data: bytes, key: bytes) -> bytes:
    """The inverse of ``encrypt``; raises ``ValueError`` on a bad length or padding."""
    if len(data) < 32 or len(data) % 16:
        raise ValueError("not a v1 payload")
    dec = Cipher(algorithms.AES(key), modes.CBC(data[:16])).decryptor()
    padded = dec.update(data[16:]) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()
