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
        # Called after every successful login (e.g. to start the background prefetch).
        self.on_login: list[Callable[[User], None]] = []

    def login(self, credentials: Credentials | None = None) -> User:
        user = self.api.login(credentials)
        with self._lock:
            self._cdn = None  # another user may have other CDN keys
        for listener in self.on_login:
            listener(user)
        return user

    def logout(self) -> None:
        self.api.logout()
        with self._lock:
            self._cdn = None

    def cdn(self) -> Cdn:
        with self._lock:
            if self._cdn is None:
                self._cdn = self._make_cdn(CdnSettings.from_yaml(self.api.cdn_yaml()))
            return self._cdn
