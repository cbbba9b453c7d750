"""The JWT cache in the state dir (docs/formats.md, files): reused across restarts until it expires.

The file is 0600 in a 0700 directory and replaced atomically, so a crash leaves either the
old token or the new one. It never holds the password.

The file is untrusted input: anything but a mapping of the four fields with the right types (a
finite ``exp``) is logged once, removed if possible, and ignored.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from azaiond.errors import StorageError
from azaiond.fsutil import atomic_write, storage_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedToken:
    token: str = field(repr=False)
    exp: float
    email: str
    role: str


class TokenCache:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> CachedToken | None:
        """The cached token if it is readable and unexpired, else None (and a bad file is removed)."""
        try:
            data = json.loads(self.path.read_bytes())
            token = _parse(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            log.warning("token cache %s is unreadable or malformed; ignoring it", self.path)
            self._discard()
            return None
        if token.exp <= time.time():
            self._discard()
            return None
        return token

    def save(self, token: CachedToken) -> None:
        body = json.dumps({"token": token.token, "exp": token.exp, "email": token.email, "role": token.role})
        try:
            atomic_write(self.path, body.encode("utf-8"), mode=0o600)
        except StorageError as exc:
            # Losing the cache only costs a login after a restart; say so and go on.
            log.warning("cannot write the token cache: %s", exc.message)

    def clear(self) -> None:
        """Forget the token (logout): a token that cannot be removed is a storage failure."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            raise storage_error(exc, self.path) from exc

    def _discard(self) -> None:
        try:
            self.clear()
        except StorageError as exc:
            log.warning("cannot remove the token cache: %s", exc.message)


def _parse(data: object) -> CachedToken:
    if not isinstance(data, dict):
        raise TypeError("not a mapping")
    fields = {name: data[name] for name in ("token", "exp", "email", "role")}
    if not all(isinstance(fields[name], str) and fields[name] for name in ("token", "email", "role")):
        raise TypeError("a field is not a non-empty string")
    exp = fields["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        raise TypeError("exp is not a finite number")
    return CachedToken(token=fields["token"], exp=float(exp), email=fields["email"], role=fields["role"])
