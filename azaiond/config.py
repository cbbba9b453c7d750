"""The daemon's configuration (SPEC section 3), read once into frozen, typed objects.

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

from azaiond.errors import ConfigError
from azaiond.urls import UrlProblem, check_url

DEFAULT_PATH = Path("/etc/azaiond/config.yaml")
MIB = 1024 * 1024


@dataclass(frozen=True)
class ApiConfig:
    url: str | None = None
    retries: int = 3
    timeout: float = 30.0  # seconds per HTTP request (connect and each read)
    backoff: float = 0.5  # seconds; attempt k waits backoff * 2**k * jitter


@dataclass(frozen=True)
class SocketConfig:
    path: Path = Path("/run/azaiond/azaiond.sock")
    group: str | None = "azaion"
    admin_groups: tuple[str, ...] = ("azaion-admin",)
    max_message_mb: int = 32

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MIB


@dataclass(frozen=True)
class ResourcesConfig:
    key: str | None = field(default=None, repr=False)
    small_part_kb: int = 3
    inline_limit_mb: int = 16

    @property
    def inline_limit_bytes(self) -> int:
        return self.inline_limit_mb * MIB


@dataclass(frozen=True)
class CdnConfig:
    endpoint: str | None = None
    retries: int = 3
    multipart_chunk_mb: int = 8  # boto3's own default part size


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
    def token_path(self) -> Path:
        return self.state_dir / "token.json"

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


def _optional_path(value: Any) -> Path | None:
    return _path(value)


def _path(value: Any) -> Path:
    path = Path(_str(value))
    if not path.is_absolute():
        raise ValueError(value)
    return path


def _str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(value)
    return tuple(value)


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
    )
    r.done()

    r = top.section("socket")
    sock = SocketConfig(
        path=r.take("path", d.socket.path, _path, "an absolute path"),
        group=r.take("group", d.socket.group, _str, "a group name"),
        admin_groups=r.take("admin_groups", d.socket.admin_groups, _str_list, "a list of group names"),
        max_message_mb=r.take("max_message_mb", d.socket.max_message_mb, _int(1, 1024), "MiB, 1-1024"),
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
    )
    r.done()

    r = top.section("cdn")
    cdn = CdnConfig(
        endpoint=r.take("endpoint", d.cdn.endpoint, _url(insecure), "an https:// URL"),
        retries=r.take("retries", d.cdn.retries, _int(0, 10), "an integer 0-10"),
        multipart_chunk_mb=r.take(
            "multipart_chunk_mb", d.cdn.multipart_chunk_mb, _int(5, 1024), "MiB, 5-1024"
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
        textfile=r.take("textfile", d.metrics.textfile, _optional_path, "an absolute path ending in .prom"),
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
