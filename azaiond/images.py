"""The daemon's view of the Docker engine: which images exist, and streaming ``docker load``.

Written against the docker SDK's public model API, which is the same in Debian's 5.0.3 and in
7.x: ``DockerClient(base_url, timeout, version)``, ``images.get`` raising ``ImageNotFound``,
and ``images.load`` taking a generator (sent with chunked transfer, so memory stays flat) and
raising ``ImageLoadError`` for an error inside docker's 200 stream.

Every engine failure becomes a ``DockerError`` carrying docker's own text. An exception that a
caller's chunk generator raises (a failed padding check, a cancel) is let through unchanged:
the SDK aborts the request, docker never sees the end of the archive and creates no image.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import docker
import docker.errors
import requests

from azaiond.errors import DockerError

log = logging.getLogger(__name__)


def _unreachable(base_url: str) -> DockerError:
    return DockerError(f"the Docker engine at {base_url} is not reachable: is docker.service running?")


class DockerImages:
    def __init__(
        self,
        base_url: str,
        timeout: float,
        client_factory: Callable[..., Any] = docker.DockerClient,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._factory = client_factory
        self._client: Any = None
        self._lock = threading.Lock()

    # -- the client --------------------------------------------------------------------------

    def _get_client(self) -> Any:
        """A client, made on first use: the engine may come up after the daemon (boot order).

        ``version="auto"`` asks the engine for its API version, so the SDK never speaks a newer
        API than the engine has; it also means an unreachable engine fails right here.
        """
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._factory(base_url=self.base_url, timeout=self.timeout, version="auto")
                except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
                    log.warning("docker engine at %s: %s", self.base_url, exc)
                    raise _unreachable(self.base_url) from exc
            return self._client

    def _forget_client(self) -> None:
        """Drop a client whose engine went away, so the next call reconnects and re-negotiates."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a dead client must never mask the real error
                log.debug("closing the docker client failed", exc_info=True)

    def _translate(self, exc: Exception, what: str) -> DockerError:
        """One ``DockerError`` for any engine failure, with docker's text where there is one."""
        if isinstance(exc, docker.errors.ImageLoadError):
            return DockerError(f"docker refused the image archive: {exc}")
        if isinstance(exc, docker.errors.APIError):
            detail = exc.explanation or str(exc)
            if isinstance(detail, bytes):
                detail = detail.decode("utf-8", "replace")
            return DockerError(f"docker {what} failed: {detail}")
        if isinstance(exc, requests.Timeout):
            return DockerError(f"docker {what} timed out after {self.timeout:.0f}s (docker.timeout)")
        if isinstance(exc, requests.ConnectionError | OSError):
            self._forget_client()
            return _unreachable(self.base_url)
        return DockerError(f"docker {what} failed: {exc}")

    # -- operations --------------------------------------------------------------------------

    def missing(self, names: Iterable[str]) -> list[str]:
        """The names among ``names`` that the engine does not have, in order."""
        client = self._get_client()
        absent: list[str] = []
        for name in names:
            try:
                client.images.get(name)
            except docker.errors.NotFound:  # ImageNotFound, and plain 404s of older engines
                absent.append(name)
            except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
                raise self._translate(exc, f"lookup of {name}") from exc
        return absent

    def image_id(self, name: str) -> str:
        """The image ID (``sha256:...``) of ``name``; ``DockerError`` if it does not exist."""
        client = self._get_client()
        try:
            return str(client.images.get(name).id)
        except docker.errors.NotFound as exc:
            raise DockerError(f"docker has no image {name}") from exc
        except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
            raise self._translate(exc, f"lookup of {name}") from exc

    def load(self, chunks: Iterator[bytes]) -> list[str]:
        """Stream a ``docker save`` tar into the engine; returns the IDs of the loaded images.

        ``chunks`` is consumed while it is sent, so the archive never has to fit in memory.
        Whatever ``chunks`` itself raises comes out of here unchanged.
        """
        client = self._get_client()
        try:
            loaded = client.images.load(chunks)
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise self._translate(exc, "load") from exc
        except OSError as exc:
            # A broken pipe or reset while sending: the engine went away or gave up on the body.
            raise self._translate(exc, "load") from exc
        return [str(image.id) for image in loaded]

    def close(self) -> None:
        self._forget_client()
