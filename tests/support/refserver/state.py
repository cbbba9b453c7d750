"""The reference Resource API's state and rules (SPEC section 5), with no HTTP in it.

``ApiState`` holds users, tokens, hardware bindings, stored files and the test switches behind
one lock, so the HTTP handler threads and a test driving the switches never see half an update.
Every refusal is an ``ApiError`` carrying the HTTP status and the ``{"ErrorCode","Message"}``
body; messages name the user or file at most, never a password, token or key.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt

from tests.support.refserver import v1

ROLES = ("ApiAdmin", "Admin", "ResourceUploader", "Validator", "Operator", "User")
UPLOAD_ROLES = frozenset({"ApiAdmin", "Admin", "ResourceUploader"})
CDN_YAML = "cdn.yaml"

# Application error codes for the {"ErrorCode","Message"} body. The daemon keys on the HTTP
# status only; these just make the server's answers easy to tell apart in logs and tests.
E_BAD_REQUEST = 10
E_BAD_CREDENTIALS = 20
E_TOKEN = 21
E_FORBIDDEN = 30
E_HARDWARE = 40
E_NOT_FOUND = 50
E_INJECTED = 90


@dataclass(frozen=True)
class User:
    email: str
    password: str = field(repr=False)
    role: str = "User"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; use one of {', '.join(ROLES)}")


class ApiError(Exception):
    """A refusal: HTTP status plus the JSON error body."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"ErrorCode": self.error_code, "Message": self.message}


def _valid(name: str) -> bool:
    return v1.allowed_name(name)


