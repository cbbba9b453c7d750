"""Which URLs the daemon may talk to: well formed, and https unless the host is this machine.

The Resource API sees the user's password and hands out the JWT; the CDN sees the access
keys. Over plain http either would cross the network in clear, so ``http://`` is accepted
only for a loopback host (a dev stack, a local proxy) or when the operator said
``allow_insecure_http: true``, which the daemon then warns about on every start.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class UrlProblem(ValueError):
    """Why a URL is refused; the text names no secret (user info is never echoed)."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or the name localhost."""
    name = host.strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_url(value: str, *, allow_insecure_http: bool = False) -> str:
    """``value`` without a trailing slash, or UrlProblem saying what is wrong with it."""
    try:
        parts = urllib.parse.urlsplit(value)
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise UrlProblem("not a valid URL") from exc
    if parts.scheme not in ("http", "https"):
        raise UrlProblem("must start with https://")
    if not parts.hostname:
        raise UrlProblem("has no host")
    if parts.username is not None or parts.password is not None:
        raise UrlProblem("must not carry a user name or password")
    if parts.query or parts.fragment:
        raise UrlProblem("must not carry a query or fragment")
    if any(c.isspace() for c in value):
        raise UrlProblem("must not contain white space")
    if parts.scheme == "http" and not is_loopback(parts.hostname) and not allow_insecure_http:
        raise UrlProblem(
            "plain http:// sends credentials in clear: use https://"
            " (http:// is accepted only for a loopback host or with allow_insecure_http: true)"
        )
    del port
    return value.rstrip("/")

