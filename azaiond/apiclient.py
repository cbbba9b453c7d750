"""Client of the vendor's Resource API (docs/formats.md, Resource API) on a ``requests.Session`` passed in.

- JWTs are decoded without verifying the signature (the server is trusted over TLS), but
  ``exp`` is honoured: a token is refreshed shortly before it expires.
- 401/403 on an authenticated call: log in again and retry once.
- 5xx and connection errors: ``retries`` more attempts with exponential backoff and jitter.
  4xx are final.
- One lock guards the token, so concurrent first calls log in once (the seeds' singleton race).
  That lock is held across network I/O, so nothing on the event loop ever takes it: ``authenticated``
  and ``user`` read an immutable snapshot that is replaced after each change.
- Every logical call (a login, a resource fetch with its retries and its body) has a wall-clock
  deadline (``api.deadline``), enforced on the socket by ``azaiond.transport``: a hung or
  1 byte/s API ends in ``upstream`` within it. A body cut short is ``upstream`` too.
- Login backoff: once the API refuses the stored credentials (those of an earlier ``login`` or
  of the login credential), no implicit login is tried for a growing interval; calls answer
  ``not_authenticated`` at once meanwhile. An explicit ``login`` resets it. So a burst of loads
  can never hammer the vendor's login and lock the account.

Neither the password nor the token ever appears in a log line or an exception message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import jwt
import requests

from azaiond import crypto
from azaiond.errors import (
    Forbidden,
    HardwareMismatch,
    NotAuthenticated,
    NotFound,
    StorageError,
    UpstreamError,
)
from azaiond.tokencache import CachedToken, TokenCache
from azaiond.transport import Deadline, current_deadline, deadline_scope

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


class StreamBody(Protocol):
    """A request body read in pieces, with its length known up front."""

    filename: str
    content_type: str

    def __len__(self) -> int: ...

    def read(self, size: int = -1, /) -> bytes: ...

    def rewind(self) -> bool: ...


def _server_message(resp: requests.Response) -> tuple[object, str]:
    """ErrorCode and Message of an error body, or the status text when there is none."""
    try:
        body = resp.json()
    except (ValueError, requests.RequestException):  # not JSON, or a body cut short
        return None, resp.reason or f"HTTP {resp.status_code}"
    if isinstance(body, dict):
        code = body.get("ErrorCode", body.get("errorCode"))
        message = body.get("Message", body.get("message"))
        return code, str(message) if message is not None else f"HTTP {resp.status_code}"
    return None, f"HTTP {resp.status_code}"


def _read_capped(resp: requests.Response, limit: int = MAX_SMALL_BODY) -> bytes:
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in resp.iter_content(64 * 1024):
            total += len(chunk)
            if total > limit:
                raise UpstreamError("the Resource API sent an oversized body", status=resp.status_code)
            chunks.append(chunk)
    except requests.RequestException as exc:
        deadline = current_deadline()
        if deadline is not None and deadline.expired():
            raise UpstreamError("the Resource API did not send the whole body before the deadline") from exc
        raise UpstreamError(f"the Resource API broke off the body ({type(exc).__name__})") from exc
    finally:
        resp.close()
    return b"".join(chunks)


@dataclass(frozen=True)
class _Snapshot:
    """What the event loop may read without a lock: replaced whole, never changed in place."""

    token: CachedToken | None = None
    verified: bool = False  # the API accepted the credentials held in memory


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
        deadline: float = 60.0,
        login_backoff: float = 10.0,
        login_backoff_max: float = 900.0,
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
        self._deadline = deadline
        self._login_backoff = login_backoff
        self._login_backoff_max = login_backoff_max
        self._refused_until = 0.0  # monotonic; implicit logins wait until then
        self._refusals = 0
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.RLock()
        self._credentials: Credentials | None = None
        self._token: CachedToken | None = token_cache.load() if token_cache else None
        self._verified = False  # the API accepted our credentials at least once
        self._snap = _Snapshot(self._token)

    # -- state (lock-free: the event loop reads these) -----------------------------------

    def _publish(self) -> None:
        """Replace the snapshot; called with the lock held, after every change of state."""
        self._snap = _Snapshot(self._token, self._credentials is not None and self._verified)

    def set_limits(
        self, *, retries: int, timeout: float, backoff: float, deadline: float,
        login_backoff: float, login_backoff_max: float,
    ) -> None:
        """New retry, timeout and backoff settings (a live reload); requests already running
        keep theirs. Plain attribute stores: each is read once per attempt."""
        self._retries, self._timeout, self._backoff, self._deadline = retries, timeout, backoff, deadline
        self._login_backoff, self._login_backoff_max = login_backoff, login_backoff_max

    @property
    def token_expires_at(self) -> float | None:
        """The held token's expiry (Unix time), or None without one; for metrics and doctor.

        Read from the snapshot: never waits for a login in progress."""
        token = self._snap.token
        return token.exp if token else None

    @property
    def user(self) -> User | None:
        token = self._snap.token
        return User(token.email, token.role) if token else None

    @property
    def authenticated(self) -> bool:
        snap = self._snap
        if snap.verified:
            return True
        return snap.token is not None and snap.token.exp > self._clock()

    def login_backoff_left(self) -> float:
        """Seconds until an implicit login may be tried again (0 when it may now)."""
        return max(0.0, self._refused_until - time.monotonic())

    def credentials(self) -> Credentials | None:
        """The credentials of the last ``login``, else those of the login credential file."""
        with self._lock:
            return self._credentials or self._fallback()

    def logout(self) -> None:
        with self._lock:
            self._credentials = None
            self._token = None
            self._verified = False
            self._publish()
            self._refused_until, self._refusals = 0.0, 0
            if self._cache:
                self._cache.clear()

    # -- login ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _call(self) -> Iterator[Deadline]:
        """The deadline of one logical call; a nested call (a login inside a fetch) keeps the outer one."""
        outer = current_deadline()
        if outer is not None:
            yield outer
            return
        with deadline_scope(Deadline.after(self._deadline)) as deadline:
            yield deadline

    def _refuse_implicit(self) -> None:
        """Start or grow the backoff after the stored credentials were refused."""
        interval = min(self._login_backoff_max, self._login_backoff * (2 ** min(self._refusals, 30)))
        self._refusals += 1
        self._refused_until = time.monotonic() + interval
        log.warning("the Resource API refused the stored login; no new login for %.0fs (an admin's login call"
                    " retries at once)", interval)

    def login(self, credentials: Credentials | None = None) -> User:
        """Log in with ``credentials`` (kept in memory on success) or the stored ones.

        A login with stored credentials (``credentials`` None) is refused at once while the
        backoff after a refusal runs; an explicit login resets the backoff.
        """
        implicit = credentials is None
        if implicit and self.login_backoff_left() > 0:  # checked before the lock: answer at once
            raise NotAuthenticated(
                f"the Resource API refused the stored login; retrying in {self.login_backoff_left():.0f}s"
                " (or call login)"
            )
        with self._lock, self._call():
            if implicit and self.login_backoff_left() > 0:
                raise NotAuthenticated("the Resource API refused the stored login; call login")
            if not implicit:
                self._refused_until, self._refusals = 0.0, 0
            creds = credentials or self.credentials()
            if creds is None:
                raise NotAuthenticated("no credentials: call login, or install the 'login' credential")
            resp = self._send("POST", "/login", json={"email": creds.email, "password": creds.password})
            if resp.status_code in (400, 401, 403, 404, 409):
                _, message = _server_message(resp)
                resp.close()
                if implicit:
                    self._refuse_implicit()
                # Never the email: members see this error when their load triggers a login.
                message = message.replace(creds.email, "<email>")
                raise NotAuthenticated(f"the Resource API refused the login: {message}")
            self._check(resp, "login")
            try:
                token = _read_capped(resp)
                token_text = json.loads(token)["token"]
                claims = jwt.decode(token_text, options={"verify_signature": False, "verify_exp": False})
            except (ValueError, KeyError, TypeError, jwt.PyJWTError) as exc:
                raise UpstreamError("the Resource API sent an unreadable login token") from exc
            role = next((str(claims[c]) for c in ROLE_CLAIMS if c in claims), "User")
            exp = float(claims.get("exp", self._clock() + 3600))
            email = str(claims.get("email", creds.email))
            self._token = CachedToken(token=token_text, exp=exp, email=email, role=role)
            self._credentials = creds
            self._verified = True
            self._refused_until, self._refusals = 0.0, 0
            self._publish()
            if self._cache:
                self._cache.save(self._token)
            log.info("logged in as %s (role %s)", email, role)
            return User(email, role)

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

    def _send(
        self, method: str, path: str, rewind: Callable[[], bool] | None = None, **kwargs: Any
    ) -> requests.Response:
        """One logical request: retried on 5xx and connection errors, with backoff and jitter,
        all within the call's deadline. A streamed body is sent again only if ``rewind()`` puts
        it back at its start."""
        if not self._url:
            raise UpstreamError("api.url is not configured")
        url = self._url + path
        last: str = ""
        with self._call() as deadline:
            for attempt in range(self._retries + 1):
                if attempt and rewind is not None and not rewind():
                    raise UpstreamError(
                        f"the Resource API failed ({last}) and the streamed input cannot be sent again"
                    )
                if attempt:
                    delay = self._backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5)  # noqa: S311
                    if delay >= deadline.remaining():
                        break
                    log.warning("Resource API %s %s failed (%s); retry %d in %.2fs",
                                method, path, last, attempt, delay)
                    self._sleep(delay)
                if deadline.expired():
                    break
                timeout = deadline.timeout(self._timeout)
                try:
                    resp = self._session.request(method, url, timeout=timeout, stream=True, **kwargs)
                except requests.RequestException as exc:
                    last = type(exc).__name__
                    continue
                if resp.status_code < 500:
                    return resp
                last = f"HTTP {resp.status_code}"
                resp.close()
            if deadline.expired() or attempt < self._retries:
                raise UpstreamError(
                    f"the Resource API did not answer {method} {path} within the deadline"
                    f" ({self._deadline:g}s){': ' + last if last else ''}"
                )
        raise UpstreamError(f"the Resource API failed after {self._retries + 1} attempts: {last}")

    def _authed(
        self, method: str, path: str, rewind: Callable[[], bool] | None = None, **kwargs: Any
    ) -> requests.Response:
        """A bearer request; on 401/403 log in again and retry once."""
        extra_headers = kwargs.pop("headers", {})
        for attempt in (0, 1):
            if attempt and rewind is not None and not rewind():
                raise NotAuthenticated("the Resource API refused the token, and the streamed input cannot be resent")
            headers = {**extra_headers, "Authorization": f"Bearer {self._bearer()}"}
            resp = self._send(method, path, rewind, headers=headers, **kwargs)
            if resp.status_code not in (401, 403):
                return resp
            resp.close()
            if attempt == 0:
                with self._lock:
                    if self.credentials() is None:
                        self._token = None
                        self._publish()
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
        with self._call():
            resp, key = self._open_resource(folder, filename)
            return crypto.decrypt_bytes(_read_capped(resp), key)

    def fetch_resource(self, folder: str, filename: str, sink: IO[bytes], limit: int) -> bytes:
        """Stream the still encrypted body of ``POST /resources/get/{folder}`` into ``sink``.

        At most ``limit`` bytes are taken (else ``UpstreamError``). Returns the AES key that
        decrypts it (this user's and machine's api_key).
        """
        with self._call():
            resp, key = self._open_resource(folder, filename)
            try:
                total = 0
                for chunk in resp.iter_content(1024 * 1024):
                    total += len(chunk)
                    if total > limit:
                        raise UpstreamError(
                            f"{folder}/{filename} on the Resource API is over resources.api_max_mb",
                            status=resp.status_code,
                        )
                    try:
                        sink.write(chunk)
                    except OSError as exc:
                        raise StorageError(
                            f"cannot spool {folder}/{filename} in the state dir: {exc.strerror}"
                        ) from exc
            except requests.RequestException as exc:
                raise UpstreamError(f"the Resource API broke off {folder}/{filename} ({type(exc).__name__})") from exc
            finally:
                resp.close()
            return key

    def _open_resource(self, folder: str, filename: str) -> tuple[requests.Response, bytes]:
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
                f"{what}: the Resource API says this machine is not the one the account is bound to: "
                f"{message.replace(creds.email, '<email>')}",
                status=409,
                error_code=code,
            )
        self._check(resp, what)
        return resp, crypto.aes_key(crypto.api_key(creds.email, creds.password, self.hw_hash))

    def upload(self, folder: str, filename: str, data: bytes) -> None:
        """``POST /resources/{folder}`` as multipart, field ``data``."""
        files = {"data": (filename, data, "application/octet-stream")}
        with self._call():
            resp = self._authed("POST", f"/resources/{folder}", files=files)
            self._check(resp, f"upload of {folder}/{filename}")
            resp.close()

    def upload_stream(self, folder: str, body: StreamBody) -> None:
        """``POST /resources/{folder}`` with a multipart body that streams (see apifiles)."""
        headers = {"Content-Type": body.content_type}
        with self._call():
            resp = self._authed("POST", f"/resources/{folder}", body.rewind, data=body, headers=headers)
            self._check(resp, f"upload of {folder}/{body.filename}")
            resp.close()

    def key_fragment(self) -> bytes:
        with self._call():
            resp = self._authed("GET", "/binary-split/key-fragment")
            self._check(resp, "key fragment")
            return _read_capped(resp)

    def cdn_yaml(self) -> bytes:
        return self.get_resource("", "cdn.yaml")

