"""Every error azaiond raises on purpose, and the stable kind string of each.

The hierarchy::

    AzaionError                      kind           JSON-RPC code
    ├── ConfigError                  config         (startup only, never on the wire)
    ├── NotAuthenticated             not_authenticated  -32001
    ├── Forbidden                    forbidden          -32002
    ├── NotFound                     not_found          -32003
    ├── UpstreamError                upstream           -32004   the Resource API failed
    │   └── HardwareMismatch         hardware_mismatch  -32010   the API bound the user elsewhere (409)
    ├── CdnError                     cdn                -32005   the S3-compatible CDN failed
    ├── IntegrityError               integrity          -32006   decryption or verification failed
    │   └── UnwantedImages           integrity          -32006   an archive would tag names not asked for
    ├── Busy                         busy               -32007
    ├── TooLarge                     too_large          -32008
    ├── InvalidName                  invalid_name       -32009
    ├── InvalidParams                invalid_params     -32602
    ├── DockerError                  docker             -32011   the Docker engine failed or is unreachable
    ├── Cancelled                    cancelled          -32012   the daemon stopped, or the caller went away
    ├── Rollback                     rollback           -32013   a v2 resource older than one already seen
    ├── StorageError                 storage            -32014   the host's own disk failed (full, read-only, I/O)
    └── Stale                        stale              -32015   the CDN holds another version than the API

Services raise these; foreign exceptions (requests, botocore, docker, OSError) are translated
where they enter, with ``raise XError(...) from exc``. The RPC layer maps ``kind`` to the code
and the CLI maps ``kind`` to its exit status, so the kind strings are a contract: never rename one.

Messages are for people and must never carry a password, token or key.
"""

from __future__ import annotations

from typing import ClassVar


class AzaionError(Exception):
    """Base of every deliberate azaiond error."""

    kind: ClassVar[str] = "internal"
    code: ClassVar[int] = -32603

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(AzaionError):
    """The configuration file is unreadable or a key holds a bad value.

    ``problems`` lists every problem found, one line each, naming the file and the key.
    """

    kind = "config"
    code = -32603

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) if problems else (message,)


class NotAuthenticated(AzaionError):
    """No credentials yet, or the Resource API refused the login."""

    kind = "not_authenticated"
    code = -32001


class Forbidden(AzaionError):
    """The peer may not call this method, or the API refused the user's role."""

    kind = "forbidden"
    code = -32002


class NotFound(AzaionError):
    """Unknown resource, CDN object or archive."""

    kind = "not_found"
    code = -32003


class UpstreamError(AzaionError):
    """The Resource API failed: 5xx after retries, unreachable, or an unexpected answer."""

    kind = "upstream"
    code = -32004

    def __init__(self, message: str, *, status: int | None = None, error_code: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class HardwareMismatch(UpstreamError):
    """The Resource API says this machine is not the one the user is bound to (409)."""

    kind = "hardware_mismatch"
    code = -32010


class CdnError(AzaionError):
    """The CDN failed: unreachable, refused the keys, or broke off a transfer."""

    kind = "cdn"
    code = -32005


class IntegrityError(AzaionError):
    """Decryption or verification failed. Deliberately says nothing about which check failed."""

    kind = "integrity"
    code = -32006


class UnwantedImages(IntegrityError):
    """An images archive would set image names outside ``unlock.images`` (its message names them)."""


class Busy(AzaionError):
    """A conflicting operation is under way."""

    kind = "busy"
    code = -32007


class TooLarge(AzaionError):
    """A payload is over the inline limit or a message is over the size cap."""

    kind = "too_large"
    code = -32008


class InvalidName(AzaionError):
    """A resource name, folder, bucket or key that is not allowed."""

    kind = "invalid_name"
    code = -32009


class InvalidParams(AzaionError):
    """A call's params are missing, extra, of the wrong type, or a descriptor is unusable."""

    kind = "invalid_params"
    code = -32602


class DockerError(AzaionError):
    """The Docker engine is unreachable or refused an image."""

    kind = "docker"
    code = -32011


class Cancelled(AzaionError):
    """The daemon is stopping (SIGTERM), or the caller went away before the work finished."""

    kind = "cancelled"
    code = -32012


class Rollback(AzaionError):
    """A v2 resource whose generation is older than one this host has already loaded or uploaded."""

    kind = "rollback"
    code = -32013


class StorageError(AzaionError):
    """The host's own disk failed: full, read-only or an I/O error. The message names the path."""

    kind = "storage"
    code = -32014


class Stale(AzaionError):
    """The CDN holds another version of a big part than the Resource API's small part."""

    kind = "stale"
    code = -32015


#: Every kind, for the CLI's exit statuses and the docs. Order fixes the CLI exit codes.
ALL_ERRORS: tuple[type[AzaionError], ...] = (
    NotAuthenticated,
    Forbidden,
    NotFound,
    UpstreamError,
    CdnError,
    IntegrityError,
    Busy,
    TooLarge,
    InvalidName,
    HardwareMismatch,
    InvalidParams,
    DockerError,
    ConfigError,
    Cancelled,
    Rollback,
    StorageError,
    Stale,
)

ERROR_BY_KIND: dict[str, type[AzaionError]] = {cls.kind: cls for cls in ALL_ERRORS}
