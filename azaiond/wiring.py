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

from azaiond import credentials, hardware
from azaiond.account import Account
from azaiond.apiclient import ResourceApi
from azaiond.apifiles import ApiFiles
from azaiond.cache import BigPartCache
from azaiond.cdn import Cdn, CdnSettings
from azaiond.config import Config
from azaiond.errors import AzaionError
from azaiond.fsutil import private_dir, sweep_temp_files
from azaiond.handlers import Handlers
from azaiond.images import DockerImages
from azaiond.methods import method_table
from azaiond.prefetch import Prefetcher
from azaiond.resources import SplitResources
from azaiond.rpc.table import MethodTable
from azaiond.tokencache import TokenCache
from azaiond.unlock import UnlockJob

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
    prefetcher: Prefetcher | None = None
    status: StatusLine = field(default_factory=lambda: StatusLine(None))

    def status_line(self) -> str:
        return self.status.text

    def start(self) -> None:
        """Background work once calls are served: log in with the 'login' credential, if any.

        So that status tells at once whether the installed credential works, and the first
        load does not pay for the login. A failure is logged (never with a secret) and the
        next call that needs the API tries again.
        """
        if self.account.api.authenticated or credentials.login_credentials() is None:
            return
        threading.Thread(target=self._warm_login, name="login", daemon=True).start()

    def _warm_login(self) -> None:
        try:
            self.account.login()
        except AzaionError as exc:
            log.warning("login with the 'login' credential failed: %s", exc.message)

    def close(self) -> None:
        """Stop background work and release clients; called once on shutdown."""
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.unlock.close()
        self.session.close()


def build(config: Config, status_line: Callable[[str], None] | None = None) -> Daemon:
    private_dir(config.state_dir)
    private_dir(config.cache_dir)
    sweep_temp_files(config.state_dir)  # leftovers of a crash are never trusted
    session = requests.Session()
    session.headers["User-Agent"] = "azaiond"
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
    )

    def make_cdn(settings: CdnSettings) -> Cdn:
        return Cdn(
            settings,
            endpoint=config.cdn.endpoint,
            retries=config.cdn.retries,
            multipart_chunk_mb=config.cdn.multipart_chunk_mb,
        )

    account = Account(api, make_cdn)
    cache = BigPartCache(config.cache_dir, config.resources.cache_max_bytes)
    resources = SplitResources(
        api,
        account.cdn,
        cache,
        lambda: credentials.resource_key(config.resources.key),
        small_part_kb=config.resources.small_part_kb,
    )
    report = StatusLine(status_line)
    images = DockerImages(config.docker.base_url, config.docker.timeout)
    unlock = UnlockJob(config, account, images, status_line=report)
    prefetcher = Prefetcher(resources, config.resources.prefetch)
    account.on_login.append(prefetcher.kick)
    api_files = ApiFiles(api, config.state_dir, config.resources.api_max_bytes)
    handlers = Handlers(config, account, resources, unlock, api_files)
    return Daemon(
        config=config,
        table=method_table(handlers),
        account=account,
        resources=resources,
        unlock=unlock,
        session=session,
        status=report,
        prefetcher=prefetcher,
    )
