"""The daemon's configuration (docs/formats.md, config keys), read once into frozen, typed objects.

Every error names the file, the key and what is wrong with its value. Unknown keys are errors
too, so a misspelt key never silently falls back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from azaiond.errors import ConfigError, InvalidName
from azaiond.names import check_bucket, check_name
from azaiond.urls import UrlProblem, check_url

DEFAULT_PATH = Path("/etc/azaiond/config.yaml")
MIB = 1024 * 1024


@dataclass(frozen=True)
class ApiConfig:
    url: str | None = None
    retries: int = 3
    timeout: float = 30.0  # seconds per HTTP request (connect and each read)
    backoff: float = 0.5  # seconds; attempt k waits backoff * 2**k * jitter
    deadline: float = 60.0  # seconds for one call: every attempt, backoff and the body
    login_backoff: float = 10.0  # seconds without implicit logins after the first refusal
    login_backoff_max: float = 900.0  # the interval doubles per refusal up to this


@dataclass(frozen=True)
class SocketConfig:
    path: Path = Path("/run/azaiond/azaiond.sock")
    group: str | None = "azaion"
    admin_groups: tuple[str, ...] = ("azaion-admin",)
    max_message_mb: int = 32
    # Limits that keep one member from taking the daemon from everyone (docs/security.md).
    max_connections: int = 256  # open connections in all, root's not counted
    max_connections_per_uid: int = 32
    max_buffered_mb: int = 96  # unfinished-message bytes held for all connections together
    idle_timeout: float = 300.0  # seconds a connection may wait between complete messages
    stall_timeout: float = 30.0  # seconds a transfer on a caller's descriptor or socket may stall
    max_batch: int = 1000  # elements in one batch
    max_batch_inline_mb: int = 32  # decoded inline bytes one batch may move, both ways
    max_calls_per_uid: int = 8  # worker-thread calls one non-admin uid may have running

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MIB

    @property
    def max_buffered_bytes(self) -> int:
        return self.max_buffered_mb * MIB

    @property
    def max_batch_inline_bytes(self) -> int:
        return self.max_batch_inline_mb * MIB


@dataclass(frozen=True)
class ResourcesConfig:
    key: str | None = field(default=None, repr=False)
    small_part_kb: int = 3
    inline_limit_mb: int = 16
    cache_max_mb: int = 0  # 0: no limit; else least recently used big parts are evicted past it
    # (folder, name) of resources whose big parts are fetched into the cache once logged in
    prefetch: tuple[tuple[str, str], ...] = ()
    api_max_mb: int = 64  # largest whole-file API resource api_load takes and api_upload buffers
    # Largest plaintext a load with memfd hands back: its pages count against the daemon's
    # MemoryMax= until the caller lets go of them.
    memfd_max_mb: int = 1024
    format: int = 1  # what upload writes when the call does not say: 1 (the seed's) or 2
    # Chunk size of format v2 as a power of two. Publishers write 20 (1 MiB); smaller values
    # exist so tests can cross many chunk boundaries with small resources.
    v2_chunk_log2: int = 20

    @property
    def inline_limit_bytes(self) -> int:
        return self.inline_limit_mb * MIB

    @property
    def cache_max_bytes(self) -> int:
        return self.cache_max_mb * MIB

    @property
    def api_max_bytes(self) -> int:
        return self.api_max_mb * MIB

    @property
    def memfd_max_bytes(self) -> int:
        return self.memfd_max_mb * MIB


@dataclass(frozen=True)
class CdnConfig:
    endpoint: str | None = None
    retries: int = 3
    multipart_chunk_mb: int = 8  # boto3's own default part size
    timeout: float = 60.0  # seconds per socket operation (connect, each read)
    deadline: float = 300.0  # seconds for one HTTP request to the CDN (a part, a range, a small object)
    range_mb: int = 8  # a cold load fetches the big part in ranges of this size...
    parallel: int = 4  # ...this many at a time
    partial_max_age_h: float = 24.0  # older partial downloads are removed at start

    @property
    def range_bytes(self) -> int:
        return self.range_mb * MIB


@dataclass(frozen=True)
class UnlockConfig:
    archive: Path = Path("/var/lib/azaiond/images.enc")
    version: str = "latest"
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class DockerConfig:
    base_url: str = "unix:///run/docker.sock"
    timeout: float = 3600.0  # seconds; images.load of a multi-GB archive takes minutes


@dataclass(frozen=True)
class MetricsConfig:
    # node_exporter's textfile collector: the metrics text is written here atomically.
    textfile: Path | None = None
    textfile_interval: float = 15.0  # seconds between writes


@dataclass(frozen=True)
class Config:
    api: ApiConfig = ApiConfig()
    socket: SocketConfig = SocketConfig()
    state_dir: Path = Path("/var/lib/azaiond")
    hardware: str = "auto"
    resources: ResourcesConfig = ResourcesConfig()
    cdn: CdnConfig = CdnConfig()
    unlock: UnlockConfig = UnlockConfig()
    docker: DockerConfig = DockerConfig()
    metrics: MetricsConfig = MetricsConfig()
    log_level: str = "info"
    # Plain http:// to a host other than this one; logged at warning on every start.
    allow_insecure_http: bool = False
    source: str = "<defaults>"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    @property
    def partial_dir(self) -> Path:
        return self.state_dir / "partial"

    @property
    def token_path(self) -> Path:
        return self.state_dir / "token.json"

    @property
    def generations_path(self) -> Path:
        return self.state_dir / "generations.json"

    @property
    def unlock_state_path(self) -> Path:
        return self.state_dir / "unlock.json"


T = TypeVar("T")


class _Reader:
    """Pulls typed values out of one YAML mapping, naming file and key in every error.

    Errors are collected, not raised: a bad value yields the default and one line in the
    shared ``errors`` list, so ``--check-config`` can report every problem in one go.
    """

    def __init__(self, source: str, prefix: str, data: Mapping[str, Any], errors: list[str]) -> None:
        self.source = source
        self.prefix = prefix
        self.data = dict(data)
        self.errors = errors

    def fail(self, key: str, problem: str) -> None:
        self.errors.append(f"{self.source}: {self.prefix}{key}: {problem}")

    def take(self, key: str, default: T, convert: Callable[[Any], T], expected: str) -> T:
        if key not in self.data or (self.data[key] is None and default is None):
            self.data.pop(key, None)
            return default
        value = self.data.pop(key)
        try:
            return convert(value)
        except UrlProblem as exc:
            # The value is not echoed: a URL may carry a user name or password.
            self.fail(key, str(exc))
        except (TypeError, ValueError):
            self.fail(key, f"expected {expected}, got {value!r}")
        return default

    def section(self, key: str) -> _Reader:
        value = self.data.pop(key, None) or {}
        if not isinstance(value, Mapping):
            self.fail(key, f"expected a mapping, got {value!r}")
            value = {}
        return _Reader(self.source, f"{self.prefix}{key}.", value, self.errors)

    def done(self) -> None:
        for key in sorted(self.data):
            self.errors.append(f"{self.source}: {self.prefix}{key}: unknown key")


def _int(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(value)
        return value

    return convert


def _float(low: float, high: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise ValueError(value)
        return float(value)

    return convert


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(value)
    return value


def _url(allow_insecure_http: bool) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        return check_url(_str(value), allow_insecure_http=allow_insecure_http)

    return convert


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


def _path(value: Any) -> Path:
    path = Path(_str(value))
    if not path.is_absolute():
        raise ValueError(value)
    return path


def _str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(value)
    return tuple(value)


def _resource_list(value: Any) -> tuple[tuple[str, str], ...]:
    """A list of ``{folder, name}`` mappings, each a valid resource name in a valid folder."""
    if not isinstance(value, list):
        raise ValueError(value)
    out: list[tuple[str, str]] = []
    for item in value:
        if not isinstance(item, Mapping) or set(item) != {"folder", "name"}:
            raise ValueError(value)
        try:
            folder = check_bucket(check_name(item["folder"], "folder"))
            name = check_name(item["name"])
        except InvalidName as exc:
            raise ValueError(value) from exc
        out.append((folder, name))
    return tuple(out)


def _level(value: Any) -> str:
    text = _str(value).lower()
    if text not in ("debug", "info", "warning", "error"):
        raise ValueError(value)
    return text


def parse(data: Mapping[str, Any] | None, source: str = "<config>") -> Config:
    """Build a Config from an already-parsed YAML mapping."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping")
    errors: list[str] = []
    top = _Reader(source, "", data, errors)
    d = Config()
    # Read first: it decides whether the URLs below may be plain http.
    insecure = top.take("allow_insecure_http", d.allow_insecure_http, _bool, "true or false")

    r = top.section("api")
    api = ApiConfig(
        url=r.take("url", d.api.url, _url(insecure), "an https:// URL"),
        retries=r.take("retries", d.api.retries, _int(0, 10), "an integer 0-10"),
        timeout=r.take("timeout", d.api.timeout, _float(0.1, 3600), "seconds, 0.1-3600"),
        backoff=r.take("backoff", d.api.backoff, _float(0, 60), "seconds, 0-60"),
        deadline=r.take("deadline", d.api.deadline, _float(0.1, 86400), "seconds, 0.1-86400"),
        login_backoff=r.take("login_backoff", d.api.login_backoff, _float(0, 86400), "seconds, 0-86400"),
        login_backoff_max=r.take(
            "login_backoff_max", d.api.login_backoff_max, _float(0, 86400), "seconds, 0-86400"
        ),
    )
    r.done()

    r = top.section("socket")
    sock = SocketConfig(
        path=r.take("path", d.socket.path, _path, "an absolute path"),
        group=r.take("group", d.socket.group, _str, "a group name"),
        admin_groups=r.take("admin_groups", d.socket.admin_groups, _str_list, "a list of group names"),
        max_message_mb=r.take("max_message_mb", d.socket.max_message_mb, _int(1, 1024), "MiB, 1-1024"),
        max_connections=r.take("max_connections", d.socket.max_connections, _int(1, 65536), "an integer 1-65536"),
        max_connections_per_uid=r.take(
            "max_connections_per_uid", d.socket.max_connections_per_uid, _int(1, 65536), "an integer 1-65536"
        ),
        max_buffered_mb=r.take("max_buffered_mb", d.socket.max_buffered_mb, _int(1, 65536), "MiB, 1-65536"),
        idle_timeout=r.take("idle_timeout", d.socket.idle_timeout, _float(1, 86400), "seconds, 1-86400"),
        stall_timeout=r.take("stall_timeout", d.socket.stall_timeout, _float(0.1, 3600), "seconds, 0.1-3600"),
        max_batch=r.take("max_batch", d.socket.max_batch, _int(1, 1_000_000), "an integer 1-1000000"),
        max_batch_inline_mb=r.take(
            "max_batch_inline_mb", d.socket.max_batch_inline_mb, _int(0, 1024), "MiB, 0-1024"
        ),
        max_calls_per_uid=r.take(
            "max_calls_per_uid", d.socket.max_calls_per_uid, _int(1, 1024), "an integer 1-1024"
        ),
    )
    r.done()

    state_dir = top.take("state_dir", d.state_dir, _path, "an absolute path")
    hardware = top.take("hardware", d.hardware, _str, "'auto' or a fixed description")

    r = top.section("resources")
    resources = ResourcesConfig(
        key=r.take("key", d.resources.key, _str, "a non-empty string"),
        small_part_kb=r.take("small_part_kb", d.resources.small_part_kb, _int(1, 1024), "KiB, 1-1024"),
        inline_limit_mb=r.take(
            "inline_limit_mb", d.resources.inline_limit_mb, _int(0, 1024), "MiB, 0-1024"
        ),
        cache_max_mb=r.take(
            "cache_max_mb", d.resources.cache_max_mb, _int(0, 1 << 30), "MiB, 0 (no limit) or more"
        ),
        prefetch=r.take(
            "prefetch", d.resources.prefetch, _resource_list, "a list of {folder, name} with valid names"
        ),
        api_max_mb=r.take("api_max_mb", d.resources.api_max_mb, _int(1, 4096), "MiB, 1-4096"),
        memfd_max_mb=r.take("memfd_max_mb", d.resources.memfd_max_mb, _int(1, 65536), "MiB, 1-65536"),
        format=r.take("format", d.resources.format, _int(1, 2), "1 or 2"),
        v2_chunk_log2=r.take("v2_chunk_log2", d.resources.v2_chunk_log2, _int(12, 24), "an integer 12-24"),
    )
    r.done()

    r = top.section("cdn")
    cdn = CdnConfig(
        endpoint=r.take("endpoint", d.cdn.endpoint, _url(insecure), "an https:// URL"),
        retries=r.take("retries", d.cdn.retries, _int(0, 10), "an integer 0-10"),
        multipart_chunk_mb=r.take(
            "multipart_chunk_mb", d.cdn.multipart_chunk_mb, _int(5, 1024), "MiB, 5-1024"
        ),
        timeout=r.take("timeout", d.cdn.timeout, _float(0.1, 3600), "seconds, 0.1-3600"),
        deadline=r.take("deadline", d.cdn.deadline, _float(0.1, 86400), "seconds, 0.1-86400"),
        range_mb=r.take("range_mb", d.cdn.range_mb, _int(1, 1024), "MiB, 1-1024"),
        parallel=r.take("parallel", d.cdn.parallel, _int(1, 32), "an integer 1-32"),
        partial_max_age_h=r.take(
            "partial_max_age_h", d.cdn.partial_max_age_h, _float(0, 87600), "hours, 0-87600"
        ),
    )
    r.done()

    r = top.section("unlock")
    unlock = UnlockConfig(
        archive=r.take("archive", state_dir / "images.enc", _path, "an absolute path"),
        version=r.take("version", d.unlock.version, _str, "a non-empty string"),
        images=r.take("images", d.unlock.images, _str_list, "a list of image names"),
    )
    r.done()

    r = top.section("docker")
    docker = DockerConfig(
        base_url=r.take("base_url", d.docker.base_url, _str, "a Docker endpoint URL"),
        timeout=r.take("timeout", d.docker.timeout, _float(1, 86400), "seconds, 1-86400"),
    )
    r.done()

    r = top.section("metrics")
    metrics = MetricsConfig(
        textfile=r.take("textfile", d.metrics.textfile, _path, "an absolute path ending in .prom"),
        textfile_interval=r.take(
            "textfile_interval", d.metrics.textfile_interval, _float(1, 3600), "seconds, 1-3600"
        ),
    )
    if metrics.textfile is not None and metrics.textfile.suffix != ".prom":
        r.fail("textfile", "node_exporter reads only files ending in .prom")
    r.done()

    log_level = top.take("log_level", d.log_level, _level, "one of debug, info, warning, error")
    top.done()
    if errors:
        raise ConfigError("\n".join(errors), problems=errors)
    return Config(
        api=api,
        socket=sock,
        state_dir=state_dir,
        hardware=hardware,
        resources=resources,
        cdn=cdn,
        unlock=unlock,
        docker=docker,
        metrics=metrics,
        log_level=log_level,
        allow_insecure_http=insecure,
        source=source,
    )


def load(path: Path | None = None) -> Config:
    """Read the config: ``path``, else ``$AZAIOND_CONFIG``, else /etc/azaiond/config.yaml.

    A missing default file means built-in defaults; a missing file that was named is an error.
    """
    named = path is not None or bool(os.environ.get("AZAIOND_CONFIG"))
    if path is None:
        path = Path(os.environ.get("AZAIOND_CONFIG") or DEFAULT_PATH)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        if named:
            raise ConfigError(f"{path}: no such file") from exc
        return parse({}, source=f"{path} (absent: defaults)")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse(data, source=str(path))
