"""The daemon's link to the vendor: the Resource API client plus the CDN it opens after login.

The CDN's keys come from ``cdn.yaml``, which is itself a resource fetched with the user's
credentials. It is fetched once, on first need, under a lock, so concurrent first calls build
one CDN client pair; logout forgets it.

Multipart uploads a killed run left open on the CDN (see ``uploadjournal``) need the CDN's
write keys to be aborted, so the cleanup runs in the background after each successful login.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from azaiond.apiclient import Credentials, ResourceApi, User
from azaiond.cdn import Cdn, CdnSettings
from azaiond.errors import AzaionError
from azaiond.uploadjournal import UploadJournal

log = logging.getLogger(__name__)


class Account:
    def __init__(
        self, api: ResourceApi, make_cdn: Callable[[CdnSettings], Cdn], journal: UploadJournal | None = None
    ) -> None:
        self.api = api
        self._make_cdn = make_cdn
        self._cdn: Cdn | None = None
        self._lock = threading.Lock()
        # Called after every successful login (e.g. to start the background prefetch).
        self.on_login: list[Callable[[User], None]] = []
        self._journal = journal
        self._cleanup_lock = threading.Lock()

    def login(self, credentials: Credentials | None = None) -> User:
        user = self.api.login(credentials)
        log.info("logged in to the Resource API (role %s)", user.role, extra={"fields": {"event": "login"}})
        with self._lock:
            self._cdn = None  # another user may have other CDN keys
        for listener in self.on_login:
            listener(user)
        self.abort_orphans_later()
        return user

    def logout(self) -> None:
        self.api.logout()
        self.forget_cdn()

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

    # -- orphan multipart uploads ----------------------------------------------------------

    def abort_orphans_later(self) -> None:
        """Abort the uploads a killed run left open, on a thread of its own, if there are any."""
        if self._journal is None or not self._journal.pending():
            return
        threading.Thread(target=self.abort_orphans, name="orphan-uploads", daemon=True).start()

    def abort_orphans(self) -> int:
        if self._journal is None:
            return 0
        with self._cleanup_lock:  # one cleanup at a time; a second finds nothing left
            if not self._journal.pending():
                return 0
            try:
                return self._journal.abort_pending(self.cdn().writer)
            except AzaionError as exc:
                log.warning("cannot abort the uploads a previous run left open yet: %s", exc.message)
                return 0
