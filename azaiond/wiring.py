"""Builds every object the daemon needs from the config, in one place (tuned's layout).

The entry point (daemon.py) loads the config, calls ``build`` and runs what it gets; nothing
else constructs services or the RPC side, so the graph of who uses what is readable here top to
bottom. Tests and benchmarks build through the same functions: ``Overrides`` names the few parts
they may supply instead (an HTTP or boto session to watch, credentials, a clock), and
``build_services`` / ``build_rpc`` build one side without the other.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import boto3
import requests

from azaiond import credentials, hardware, logs, partial, transport
from azaiond.account import Account
from azaiond.apiclient import Credentials, ResourceApi
from azaiond.apifiles import ApiFiles
from azaiond.cache import BigPartCache
from azaiond.cdn import Cdn, CdnSettings
from azaiond.config import Config, SocketConfig
from azaiond.errors import AzaionError, StorageError
from azaiond.fetch import Fetcher
from azaiond.fsutil import private_dir, sweep_temp_files
from azaiond.generations import Generations
from azaiond.handlers import Handlers
from azaiond.images import DockerImages
from azaiond.methods import method_table
from azaiond.metrics import Metrics, TextfileWriter
from azaiond.notify import Notifier
from azaiond.prefetch import Prefetcher
from azaiond.reload import ReloadHooks, ReloadReport
from azaiond.resources import SplitResources
from azaiond.rpc.calllog import CallLog
from azaiond.rpc.dispatch import Dispatcher, Limits
from azaiond.rpc.limits import ConnectionLimits
from azaiond.rpc.listen import Listener, open_listener
from azaiond.rpc.server import Server
from azaiond.rpc.table import CallObserver, MethodTable
from azaiond.tokencache import TokenCache
from azaiond.unlock import UnlockJob
from azaiond.uploadjournal import UploadJournal

log = logging.getLogger(__name__)

WORKERS = 32  # threads for blocking handlers: loads, uploads, unlock, logins


@dataclass(frozen=True)
class Overrides:
    """Parts a test or benchmark supplies instead of the daemon's own; None means the daemon's."""

    session: requests.Session | None = None  # HTTP to the Resource API
    boto_session: boto3.session.Session | None = None  # the CDN clients' session
    login_credentials: Callable[[], Credentials | None] | None = None  # else the 'login' credential
    resource_key: Callable[[], str | None] | None = None  # else the credential or resources.key
    clock: Callable[[], float] | None = None  # wall clock for token expiry
    environ: MutableMapping[str, str] | None = None  # NOTIFY_SOCKET, LISTEN_FDS, ...


def observe_api(session: requests.Session, metrics: Metrics) -> None:
    """Feed the Resource API's request latency (to the response headers) into metrics."""

    def hook(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        metrics.api_latency(response.elapsed.total_seconds())

    session.hooks["response"].append(hook)


def observe_cdn(session: boto3.session.Session, metrics: Metrics) -> None:
    """Feed S3 request latency and the bytes of every GET into metrics, through botocore's
    public events (the clients built from ``session`` inherit them)."""

    def before(context: dict[str, Any], **kwargs: Any) -> None:
        context["azaiond_start"] = time.perf_counter()

    def failed(context: dict[str, Any], **kwargs: Any) -> None:
        start = context.get("azaiond_start")
        if start is not None:
            metrics.cdn_latency(time.perf_counter() - start)

    def after(context: dict[str, Any], parsed: Mapping[str, Any], model: Any, **kwargs: Any) -> None:
        failed(context)  # the latency, as for a failed request
        if getattr(model, "name", "") == "GetObject" and isinstance(parsed.get("ContentLength"), int):
            metrics.add_bytes("cdn_fetched", parsed["ContentLength"])

    session.events.register("before-call.s3", before)
    session.events.register("after-call.s3", after)
    session.events.register("after-call-error.s3", failed)


class CdnFactory:
    """Builds the CDN clients on first use, from the config of that moment (a reload changes it)."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        journal: UploadJournal,
        session: boto3.session.Session | None = None,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._journal = journal
        self._session = session
        if session is not None:
            observe_cdn(session, metrics)  # once: every client built from it reports

    def __call__(self, settings: CdnSettings) -> Cdn:
        session = self._session
        if session is None:
            session = boto3.session.Session()
            observe_cdn(session, self._metrics)
        cdn = self.config.cdn
        return Cdn(
            settings,
            endpoint=cdn.endpoint,
            retries=cdn.retries,
            multipart_chunk_mb=cdn.multipart_chunk_mb,
            session=session,
            timeout=cdn.timeout,
            deadline=cdn.deadline,
            on_writer=self._journal.attach,
            allow_insecure_http=self.config.allow_insecure_http,
        )


@dataclass
class Services:
    """Everything behind the method table; knows nothing of sockets."""

    config: Config
    account: Account
    resources: SplitResources
    unlock: UnlockJob
    images: DockerImages
    handlers: Handlers
    table: MethodTable
    session: requests.Session
    login_credentials: Callable[[], Credentials | None]
    prefetcher: Prefetcher | None = None
    metrics: Metrics = field(default_factory=Metrics)
    textfile: TextfileWriter | None = None
    # Services register here the config keys they can take live (SIGHUP).
    reload_hooks: ReloadHooks = field(default_factory=ReloadHooks)

    def start(self) -> None:
        """Background work once calls are served: log in with the 'login' credential, if any.

        So that status tells at once whether the installed credential works, and the first
        load does not pay for the login. A failure is logged (never with a secret) and the
        next call that needs the API tries again.
        """
        if self.login_credentials() is None:
            return
        if self.account.api.authenticated:
            self.account.abort_orphans_later()  # a cached token: the credential still opens the CDN
            return
        threading.Thread(target=self._warm_login, name="login", daemon=True).start()

    def _warm_login(self) -> None:
        try:
            self.account.login()  # aborts orphan uploads afterwards, if any
        except AzaionError as exc:
            log.warning("login with the 'login' credential failed: %s", exc.message,
                        extra={"fields": {"event": "login_failed", "kind": exc.kind}})

    def close(self) -> None:
        """Stop background work and release clients; called once on shutdown."""
        if self.textfile is not None:
            self.textfile.stop()
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.unlock.close()
        self.resources.close()  # downloads checkpoint their partial files, to resume after a restart
        self.session.close()


@dataclass
class Rpc:
    """The RPC side: the dispatcher and the socket server in front of it."""

    dispatcher: Dispatcher
    server: Server

    def close(self) -> None:
        self.dispatcher.close()


@dataclass
class Daemon:
    """What daemon.py runs: the listening socket, systemd notification, services, RPC."""

    config: Config
    notifier: Notifier
    listener: Listener
    services: Services
    rpc: Rpc
    _closed: bool = field(default=False, repr=False)

    def reload(self, new: Config) -> ReloadReport:
        """Apply what can change live from ``new``; the report names what needs a restart."""
        report = self.services.reload_hooks.apply(self.config, new)
        self.config = self.services.config = new
        return report

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.rpc.close()
        self.listener.close()
        self.services.close()


def build_services(
    config: Config,
    overrides: Overrides = Overrides(),
    status_line: Callable[[str], None] | None = None,
) -> Services:
    try:
        private_dir(config.state_dir)
        private_dir(config.cache_dir)
    except StorageError as exc:
        # Serve anyway: health, status and loads of API-only data work, and each call that
        # needs the disk answers storage with the path.
        log.warning("the state dir is not usable: %s", exc.message)
    sweep_temp_files(config.state_dir)  # leftovers of a crash are never trusted
    partial.sweep(config.partial_dir, config.cdn.partial_max_age_h * 3600)
    metrics = Metrics()
    session = overrides.session or transport.api_session("azaiond")
    observe_api(session, metrics)
    login_credentials = overrides.login_credentials or credentials.login_credentials
    machine = hardware.describe() if config.hardware == "auto" else config.hardware
    api = ResourceApi(
        session,
        config.api.url,
        machine,
        token_cache=TokenCache(config.token_path),
        fallback_credentials=login_credentials,
        retries=config.api.retries,
        timeout=config.api.timeout,
        backoff=config.api.backoff,
        clock=overrides.clock or time.time,
        deadline=config.api.deadline,
        login_backoff=config.api.login_backoff,
        login_backoff_max=config.api.login_backoff_max,
    )
    journal = UploadJournal(config.state_dir / "uploads")

    make_cdn = CdnFactory(config, metrics, journal, overrides.boto_session)
    account = Account(api, make_cdn, journal)
    cache = BigPartCache(config.cache_dir, config.resources.cache_max_bytes)
    resources = SplitResources(
        api,
        account.cdn,
        cache,
        overrides.resource_key or (lambda: credentials.resource_key(config.resources.key)),
        small_part_kb=config.resources.small_part_kb,
        generations=Generations(config.generations_path),
        upload_format=config.resources.format,
        chunk_log2=config.resources.v2_chunk_log2,
        fetcher=Fetcher(
            config.partial_dir,
            range_size=config.cdn.range_bytes,
            parallel=config.cdn.parallel,
            retries=config.cdn.retries,
        ),
    )
    images = DockerImages(config.docker.base_url, config.docker.timeout)
    unlock = UnlockJob(config, account, images, status_line=status_line or (lambda _line: None),
                       on_finish=metrics.unlock_finished)
    prefetcher = Prefetcher(resources, config.resources.prefetch)
    account.on_login.append(prefetcher.kick)
    api_files = ApiFiles(api, config.state_dir, config.resources.api_max_bytes)
    handlers = Handlers(config, account, resources, unlock, api_files, metrics=metrics)

    def token_seconds_left() -> float | None:
        expires = api.token_expires_at
        return None if expires is None else round(expires - time.time(), 3)

    metrics.gauge("cache_bytes", "Bytes of big parts in the cache.", lambda: cache.total_bytes)
    metrics.gauge("cache_limit_bytes", "The cache's limit in bytes (0: none).", lambda: cache.limit_bytes)
    metrics.gauge("token_expiry_seconds", "Seconds until the held token expires (negative: expired).",
                  token_seconds_left)
    metrics.cache_counts(lambda: {"evictions": cache.evictions})
    textfile = TextfileWriter(metrics)
    textfile.configure(config.metrics.textfile, config.metrics.textfile_interval)

    hooks = ReloadHooks()
    hooks.register("logging", ("log_level",), lambda new: logs.set_level(new.log_level))

    def new_api_limits(new: Config) -> None:
        a = new.api
        api.set_limits(retries=a.retries, timeout=a.timeout, backoff=a.backoff, deadline=a.deadline,
                       login_backoff=a.login_backoff, login_backoff_max=a.login_backoff_max)

    def new_cdn_settings(new: Config) -> None:
        make_cdn.config = new
        account.forget_cdn()  # built anew, with the new settings, on the next call that needs it
        resources.fetcher.configure(range_size=new.cdn.range_bytes, parallel=new.cdn.parallel,
                                    retries=new.cdn.retries)

    hooks.register("the Resource API client", ("api.retries", "api.timeout", "api.backoff", "api.deadline",
                                                "api.login_backoff", "api.login_backoff_max"), new_api_limits)
    hooks.register("the CDN client", ("cdn.retries", "cdn.multipart_chunk_mb", "cdn.timeout", "cdn.deadline",
                                      "cdn.range_mb", "cdn.parallel"), new_cdn_settings)
    hooks.register("the cache", ("resources.cache_max_mb",),
                   lambda new: cache.set_limit(new.resources.cache_max_bytes))

    def new_prefetch_list(new: Config) -> None:
        prefetcher.replace(new.resources.prefetch)
        if api.authenticated:
            prefetcher.kick()  # else the next login does

    hooks.register("the prefetch list", ("resources.prefetch",), new_prefetch_list)
    hooks.register("the metrics textfile", ("metrics",),
                   lambda new: textfile.configure(new.metrics.textfile, new.metrics.textfile_interval))
    return Services(
        config=config,
        account=account,
        resources=resources,
        unlock=unlock,
        images=images,
        handlers=handlers,
        table=method_table(handlers),
        session=session,
        login_credentials=login_credentials,
        prefetcher=prefetcher,
        metrics=metrics,
        textfile=textfile,
        reload_hooks=hooks,
    )


def build_dispatcher(
    table: MethodTable,
    *,
    workers: int = WORKERS,
    limits: Limits | None = None,
    observers: Sequence[CallObserver] = (),
) -> Dispatcher:
    """The dispatcher; every finished call goes to the per-call log, then to ``observers``."""
    return Dispatcher(table, workers=workers, observers=[CallLog(), *observers], limits=limits or Limits())


def build_rpc(
    table: MethodTable,
    sock: socket.socket,
    config: SocketConfig,
    *,
    workers: int = WORKERS,
    inline_bytes: int = Limits.inline_bytes,
    observers: Sequence[CallObserver] = (),
) -> Rpc:
    """The dispatcher for ``table`` and a server on the listening ``sock``."""
    dispatcher = build_dispatcher(table, workers=workers, limits=call_limits(config, inline_bytes),
                                  observers=observers)
    server = Server(
        sock,
        dispatcher,
        max_message_bytes=config.max_message_bytes,
        admin_groups=config.admin_groups,
        limits=connection_limits(config),
    )
    return Rpc(dispatcher, server)


def call_limits(config: SocketConfig, inline_bytes: int) -> Limits:
    return Limits(
        max_batch=config.max_batch,
        batch_inline_bytes=config.max_batch_inline_bytes,
        inline_bytes=inline_bytes,
        calls_per_uid=config.max_calls_per_uid,
    )


def connection_limits(config: SocketConfig) -> ConnectionLimits:
    return ConnectionLimits(
        max_connections=config.max_connections,
        max_connections_per_uid=config.max_connections_per_uid,
        max_buffered_bytes=config.max_buffered_bytes,
        idle_timeout=config.idle_timeout,
        stall_timeout=config.stall_timeout,
    )


# The socket keys a reload applies live; the path, the group and the message cap need a restart.
LIVE_SOCKET_KEYS = (
    "socket.max_connections", "socket.max_connections_per_uid", "socket.max_buffered_mb",
    "socket.idle_timeout", "socket.stall_timeout", "socket.max_batch", "socket.max_batch_inline_mb",
    "socket.max_calls_per_uid", "socket.admin_groups",
)


def build(config: Config, overrides: Overrides = Overrides()) -> Daemon:
    """The whole daemon. The socket comes first, so a second daemon fails (``ListenError``)
    before it touches the state dir; if the services cannot be built, the socket is closed."""
    notifier = Notifier(overrides.environ)
    notifier.status("starting")
    listener = open_listener(config.socket, overrides.environ)
    try:
        # The unlock job reports progress as systemd STATUS= lines (`systemctl status azaiond`).
        services = build_services(config, overrides, status_line=notifier.status)
    except BaseException:
        listener.close()
        raise
    rpc = build_rpc(services.table, listener.sock, config.socket, inline_bytes=config.resources.inline_limit_bytes,
                    observers=[services.metrics.observe_call])

    def new_socket_limits(new: Config) -> None:
        rpc.dispatcher.set_limits(call_limits(new.socket, new.resources.inline_limit_bytes))
        rpc.server.set_limits(connection_limits(new.socket), admin_groups=new.socket.admin_groups)

    services.reload_hooks.register("the socket's limits", LIVE_SOCKET_KEYS, new_socket_limits)
    return Daemon(config=config, notifier=notifier, listener=listener, services=services, rpc=rpc)
