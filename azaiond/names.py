"""Validation of the names that reach the file system, the Resource API and the CDN (docs/protocol.md)."""

from __future__ import annotations

import re

from azaiond.errors import InvalidName

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")


def _describe(value: object) -> str:
    # repr() keeps control characters such as NUL visible, and long names are cut.
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_name(value: object, what: str = "name") -> str:
    """A resource name, folder or CDN key: ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``.

    The first character can be neither ``.`` nor ``-``, so ``..`` and option-like names are out,
    and ``/`` is not in the alphabet, so no name can leave its directory.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidName(
            f"{what} {_describe(value)} is not allowed: use 1-128 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return value


def check_bucket(value: object) -> str:
    """An S3 bucket name: 3-63 of a-z 0-9 . -, starting and ending with a letter or digit."""
    if (
        not isinstance(value, str)
        or not _BUCKET.fullmatch(value)
        or ".." in value
        or _IPV4.fullmatch(value)
    ):
        raise InvalidName(
            f"bucket {_describe(value)} is not allowed: use 3-63 of a-z 0-9 . -, "
            "starting and ending with a letter or digit"
        )
    return value
