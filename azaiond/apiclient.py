"""Client of the vendor's Resource API (SPEC section 5) on a ``requests.Session`` passed in.

- JWTs are decoded without verifying the signature (the server is trusted over TLS), but
  ``exp`` is honoured: a token is refreshed shortly before it expires.
- 401/403 on an authenticated call: log in again and retry once.
- 5xx and connection errors: ``retries`` more attempts with exponential backoff and jitter.
  4xx are final.
- One lock guards the token, so concurrent first calls log in once (the seeds' singleton race).

Neither the password nor the token ever appears in a log line or an exception message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
import requests

from azaiond import crypto
from azaiond.errors import (
    Forbidden,
    HardwareMismatch,
    NotAuthenticated,
    NotFound,
    UpstreamError,
)
from azaiond.tokencache import CachedToken, TokenCache

log = logging.getLogger(__name__)

REFRESH_MARGIN = 60.0  # seconds before exp at which a token counts as expired
MAX_SMALL_BODY = 16 * 1024 * 1024  # small parts, cdn.yaml and key fragments are far smaller
ROLE_CLAIMS = ("role", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role")


@dataclass(frozen=True)
class Credentials:
    email: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class User:
    email: str
    role: str

    def as_dict(self) -> dict[str, str]:
        return {"email": self.email, "role": self.role}


def _server_message(resp: requests.Response) -> tuple[object, str]:
    """ErrorCode and Message of an error body, or the status text when there is none."""
    try:
        body = resp.json()
    except ValueError:
        return None, resp.reason or f"HTTP {resp.status_code}"
    if isinstance(body, dict):
        code = body.get("ErrorCode", body.get("errorCode"))
        message = body.get("Message", body.get("message"))
        return code, str(message) if message is not None else f"HTTP {resp.status_code}"
    return None, f"HTTP {resp.status_code}"


def _read_capped(resp: requests.Response, limit: int = MAX_SMALL_BODY) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for chunk in resp.iter_content(64 * 1024):
        total += len(chunk)
        if total > limit:
            raise UpstreamError("the Resource API sent an oversized body", status=resp.status_code)
        chunks.append(chunk)
    return b"".join(chunks)


class ResourceApi:
    def __init__(
        self,
        session: requests.Session,
        url: str | None,
        hardware: str,
        *,
        token_cache: TokenCache | None = None,
        fallback_credentials: Callable[[], Credentials | None] = lambda: None,
        retries: int = 3,
        timeout: float = 30.0,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._url = url
        self.hardware = hardware
        self.hw_hash = crypto.hw_hash(hardware)
        self._cache = token_cache
        self._fallback = fallback_credentials
        self._retries = retries
        self._timeout = timeout
        self._backoff = backoff
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.RLock()
        self._credentials: Credentials | None = None
        self._token: CachedToken | None = token_cache.load() if token_cache else None
        self._verified = False  # the API accepted our credentials at least once

    # -- state ---------------------------------------------------------------------------

    def set_limits(self, *, retries: int, timeout: float, backoff: float) -> None:
        """New retry and timeout settings (a live reload); requests already running keep theirs."""
        self._retries, self._timeout, self._backoff = retries, timeout, backoff

    @property
    def token_expires_at(self) -> float | None:
        """The held token's expiry (Unix time), or None without one; for metrics and doctor."""
        token = self._token
        return token.exp if token else None

    @property
    def user(self) -> User | None:
        token = self._token
        return User(token.email, token.role) if token else None

    @property
    def authenticated(self) -> bool:
        with self._lock:
            if self._credentials is not None and self._verified:
                return True
            token = self._token
            return token is not None and token.exp > self._clock()

    def credentials(self) -> Credentials | None:
        """The credentials of the last ``login``, else those of the login credential file."""
        with self._lock:
            return self._credentials or self._fallback()

    def logout(self) -> None:
        with self._lock:
            self._credentials = None
            self._token = None
            self._verified = False
            if self._cache:
                self._cache.clear()

    # -- login ---------------------------------------------------------------------------

    def login(self, credentials: Credentials | None = None) -> User:
        """Log in with ``credentials`` (kept in memory on success) or the fallback ones."""
        with self._lock:
            creds = credentials or self.credentials()
            if creds is None:
                raise NotAuthenticated("no credentials: call login, or install the 'login' credential")
            resp = self._send("POST", "/login", json={"email": creds.email, "password": creds.password})
            if resp.status_code in (400, 401, 403, 404, 409):
                _, message = _server_message(resp)
                raise NotAuthenticated(f"the Resource API refused the login for {creds.email}: {message}")
            self._check(resp, "login")
            try:
                token = resp.json()["token"]
                claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
            except (ValueError, KeyError, TypeError, jwt.PyJWTError) as exc:
                raise UpstreamError("the Resource API sent an unreadable login token") from exc
            role = next((str(claims[c]) for c in ROLE_CLAIMS if c in claims), "User")
            exp = float(claims.get("exp", self._clock() + 3600))
            self._token = CachedToken(token=token, exp=exp, email=str(claims.get("email", creds.email)), role=role)
            self._credentials = creds
            self._verified = True
            if self._cache:
                self._cache.save(self._token)
            log.info("logged in as %s (role %s)", self._token.email, role)
            return User(self._token.email, role)

    def _bearer(self) -> str:
        """A token that is not about to expire, logging in when needed and possible."""
        with self._lock:
            token = self._token
            if token is None or token.exp - REFRESH_MARGIN <= self._clock():
                if self.credentials() is None:
                    if token is not None and token.exp > self._clock():
                        return token.token  # short-lived but still good; no way to refresh
                    raise NotAuthenticated("not logged in: call login, or install the 'login' credential")
                self.login()
                assert self._token is not None
                token = self._token
            return token.token

    # -- transport -----------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One logical request: retried on 5xx and connection errors, with backoff and jitter."""
        if not self._url:
            raise UpstreamError("api.url is not configured")
        url = self._url + path
        last: str = ""
        for attempt in range(self._retries + 1):
            if attempt:
                delay = self._backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5)  # noqa: S311
                log.warning("Resource API %s %s failed (%s); retry %d in %.2fs", method, path, last, attempt, delay)
                self._sleep(delay)
            try:
                resp = self._session.request(method, url, timeout=self._timeout, stream=True, **kwargs)
            except requests.RequestException as exc:
                last = type(exc).__name__
                continue
            if resp.status_code < 500:
                return resp
            last = f"HTTP {resp.status_code}"
            resp.close()
        raise UpstreamError(f"the Resource API failed after {self._retries + 1} attempts: {last}")

    def _authed(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A bearer request; on 401/403 log in again and retry once."""
        for attempt in (0, 1):
            headers = {"Authorization": f"Bearer {self._bearer()}"}
            resp = self._send(method, path, headers=headers, **kwargs)
            if resp.status_code not in (401, 403):
                return resp
            resp.close()
            if attempt == 0:
                with self._lock:
                    if self.credentials() is None:
                        self._token = None
                        raise NotAuthenticated("the Resource API refused the cached token; log in again")
                    self.login()
        if resp.status_code == 403:
            raise Forbidden(f"the Resource API refused {path} for this user's role")
        raise NotAuthenticated("the Resource API refused the credentials")

    def _check(self, resp: requests.Response, what: str) -> None:
        if resp.status_code < 300:
            return
        code, message = _server_message(resp)
        resp.close()
        if resp.status_code == 404:
            raise NotFound(f"{what}: not found on the Resource API")
        if resp.status_code == 409:
            raise UpstreamError(f"{what}: conflict: {message}", status=409, error_code=code)
        raise UpstreamError(f"{what}: HTTP {resp.status_code}: {message}", status=resp.status_code, error_code=code)

    # -- calls ---------------------------------------------------------------------------

    def get_resource(self, folder: str, filename: str) -> bytes:
        """``POST /resources/get/{folder}``, decrypted with this user's and machine's api_key."""
        creds = self.credentials()
        if creds is None:
            raise NotAuthenticated(
                f"fetching {filename} needs the password, which is held only after login: call login"
                " or install the 'login' credential"
            )
        body = {"fileName": filename, "password": creds.password, "hardware": self.hardware}
        resp = self._authed("POST", f"/resources/get/{folder}", json=body)
        what = f"{folder}/{filename}" if folder else filename
        if resp.status_code == 409:
            code, message = _server_message(resp)
            resp.close()
            raise HardwareMismatch(
                f"{what}: the Resource API says this machine is not the one {creds.email} is bound to: {message}",
                status=409,
                error_code=code,
            )
        self._check(resp, what)
        data = _read_capped(resp)
        key = crypto.aes_key(crypto.api_key(creds.email, creds.password, self.hw_hash))
        return crypto.decrypt_bytes(data, key)

    def upload(self, folder: str, filename: str, data: bytes) -> None:
        """``POST /resources/{folder}`` as multipart, field ``data``."""
        files = {"data": (filename, data, "application/octet-stream")}
        resp = self._authed("POST", f"/resources/{folder}", files=files)
        self._check(resp, f"upload of {folder}/{filename}")
        resp.close()

    def key_fragment(self) -> bytes:
        resp = self._authed("GET", "/binary-split/key-fragment")
        self._check(resp, "key fragment")
        return _read_capped(resp)

    def cdn_yaml(self) -> bytes:
        return self.get_resource("", "cdn.yaml")