class _Store:
    """Small files by (folder, name): a dict, or a directory when ``root`` is given.

    Folder ``""`` (cdn.yaml) lives in ``@root``, a name no valid folder can take, so it cannot
    collide with a folder. Callers validate names before they get here.
    """

    def __init__(self, root: Path | None) -> None:
        self._root = root
        self._mem: dict[tuple[str, str], bytes] = {}
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def _path(self, folder: str, name: str) -> Path:
        assert self._root is not None
        # Defence in depth: the handler validates too, but the Python API reaches here directly.
        if not (_valid(name) and (folder == "" or _valid(folder))):
            raise ValueError("not an allowed folder or file name")
        return self._root / (folder or "@root") / name

    def get(self, folder: str, name: str) -> bytes | None:
        if self._root is None:
            return self._mem.get((folder, name))
        try:
            return self._path(folder, name).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, folder: str, name: str, data: bytes) -> None:
        if self._root is None:
            self._mem[(folder, name)] = bytes(data)
            return
        path = self._path(folder, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{name}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # readers never see a half-written part

    def delete(self, folder: str, name: str) -> bool:
        if self._root is None:
            return self._mem.pop((folder, name), None) is not None
        try:
            self._path(folder, name).unlink()
        except FileNotFoundError:
            return False
        return True


@dataclass
class _FailRule:
    remaining: int
    prefix: str
    status: int


class ApiState:
    """Users, tokens, bindings, files and test switches of one reference server; thread-safe."""

    def __init__(
        self,
        users: Iterable[User] = (),
        key_fragment: bytes | None = None,
        cdn_yaml: bytes | None = None,
        token_ttl: float = 3600,
        storage: Path | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._users: dict[str, User] = {u.email: u for u in users}
        # A fresh signing key per server: tokens of an earlier run are never accepted.
        self._jwt_secret = secrets.token_bytes(32)
        self._token_ttl = self._initial_ttl = float(token_ttl)
        self._generation = 0  # bumped by expire_tokens(); older tokens are refused
        self._bindings: dict[str, str] = {}
        self._store = _Store(storage)
        self._key_fragment = key_fragment
        self._fail_rules: list[_FailRule] = []
        self._latency = 0.0
        self._corrupt: list[tuple[int, int]] = []  # (offset, xor mask) per coming resources/get
        self._counters: Counter[str] = Counter()
        if cdn_yaml is not None:
            self._store.put("", CDN_YAML, cdn_yaml)

    # ---- the API's rules -------------------------------------------------------------------

    def login(self, email: object, password: object) -> str:
        with self._lock:
            user = self._users.get(email) if isinstance(email, str) else None
            # compare_digest: the reference should not teach clients to rely on timing.
            if (
                user is None
                or not isinstance(password, str)
                or not secrets.compare_digest(user.password.encode(), password.encode())
            ):
                raise ApiError(401, E_BAD_CREDENTIALS, "wrong email or password")
            now = time.time()
            claims = {
                "email": user.email,
                "role": user.role,
                "iat": int(now),
                "exp": int(now + self._token_ttl),
                "gen": self._generation,
                "jti": secrets.token_hex(8),
            }
            return jwt.encode(claims, self._jwt_secret, algorithm="HS256")

    def authenticate(self, authorization: str | None) -> User:
        """The user behind a ``Bearer`` header, or 401."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, E_TOKEN, "missing bearer token")
        try:
            claims = jwt.decode(
                token.strip(), self._jwt_secret, algorithms=["HS256"], options={"require": ["exp"]}
            )
        except jwt.ExpiredSignatureError as exc:
            raise ApiError(401, E_TOKEN, "token expired") from exc
        except jwt.InvalidTokenError as exc:
            raise ApiError(401, E_TOKEN, "invalid token") from exc
        with self._lock:
            if claims.get("gen") != self._generation:
                raise ApiError(401, E_TOKEN, "token expired")
            user = self._users.get(str(claims.get("email")))
        if user is None:
            raise ApiError(401, E_TOKEN, "invalid token")
        return user

    def get_resource(self, user: User, folder: str, request: Mapping[str, Any]) -> bytes:
        """The stored file, encrypted with the user's api_key for the caller's hardware."""
        name, password, hardware = (request.get(k) for k in ("fileName", "password", "hardware"))
        if not all(isinstance(v, str) and v for v in (name, password, hardware)):
            raise ApiError(400, E_BAD_REQUEST, "fileName, password and hardware are required strings")
        assert isinstance(name, str) and isinstance(password, str) and isinstance(hardware, str)
        if not _valid(name):
            raise ApiError(400, E_BAD_REQUEST, "fileName is not an allowed name")
        if not secrets.compare_digest(user.password.encode(), password.encode()):
            raise ApiError(403, E_BAD_CREDENTIALS, "password does not match the token's user")
        hw = v1.hardware_hash(hardware)
        with self._lock:
            bound = self._bindings.setdefault(user.email, hw)  # the first hardware seen wins
            if bound != hw:
                raise ApiError(409, E_HARDWARE, f"{user.email} is bound to other hardware")
            content = self._store.get(folder, name)
            if content is None:
                raise ApiError(404, E_NOT_FOUND, f"no file {name!r} in folder {folder!r}")
            # Only a successful answer consumes a pending corruption.
            tamper = self._corrupt.pop(0) if self._corrupt else None
        body = v1.encrypt(content, v1.aes_key(v1.user_secret(user.email, password, hw)))
        if tamper is not None:
            offset, mask = tamper
            data = bytearray(body)
            data[offset % len(data)] ^= mask
            body = bytes(data)
        return body

    def check_upload(self, user: User) -> None:
        if user.role not in UPLOAD_ROLES:
            raise ApiError(403, E_FORBIDDEN, f"role {user.role} may not upload")

    def put_resource(self, user: User, folder: str, name: str, data: bytes) -> None:
        self.check_upload(user)
        with self._lock:
            self._store.put(folder, name, data)

    def key_fragment(self, user: User) -> bytes:
        del user  # any authenticated user may fetch it, as in the seed
        with self._lock:
            if self._key_fragment is None:
                raise ApiError(404, E_NOT_FOUND, "no key fragment configured")
            return self._key_fragment

    # ---- per-call hooks used by the HTTP layer ---------------------------------------------

    def begin_call(self, path: str) -> tuple[float, int | None]:
        """Count a call; returns (latency to add, injected status or None)."""
        with self._lock:
            self._counters[path] += 1
            for rule in self._fail_rules:
                if rule.remaining > 0 and path.startswith(rule.prefix):
                    rule.remaining -= 1
                    self._fail_rules = [r for r in self._fail_rules if r.remaining > 0]
                    return self._latency, rule.status
            return self._latency, None

    # ---- test switches (also reachable over HTTP under /_control/) -------------------------

    def add_user(self, user: User) -> None:
        with self._lock:
            self._users[user.email] = user

    def set_key_fragment(self, fragment: bytes | None) -> None:
        with self._lock:
            self._key_fragment = fragment

    def set_cdn_yaml(self, data: bytes) -> None:
        self.put_part("", CDN_YAML, data)

    def set_token_ttl(self, seconds: float) -> None:
        """TTL of tokens issued from now on (tests of refresh-before-expiry use a few seconds)."""
        with self._lock:
            self._token_ttl = float(seconds)

    def fail_next(self, count: int = 1, prefix: str = "", status: int = 500) -> None:
        """Answer the next ``count`` calls whose path starts with ``prefix`` with ``status``."""
        if count < 0 or not 400 <= status <= 599:
            raise ValueError("count must be >= 0 and status a 4xx or 5xx code")
        with self._lock:
            if count:
                self._fail_rules.append(_FailRule(count, prefix, status))

    def set_latency(self, seconds: float) -> None:
        """Delay every API call (not /_control/) by ``seconds``."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        with self._lock:
            self._latency = float(seconds)

    def expire_tokens(self) -> None:
        """Refuse every token issued so far with 401; new logins work as usual."""
        with self._lock:
            self._generation += 1

    def corrupt_next_get(self, count: int = 1, offset: int = -17, mask: int = 0x80) -> None:
        """XOR ``mask`` into byte ``offset`` of the next ``count`` resources/get bodies.

        The default hits the last byte of the second-to-last ciphertext block, which in CBC
        flips the same bit of the padding byte: the padding check then fails every time, so a
        test of tampering in transit is deterministic.
        """
        if not 1 <= mask <= 255:
            raise ValueError("mask must be 1-255")
        with self._lock:
            self._corrupt.extend([(offset, mask)] * count)

    def get_part(self, folder: str, name: str) -> bytes | None:
        """A stored file as the server holds it (a small part is ciphertext under the resource key)."""
        with self._lock:
            return self._store.get(folder, name)

    def put_part(self, folder: str, name: str, data: bytes) -> None:
        """Replace a stored file, e.g. to simulate tampering on the server side."""
        with self._lock:
            self._store.put(folder, name, data)

    def delete_part(self, folder: str, name: str) -> bool:
        with self._lock:
            return self._store.delete(folder, name)

    def bindings(self) -> dict[str, str]:
        """email -> bound hardware hash."""
        with self._lock:
            return dict(self._bindings)

    def reset_bindings(self) -> None:
        with self._lock:
            self._bindings.clear()

    def counters(self) -> dict[str, int]:
        """Calls per request path (control calls excluded), failed and injected ones included."""
        with self._lock:
            return dict(self._counters)

    def calls(self, prefix: str = "") -> int:
        """How many calls went to paths starting with ``prefix``."""
        with self._lock:
            return sum(n for path, n in self._counters.items() if path.startswith(prefix))

    def reset_counters(self) -> None:
        with self._lock:
            self._counters.clear()

    def reset_switches(self) -> None:
        """Back to normal: no injected failures, latency or corruption, the first token TTL;
        counters and bindings cleared.

        Stored files, users and already issued tokens are kept.
        """
        with self._lock:
            self._fail_rules.clear()
            self._latency = 0.0
            self._corrupt.clear()
            self._counters.clear()
            self._bindings.clear()
            self._token_ttl = self._initial_ttl
