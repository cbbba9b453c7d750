"""The daemon's link to the vendor: the Resource API client plus the CDN it opens after login.

The CDN's keys come from ``cdn.yaml``, which is itself a resource fetched with the user's
credentials. It is fetched once, on first need, under a lock, so concurrent first calls build
one CDN client pair; logout forgets it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from azaiond.apiclient import Credentials, ResourceApi, User
from azaiond.cdn import Cdn, CdnSettings


class Account:
    def __init__(self, api: ResourceApi, make_cdn: Callable[[CdnSettings], Cdn]) -> None:
        self.api = api
        self._make_cdn = make_cdn
        self._cdn: Cdn | None = None
        self._lock = threading.Lock()

    def login(self, credentials: Credentials | None = None) -> User:
        user = self.api.login(credentials)
        with self._lock:
            self._cdn = None  # another user may have other CDN keys
        return user

    def logout(self) -> None:
        self.api.logout()
        with self._lock:
            self._cdn = None

    def forget_cdn(self) -> None:
        """Build the CDN clients anew on next use (new settings after a reload); calls in
        flight keep the clients they hold."""
        with self._lock:
            self._cdn = None

    def cdn(self) -> Cdn:
        with self._lock:
            if self._cdn is None:
                self._cdn = self._make_cdn(CdnSettings.from_yaml(self.api.cdn_yaml()))
            return self._cdn
