"""Builds every object the daemon needs from the config, in one place (tuned's layout).

The entry point (daemon.py) loads the config and calls ``build``; nothing else constructs
services, so the graph of who uses what is readable here top to bottom.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import boto3
import requests

from azaiond import credentials, hardware
from azaiond.account import Account
from azaiond.apiclient import ResourceApi
from azaiond.cdn import Cdn, CdnSettings
from azaiond.config import Config
from azaiond.errors import AzaionError
from azaiond.fsutil import private_dir, sweep_temp_files
from azaiond.handlers import Handlers
from azaiond.images import DockerImages
from azaiond.methods import method_table
from azaiond.metrics import Metrics, TextfileWriter, directory_bytes
from azaiond.reload import ReloadHooks, ReloadReport
from azaiond.resources import SplitResources
from azaiond.rpc.table import CallObserver, MethodTable
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


def observe_api(session: requests.Session, metrics: Metrics) -> None:
    """Feed the Resource API's request latency (to the response headers) into metrics."""

    def hook(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        metrics.api_latency(response.elapsed.total_seconds())

    session.hooks["response"].append(hook)


def observe_cdn(session: boto3.session.Session, metrics: Metrics) -> None:
    """Feed S3 request latency and the bytes of every GET into metrics, through botocore's
    events (the clients built from ``session`` inherit them)."""

    def before(context: dict[str, Any], **kwargs: Any) -> None:
        context["azaiond_start"] = time.perf_counter()

    def after(context: dict[str, Any], parsed: Mapping[str, Any], model: Any, **kwargs: Any) -> None:
        start = context.get("azaiond_start")
        if start is not None:
            metrics.cdn_latency(time.perf_counter() - start)
        if getattr(model, "name", "") == "GetObject" and isinstance(parsed.get("ContentLength"), int):
            metrics.add_bytes("cdn_fetched", parsed["ContentLength"])

    def failed(context: dict[str, Any], **kwargs: Any) -> None:
        start = context.get("azaiond_start")
        if start is not None:
            metrics.cdn_latency(time.perf_counter() - start)

    session.events.register("before-call.s3", before)
    session.events.register("after-call.s3", after)
    session.events.register("after-call-error.s3", failed)


class CdnFactory:
    """Builds the CDN clients on first use, from the config of that moment (reload changes it)."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self._metrics = metrics

    def __call__(self, settings: CdnSettings) -> Cdn:
        cdn = self.config.cdn
        return Cdn(
            settings,
            endpoint=cdn.endpoint,
            retries=cdn.retries,
            multipart_chunk_mb=cdn.multipart_chunk_mb,
            allow_insecure_http=self.config.allow_insecure_http,
            session=self._session(),
        )

    def _session(self) -> boto3.session.Session:
        session = boto3.session.Session()
        if self._metrics is not None:
            observe_cdn(session, self._metrics)
        return session


@dataclass
class Daemon:
    config: Config
    table: MethodTable
    account: Account
    resources: SplitResources
    unlock: UnlockJob
    session: requests.Session
    status: StatusLine = field(default_factory=lambda: StatusLine(None))
    # Services register here the config keys they can take live (SIGHUP).
    reload_hooks: ReloadHooks = field(default_factory=ReloadHooks)
    metrics: Metrics = field(default_factory=Metrics)
    textfile: TextfileWriter | None = None
    # Told about every finished call by the dispatcher.
    observers: tuple[CallObserver, ...] = ()

    def reload(self, new: Config) -> ReloadReport:
        """Apply what can change live from ``new``; the report names what needs a restart."""
        report = self.reload_hooks.apply(self.config, new)
        self.config = new
        return report

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
            log.warning("login with the 'login' credential failed: %s", exc.message,
                        extra={"fields": {"event": "login_failed", "kind": exc.kind}})

    def close(self) -> None:
        """Stop background work and release clients; called once on shutdown."""
        if self.textfile is not None:
            self.textfile.stop()
        self.unlock.close()
        self.session.close()


def build(config: Config, status_line: Callable[[str], None] | None = None) -> Daemon:
    private_dir(config.state_dir)
    private_dir(config.cache_dir)
    sweep_temp_files(config.state_dir)  # leftovers of a crash are never trusted
    metrics = Metrics()
    session = requests.Session()
    session.headers["User-Agent"] = "azaiond"
    observe_api(session, metrics)
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

    hooks = ReloadHooks()
    make_cdn = CdnFactory(config, metrics)
    account = Account(api, make_cdn)

    def new_api_limits(new: Config) -> None:
        api.set_limits(retries=new.api.retries, timeout=new.api.timeout, backoff=new.api.backoff)

    def new_cdn_settings(new: Config) -> None:
        make_cdn.config = new
        account.forget_cdn()

    hooks.register("the Resource API client", ("api.retries", "api.timeout", "api.backoff"), new_api_limits)
    hooks.register("the CDN client", ("cdn.retries", "cdn.multipart_chunk_mb"), new_cdn_settings)
    resources = SplitResources(
        api,
        account.cdn,
        config.cache_dir,
        lambda: credentials.resource_key(config.resources.key),
        small_part_kb=config.resources.small_part_kb,
    )
    report = StatusLine(status_line)
    images = DockerImages(config.docker.base_url, config.docker.timeout)
    unlock = UnlockJob(config, account, images, status_line=report, on_finish=metrics.unlock_finished)
    handlers = Handlers(config, account, resources, unlock, metrics=metrics)

    def token_seconds_left() -> float | None:
        expires = api.token_expires_at
        return None if expires is None else round(expires - time.time(), 3)

    metrics.gauge("cache_bytes", "Bytes in the big-part cache.", lambda: directory_bytes(config.cache_dir))
    metrics.gauge("token_expiry_seconds", "Seconds until the held token expires (negative: expired).",
                  token_seconds_left)
    textfile = TextfileWriter(metrics)
    textfile.configure(config.metrics.textfile, config.metrics.textfile_interval)
    hooks.register("the metrics textfile", ("metrics",),
                   lambda new: textfile.configure(new.metrics.textfile, new.metrics.textfile_interval))

    return Daemon(
        config=config,
        table=method_table(handlers),
        account=account,
        resources=resources,
        unlock=unlock,
        session=session,
        status=report,
        reload_hooks=hooks,
        metrics=metrics,
        textfile=textfile,
        observers=(metrics.observe_call,),
    )
