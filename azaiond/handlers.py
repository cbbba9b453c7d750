"""The methods of SPEC section 7 as plain functions of a ``Call``, over the services.

Handlers know nothing of sockets or JSON-RPC: they read ``call.params`` (already checked for
presence and type by the dispatcher), use ``call.fd`` when the client passed a descriptor, and
raise ``azaiond.errors`` exceptions. Within a handler the order is names, then authentication,
then the work (SPEC section 7).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Mapping
from typing import IO, Any

from azaiond import __version__, memfd
from azaiond.account import Account
from azaiond.apiclient import Credentials
from azaiond.config import Config
from azaiond.errors import AzaionError, InvalidParams, TooLarge
from azaiond.fdio import CappedBuffer, FdSink, FdSource, HashingSink, require_readable, require_writable
from azaiond.metrics import Metrics
from azaiond.names import check_bucket, check_name
from azaiond.resources import SplitResources
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
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics or Metrics()
        self._account = account
        self._resources = resources
        self._unlock = unlock
        self._inline_limit = config.resources.inline_limit_bytes

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
            self._note_cache(call, name, folder)
            result = self._resources.load(name, folder, FdSink(call.fd), call.cancel)
            call.facts["bytes"] = result.size
            return {"size": result.size, "sha256": result.sha256}
        buffer = CappedBuffer(self._inline_limit)
        self._note_cache(call, name, folder)
        result = self._resources.load(name, folder, buffer, call.cancel)
        call.facts["bytes"] = result.size
        return {"size": result.size, "sha256": result.sha256, "data": _b64(buffer.buffer)}

    def _load_memfd(self, call: Call, name: str, folder: str) -> Result:
        """The plaintext in a sealed memfd passed back with the reply: in memory only, and
        nobody can change it once the caller has it (write, grow, shrink and seal are sealed)."""
        check_name(name)
        check_name(folder, "folder")
        fd = memfd.create(f"azaiond:{folder}/{name}")
        try:
            self._note_cache(call, name, folder)
            result = self._resources.load(name, folder, FdSink(fd), call.cancel)
            memfd.seal(fd)
        except BaseException:
            os.close(fd)
            raise
        call.reply_fds.append(fd)
        call.facts["bytes"] = result.size
        return {"size": result.size, "sha256": result.sha256, "memfd": True}

    def _note_cache(self, call: Call, name: str, folder: str) -> None:
        # Whether the big part was in the cache as the load began (a bad entry refetched
        # later still counts as the hit it looked like); names are checked by the load.
        try:
            path = self._resources.cache_path(check_name(name), check_name(folder, "folder"))
            call.facts["cache"] = "hit" if path.exists() else "miss"
        except AzaionError:
            pass

    # -- admin ---------------------------------------------------------------------------

    def login(self, call: Call) -> Result:
        creds = Credentials(email=call.params["email"], password=call.params["password"])
        return {"user": self._account.login(creds).as_dict()}

    def logout(self, call: Call) -> Result:
        self._account.logout()
        return {}

    def _input(self, call: Call, method: str) -> io.BufferedReader | io.BytesIO:
        """The bytes a call uploads: its descriptor, or its inline base64 ``data``."""
        data = call.params.get("data")
        if call.fd is not None and data is not None:
            raise InvalidParams(f"{method}: pass either data or a descriptor, not both")
        if call.fd is not None:
            require_readable(call.fd, method)
            return io.BufferedReader(FdSource(call.fd), buffer_size=1024 * 1024)
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
        return io.BytesIO(raw)

    def upload(self, call: Call) -> Result:
        name = check_name(call.params["name"])
        folder = check_name(call.params["folder"], "folder")
        check_bucket(folder)
        call.facts["resource"] = f"{folder}/{name}"
        with self._input(call, "upload") as source:
            result = self._resources.upload(name, folder, source, call.cancel)
        call.facts["bytes"] = result.size
        return {"size": result.size, "small_size": result.small_size, "big_size": result.big_size}

    def cdn_upload(self, call: Call) -> Result:
        bucket = check_bucket(call.params["bucket"])
        key = check_name(call.params["key"], "key")
        with self._input(call, "cdn_upload") as source:
            counter = _CountingReader(source)
            self._account.cdn().upload_from(bucket, key, counter)
        call.facts["bytes"] = counter.count
        return {"size": counter.count}

    def cdn_download(self, call: Call) -> Result:
        bucket = check_bucket(call.params["bucket"])
        key = check_name(call.params["key"], "key")
        if call.fd is not None:
            require_writable(call.fd, "cdn_download")
            sink = HashingSink(FdSink(call.fd))
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
