"""``RefServer``: the reference Resource API on a background thread, plus its test switches.

``RefServer`` *is* an ``ApiState`` (users, files, switches), so a test calls the switches on the
same object it started: ``srv.fail_next(2, "/resources/get")``, ``srv.calls("/login")``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from tests.support.refserver.handler import RefHTTPServer
from tests.support.refserver.state import ApiState, User


class RefServer(ApiState):
    """The reference Resource API of SPEC section 5 for tests, demos and benchmarks.

    ``control=True`` also serves the unauthenticated ``/_control/`` switch endpoints; they are
    for tests and demos only, which is one reason the server binds loopback by default.
    """

    def __init__(
        self,
        users: Iterable[User] = (),
        *,
        key_fragment: bytes | None = None,
        cdn_yaml: bytes | None = None,
        token_ttl: float = 3600,
        host: str = "127.0.0.1",
        port: int = 0,
        storage: Path | None = None,
        control: bool = True,
    ) -> None:
        super().__init__(users, key_fragment, cdn_yaml, token_ttl=token_ttl, storage=storage)
        self._address = (host, port)
        self._control = control
        self._httpd: RefHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def bind(self) -> RefServer:
        """Bind the socket without serving yet, so ``url`` is known before ``start``."""
        if self._httpd is None:
            self._httpd = RefHTTPServer(self._address, self, self._control)
        return self

    def start(self) -> RefServer:
        """Bind and serve on a daemon thread; returns self so ``RefServer(...).start()`` reads well."""
        self.bind()
        assert self._httpd is not None
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="refserver", daemon=True
            )
            self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the server is not bound yet; call start()")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:40123``."""
        if self._httpd is None:
            raise RuntimeError("the server is not bound yet; call start()")
        host = str(self._httpd.server_address[0])
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            if thread is not None:
                httpd.shutdown()  # only valid while serve_forever runs, i.e. after start()
                thread.join(timeout=5)
            httpd.server_close()

    def __enter__(self) -> RefServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
