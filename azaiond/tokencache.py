"""The JWT cache in the state dir (docs/formats.md, files): reused across restarts until it expires.

The file is 0600 in a 0700 directory and replaced atomically, so a crash leaves either the
old token or the new one. It never holds the password.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from azaiond.fsutil import atomic_write

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
            data = json.loads(self.path.read_text(encoding="utf-8"))
            token = CachedToken(
                token=str(data["token"]), exp=float(data["exp"]), email=str(data["email"]), role=str(data["role"])
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("token cache %s is unreadable; ignoring it", self.path)
            self.clear()
            return None
        if token.exp <= time.time():
            self.clear()
            return None
        return token

    def save(self, token: CachedToken) -> None:
        body = json.dumps({"token": token.token, "exp": token.exp, "email": token.email, "role": token.role})
        try:
            atomic_write(self.path, body.encode("utf-8"), mode=0o600)
        except OSError as exc:
            # Losing the cache only costs a login after a restart; say so and go on.
            log.warning("cannot write token cache %s: %s", self.path, exc.strerror)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
