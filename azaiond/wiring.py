"""Builds every object the daemon needs from the config, in one place (tuned's layout).

The entry point (daemon.py) loads the config and calls ``build``; nothing else constructs
services, so the graph of who uses what is readable here top to bottom.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

from azaiond import credentials, hardware, transport
from azaiond.account import Account
from azaiond.apiclient import ResourceApi
from azaiond.cdn import Cdn, CdnSettings
from azaiond.config import Config
from azaiond.errors import AzaionError, StorageError
from azaiond.fsutil import private_dir, sweep_temp_files
from azaiond.handlers import Handlers
from azaiond.images import DockerImages
from azaiond.methods import method_table
from azaiond.resources import SplitResources
from azaiond.rpc.table import MethodTable
from azaiond.tokencache import TokenCache
from azaiond.unlock import UnlockJob
from azaiond.uploadjournal import UploadJournal

log = logging.getLogger(__name__)


class StatusLine:
    """What the daemon is doing, in one line: kept for status_line() and passed on to systemd."""

    def __init__(self, forward: Callable[[str], None] | None) -> None:
        self.text = "serving"
        self._forward = forward

    def __call__(self, text: str) -> None:
        self.text = text
        if self._forward is not None:
            self._forward(text)


@dataclass
class Daemon:
    config: Config
    table: MethodTable
    account: Account
    resources: SplitResources
    unlock: UnlockJob
    session: requests.Session
    status: StatusLine = field(default_factory=lambda: StatusLine(None))

    def status_line(self) -> str:
        return self.status.text

    def start(self) -> None:
        """Background work once calls are served: log in with the 'login' credential, if any.

        So that status tells at once whether the installed credential works, and the first
        load does not pay for the login. A failure is logged (never with a secret) and the
        next call that needs the API tries again.
        """
        if credentials.login_credentials() is None:
            return
        if self.account.api.authenticated:
            self.account.abort_orphans_later()  # a cached token: the credential still opens the CDN
            return
        threading.Thread(target=self._warm_login, name="login", daemon=True).start()

    def _warm_login(self) -> None:
        try:
            self.account.login()  # aborts orphan uploads afterwards, if any
        except AzaionError as exc:
            log.warning("login with the 'login' credential failed: %s", exc.message)

    def close(self) -> None:
        """Stop background work and release clients; called once on shutdown."""
        self.unlock.close()
        self.session.close()


def build(config: Config, status_line: Callable[[str], None] | None = None) -> Daemon:
    try:
        private_dir(config.state_dir)
        private_dir(config.cache_dir)
    except StorageError as exc:
        # Serve anyway: health, status and loads of API-only data work, and each call that
        # needs the disk answers storage with the path.
        log.warning("the state dir is not usable: %s", exc.message)
    sweep_temp_files(config.state_dir)  # leftovers of a crash are never trusted
    session = transport.api_session("azaiond")
    machine = hardware.describe() if config.hardware == "auto" else config.hardware
    api = ResourceApi(
        session,
        config.api.url,
        machine,
        token_cache=TokenCache(config.token_path),
        fallback_credentials=credentials.login_credentials,
        retries=config.api.retries,
        timeout=config.api.timeout,
        backoff=config.api.backoff,
        deadline=config.api.deadline,
        login_backoff=config.api.login_backoff,
        login_backoff_max=config.api.login_backoff_max,
    )
    journal = UploadJournal(config.state_dir / "uploads")

    def make_cdn(settings: CdnSettings) -> Cdn:
        return Cdn(
            settings,
            endpoint=config.cdn.endpoint,
            retries=config.cdn.retries,
            multipart_chunk_mb=config.cdn.multipart_chunk_mb,
            timeout=config.cdn.timeout,
            deadline=config.cdn.deadline,
            on_writer=journal.attach,
        )

    account = Account(api, make_cdn, journal)
    resources = SplitResources(
        api,
        account.cdn,
        config.cache_dir,
        lambda: credentials.resource_key(config.resources.key),
        small_part_kb=config.resources.small_part_kb,
    )
    report = StatusLine(status_line)
    images = DockerImages(config.docker.base_url, config.docker.timeout)
    unlock = UnlockJob(config, account, images, status_line=report)
    handlers = Handlers(config, account, resources, unlock)
    return Daemon(
        config=config,
        table=method_table(handlers),
        account=account,
        resources=resources,
        unlock=unlock,
        session=session,
        status=report,
    )
