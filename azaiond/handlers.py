"""The methods of docs/protocol.md as plain functions of a ``Call``, over the services.

Handlers know nothing of sockets or JSON-RPC: they read ``call.params`` (already checked for
presence and type by the dispatcher), use ``call.fd`` when the client passed a descriptor, and
raise ``azaiond.errors`` exceptions. Within a handler the order is names, then authentication,
then the work (docs/protocol.md, order of checks).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
from collections.abc import Callable, Mapping
from typing import IO, Any

from azaiond import __version__, memfd
from azaiond.account import Account
from azaiond.apiclient import Credentials
from azaiond.apifiles import ApiFiles
from azaiond.config import Config
from azaiond.errors import InvalidParams, TooLarge
from azaiond.fdio import CappedBuffer, CappedSink, FdSink, FdSource, HashingSink, require_readable, require_writable
from azaiond.metrics import Metrics
from azaiond.names import check_bucket, check_name
from azaiond.resources import FORMATS, LoadResult, SplitResources
from azaiond.rpc.table import Call
from azaiond.unlock import UnlockJob

Result = Mapping[str, Any]


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(data).decode("ascii")


class Handlers:
    def __init__(
        self,
        config: Config,
        account: Account,
        resources: SplitResources,
        unlock: UnlockJob,
        api_files: ApiFiles | None = None,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        self._account = account
        self._resources = resources
        self._unlock = unlock
        self._api_files = api_files or ApiFiles(
            account.api, config.state_dir, config.resources.api_max_bytes
        )
        self._inline_limit = config.resources.inline_limit_bytes
        self._stall = config.socket.stall_timeout
        self._memfd_limit = config.resources.memfd_max_bytes

    # -- open ----------------------------------------------------------------------------

    def health(self, call: Call) -> Result:
        return {"status": "healthy"}

    def status(self, call: Call) -> Result:
        api = self._account.api
        user = api.user if api.authenticated else None
        return {
            "authenticated": user is not None,
            "user": user.as_dict() if user else None,
            "cache_dir": str(self._resources.cache_dir),
            "version": __version__,
            "unlock": self._unlock.status(),
            # Beyond the contract's keys: the cache's size and limit (0: none), as last counted.
            "cache_bytes": self._resources.cache.total_bytes,
            "cache_limit_bytes": self._resources.cache.limit_bytes,
        }

    def unlock_status(self, call: Call) -> Result:
        return self._unlock.status()

    def metrics(self, call: Call) -> Result:
        snapshot = self._metrics.snapshot()
        return {**snapshot, "text": self._metrics.text(snapshot)}

    def load(self, call: Call) -> Result:
        name, folder = call.params["name"], call.params["folder"]
        call.facts["resource"] = f"{folder}/{name}"
        if call.params.get("memfd"):
            if call.fd is not None:
                raise InvalidParams("load: pass either memfd or a descriptor, not both")
            return self._load_memfd(call, name, folder)
        if call.fd is not None:
            require_writable(call.fd, "load")
            return _load_result(self._load_into(call, name, folder, call.fd))
        buffer = CappedBuffer(self._inline_limit)
        result = self._resources.load(name, folder, buffer, call.cancel)
        self._load_facts(call, result)
        return {**_load_result(result), "data": _b64(buffer.buffer)}

    def _load_into(self, call: Call, name: str, folder: str, fd: int, limit: int | None = None) -> LoadResult:
        """Load into ``fd`` with the CDN phase as progress; past ``limit`` bytes (a memfd's
        cap), ``too_large``."""
        phases = LoadProgress(call.progress)
        with FdSink(fd, call.cancel, self._stall, phases.written) as out:
            sink = out if limit is None else CappedSink(out, limit, "memfd_max_mb")
            result = self._resources.load(name, folder, sink, call.cancel, phases.fetched)
        self._load_facts(call, result)
        return result

    @staticmethod
    def _load_facts(call: Call, result: LoadResult) -> None:
        call.facts["bytes"] = result.size
        if result.cache_hit is not None:
            call.facts["cache"] = "hit" if result.cache_hit else "miss"

    def prefetch(self, call: Call) -> Result:
        name, folder = call.params["name"], call.params["folder"]
        call.facts["resource"] = f"{folder}/{name}"
        size = self._resources.prefetch(name, folder, call.cancel, call.progress)
        return {"big_size": size, "cached": True}

    def cache_list(self, call: Call) -> Result:
        cache = self._resources.cache
        entries = cache.entries()
        return {
            "entries": [e.as_dict() for e in entries],
            "total_bytes": sum(e.size for e in entries),
            "limit_bytes": cache.limit_bytes,
        }

    def api_load(self, call: Call) -> Result:
        name, folder = call.params["name"], call.params["folder"]
        call.facts["resource"] = f"{folder}/{name}"
        result: LoadResult
        if call.fd is not None:
            require_writable(call.fd, "api_load")
            with FdSink(call.fd, call.cancel, self._stall, call.progress) as sink:
                result = self._api_files.load(name, folder, sink, call.cancel)
            call.facts["bytes"] = result.size
            return {"size": result.size, "sha256": result.sha256}
        buffer = CappedBuffer(self._inline_limit)
        result = self._api_files.load(name, folder, buffer, call.cancel)
        call.facts["bytes"] = result.size
        return {"size": result.size, "sha256": result.sha256, "data": _b64(buffer.buffer)}

    def _load_memfd(self, call: Call, name: str, folder: str) -> Result:
        """The plaintext in a sealed memfd passed back with the reply: in memory only, and
        nobody can change it once the caller has it (write, grow, shrink and seal are sealed).

        Its pages are charged to the daemon's cgroup, also after the caller took it, so it is
        capped at ``resources.memfd_max_mb``: past that, ``too_large`` and nothing is passed.
        """
        # Checked before the names go into the memfd's own name (a NUL there would be an error).
        check_name(name)
        check_name(folder, "folder")
        fd = memfd.create(f"azaiond:{folder}/{name}")
        try:
            result = self._load_into(call, name, folder, fd, self._memfd_limit)
            memfd.seal(fd)
        except BaseException:
            os.close(fd)
            raise
        call.reply_fds.append(fd)
        return {**_load_result(result), "memfd": True}

    # -- admin ---------------------------------------------------------------------------

    def login(self, call: Call) -> Result:
        creds = Credentials(email=call.params["email"], password=call.params["password"])
        return {"user": self._account.login(creds).as_dict()}

    def logout(self, call: Call) -> Result:
        self._account.logout()
        return {}

    def _input(self, call: Call, method: str) -> io.BufferedReader | io.BytesIO:
        """The bytes a call uploads: its descriptor, or its inline base64 ``data``.

        With a ``size`` param, reading more or fewer bytes than it says raises InvalidParams
        from inside the read, so the upload fails before it commits anything.
        """
        data = call.params.get("data")
        size = call.params.get("size")
        if size is not None and size < 0:
            raise InvalidParams(f"{method}: size must be 0 or more")
        if call.fd is not None and data is not None:
            raise InvalidParams(f"{method}: pass either data or a descriptor, not both")
        if call.fd is not None:
            require_readable(call.fd, method)
            source = FdSource(call.fd, call.cancel, self._stall, call.progress)
            return io.BufferedReader(_SizedReader(source, size, method), buffer_size=1024 * 1024)
        if data is None:
            raise InvalidParams(f"{method}: pass the bytes as data (base64) or as a descriptor")
        # base64 is 4/3 of the bytes; refuse before decoding anything oversized.
        if len(data) // 4 * 3 > self._inline_limit + 3:
            raise TooLarge(f"{method}: data is over the inline limit: pass a descriptor")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidParams(f"{method}: data is not valid base64") from exc
        if len(raw) > self._inline_limit:
            raise TooLarge(f"{method}: data is over the inline limit: pass a descriptor")
        if size is not None and size != len(raw):
            raise InvalidParams(f"{method}: size says {size} bytes but data holds {len(raw)}")
        return io.BytesIO(raw)

    def upload(self, call: Call) -> Result:
        name = check_name(call.params["name"])
        folder = check_name(call.params["folder"], "folder")
        check_bucket(folder)
        call.facts["resource"] = f"{folder}/{name}"
        fmt = call.params.get("format")
        if fmt is not None and (isinstance(fmt, bool) or fmt not in FORMATS):
            raise InvalidParams("upload: format must be 1 or 2")
        with self._input(call, "upload") as source:
            size = _known_size(call.fd, source)
            result = self._resources.upload(name, folder, source, call.cancel, format=fmt, size=size)
        call.facts["bytes"] = result.size
        return {
            "size": result.size,
            "small_size": result.small_size,
            "big_size": result.big_size,
            "format": result.format,
        }

    def cache_drop(self, call: Call) -> Result:
        folder, name = call.params.get("folder"), call.params.get("name")
        if name is not None and folder is None:
            raise InvalidParams("cache_drop: a name needs its folder")
        if folder is not None:
            check_name(folder, "folder")
        if name is not None:
            check_name(name)
        dropped, freed = self._resources.cache.drop_many(folder, name)
        return {"dropped": dropped, "freed_bytes": freed}

    def api_upload(self, call: Call) -> Result:
        name = check_name(call.params["name"], "file name")
        folder = check_name(call.params["folder"], "folder")
        size = call.params.get("size")
        call.facts["resource"] = f"{folder}/{name}"
        if call.fd is not None and call.params.get("data") is None:
            # Raw and unbuffered, so a regular file can be rewound for a retry.
            require_readable(call.fd, "api_upload")
            raw = FdSource(call.fd, call.cancel, self._stall, call.progress)
            stored = self._api_files.upload(name, folder, raw, size=size, fd=call.fd, cancel=call.cancel)
        else:
            with self._input(call, "api_upload") as source:
                stored = self._api_files.upload(name, folder, source, size=size, cancel=call.cancel)
        call.facts["bytes"] = stored
        return {"size": stored}

    def cdn_upload(self, call: Call) -> Result:
        bucket = check_bucket(call.params["bucket"])
        key = check_name(call.params["key"], "key")
        call.facts["resource"] = f"{bucket}/{key}"
        with self._input(call, "cdn_upload") as source:
            counter = _CountingReader(source)
            self._account.cdn().upload_from(bucket, key, counter)
        call.facts["bytes"] = counter.count
        return {"size": counter.count}

    def cdn_download(self, call: Call) -> Result:
        bucket = check_bucket(call.params["bucket"])
        key = check_name(call.params["key"], "key")
        call.facts["resource"] = f"{bucket}/{key}"
        if call.fd is not None:
            require_writable(call.fd, "cdn_download")
            with FdSink(call.fd, call.cancel, self._stall, call.progress) as out:
                sink = HashingSink(out)
                self._account.cdn().download_into(bucket, key, sink)
            call.facts["bytes"] = sink.size
            return {"size": sink.size, "sha256": sink.digest.hexdigest()}
        buffer = CappedBuffer(self._inline_limit)
        sink = HashingSink(buffer)
        self._account.cdn().download_into(bucket, key, sink)
        call.facts["bytes"] = sink.size
        return {"size": sink.size, "sha256": sink.digest.hexdigest(), "data": _b64(buffer.buffer)}

    def unlock(self, call: Call) -> Result:
        email, password = call.params.get("email"), call.params.get("password")
        if (email is None) != (password is None):
            raise InvalidParams("unlock: pass both email and password, or neither")
        creds = Credentials(email=email, password=password) if email is not None and password is not None else None
        return self._unlock.start(creds)


def _load_result(result: LoadResult) -> dict[str, Any]:
    out: dict[str, Any] = {"size": result.size, "sha256": result.sha256, "format": result.format}
    if result.generation is not None:
        out["generation"] = result.generation
    return out


def _known_size(fd: int | None, source: io.BufferedReader | io.BytesIO) -> int | None:
    """Bytes left in the input when that can be known up front (a file, inline data), else None.

    A descriptor shares its offset with the caller's, so a file counts from where it stands.
    """
    if isinstance(source, io.BytesIO):
        return len(source.getbuffer()) - source.tell()
    if fd is None:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return None
    return max(0, info.st_size - os.lseek(fd, 0, os.SEEK_CUR))


class _CountingReader(io.RawIOBase):
    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self._source = source
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _SizedReader(io.RawIOBase):
    """A raw reader that holds its source to a declared size (None: any size).

    Reading past the size, or reaching the end short of it, raises InvalidParams at that read,
    which is before any upload commits: the small part goes to the API only after the last
    read, and a multipart CDN upload is aborted on the exception.
    """

    def __init__(self, source: io.RawIOBase, size: int | None, method: str) -> None:
        super().__init__()
        self._source = source
        self._size = size
        self._method = method
        self._count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._size is None:
            return self._source.readinto(buffer) or 0
        # Ask for one byte past the size at most, enough to see that the input runs long.
        view = memoryview(buffer)[: self._size + 1 - self._count]
        n = self._source.readinto(view) or 0
        self._count += n
        if self._count > self._size:
            raise InvalidParams(f"{self._method}: the input holds more than the {self._size} bytes size says")
        if n == 0 and self._count != self._size:
            raise InvalidParams(
                f"{self._method}: the input ended after {self._count} of the {self._size} bytes size says"
            )
        return n


class LoadProgress:
    """One rising progress count for a ``load``: the CDN phase when there is one, else bytes out.

    A big part missing from the cache reports (bytes of it on the disk, its size) from before
    the first plaintext byte until it is complete; the caller then hears nothing of the bytes
    written, whose count would start over below it. A cached big part reports (bytes written,
    None), as every other byte-moving call does.
    """

    def __init__(self, progress: Callable[[int, int | None], None]) -> None:
        self._progress = progress
        self._fetching = False

    def fetched(self, done: int, total: int | None) -> None:
        self._fetching = True
        self._progress(done, total)

    def written(self, done: int, total: int | None) -> None:
        if not self._fetching:
            self._progress(done, total)
