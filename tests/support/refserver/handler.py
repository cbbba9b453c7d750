"""HTTP for the reference Resource API: routing, bodies, multipart and the /_control/ switches.

The handler speaks HTTP/1.1 with keep-alive, so every request body is read in full before
answering (leftover bytes would poison the next request on the connection) and every response
carries a Content-Length. Log lines name method, path and status only: headers carry tokens
and bodies carry passwords, so neither is ever logged.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.refserver import v1
from tests.support.refserver.state import E_BAD_REQUEST, E_INJECTED, E_NOT_FOUND, ApiError, ApiState, User

log = logging.getLogger("tests.support.refserver")

MAX_BODY = 64 * 1024 * 1024  # small parts are KBs; this only stops a runaway client
CONTROL = "/_control/"


class RefHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: ApiState, control: bool) -> None:
        super().__init__(address, Handler)
        self.state = state
        self.control = control

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints tracebacks to stderr; a client hanging up mid-request (tests with
        # short timeouts do that on purpose) is routine, so it goes to the debug log.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            log.debug("client %s went away: %s", client_address[0], type(exc).__name__)
        else:
            log.exception("error serving %s", client_address[0])


def _folder(value: str) -> str:
    """Folder from the URL: ``""`` (cdn.yaml) or a valid name."""
    if value == "":
        return value
    return _name(value, "folder")


def _name(value: object, what: str) -> str:
    if not v1.allowed_name(value):
        raise ApiError(400, E_BAD_REQUEST, f"{what} is not allowed: use 1-128 of A-Z a-z 0-9 . _ -")
    assert isinstance(value, str)
    return value


def _headers(raw: bytes) -> Message:
    return BytesHeaderParser(policy=HTTP).parsebytes(raw + b"\r\n\r\n")


def _delimiters(body: bytes, delim: bytes) -> list[tuple[int, int, bool]]:
    """(start, end of the delimiter line, closing?) for each real delimiter in ``body``.

    A match counts only when ``--`` (close) or optional padding and CRLF follow it, so
    ``--boundaryX`` inside content is not mistaken for one.
    """
    found: list[tuple[int, int, bool]] = []
    pos = 0
    while (at := body.find(delim, pos)) >= 0:
        after = at + len(delim)
        if body.startswith(b"--", after):
            found.append((at, after + 2, True))
            break
        eol = body.find(b"\r\n", after)
        if eol >= 0 and not body[after:eol].strip(b" \t"):
            found.append((at, eol + 2, False))
            pos = eol + 2
        else:
            pos = after
    return found


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Fields of a multipart/form-data body: name -> (file name or None, content).

    A small boundary parser instead of the deprecated ``cgi``. It works on raw bytes, so binary
    content with bare CR or LF comes through unchanged.
    """
    ctype = _headers(f"Content-Type: {content_type}".encode("latin-1", "replace"))
    boundary = ctype.get_param("boundary", header="content-type")
    if ctype.get_content_type() != "multipart/form-data" or not isinstance(boundary, str) or not boundary:
        raise ApiError(400, E_BAD_REQUEST, "expected multipart/form-data with a boundary")
    data = b"\r\n" + body  # so the first delimiter also starts with CRLF
    marks = _delimiters(data, b"\r\n--" + boundary.encode("latin-1"))
    if not marks or not marks[-1][2]:
        raise ApiError(400, E_BAD_REQUEST, "multipart body is not terminated")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for (_, begin, _closing), (stop, _, _) in itertools.pairwise(marks):
        part = data[begin:stop]
        if part.startswith(b"\r\n"):
            head, content = b"", part[2:]  # a part without headers
        else:
            head, sep, content = part.partition(b"\r\n\r\n")
            if not sep:
                raise ApiError(400, E_BAD_REQUEST, "malformed multipart part")
        headers = _headers(head)
        name = headers.get_param("name", header="content-disposition")
        if isinstance(name, str):
            fields[name] = (headers.get_filename(), content)
    return fields


class Handler(BaseHTTPRequestHandler):
    server: RefHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "azaion-refserver"
    timeout = 120  # seconds; an idle keep-alive connection then frees its thread

    # ---- plumbing --------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        # Only ever called with request lines and status codes, never headers or bodies.
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        path = urlsplit(self.path).path
        log.info("%s %s -> %s", self.command, path, code)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: object) -> None:
        self._send(status, json.dumps(payload).encode())

    def _error(self, err: ApiError) -> None:
        self._json(err.status, err.body())

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ApiError(411, E_BAD_REQUEST, "chunked bodies are not supported; send Content-Length")
        try:
            n = int(length) if length is not None else 0
        except ValueError as exc:
            self.close_connection = True
            raise ApiError(400, E_BAD_REQUEST, "bad Content-Length") from exc
        if n < 0 or n > MAX_BODY:
            self.close_connection = True  # the body stays unread, so the connection cannot be reused
            raise ApiError(413, E_BAD_REQUEST, "request body too large")
        return self.rfile.read(n) if n else b""

    def _json_body(self, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body or b"{}")
        except ValueError as exc:
            raise ApiError(400, E_BAD_REQUEST, "body is not JSON") from exc
        if not isinstance(data, dict):
            raise ApiError(400, E_BAD_REQUEST, "body must be a JSON object")
        return data

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        try:
            body = self._read_body()
            if path.startswith(CONTROL) and self.server.control:
                self._control(path[len(CONTROL) :], body)
                return
            latency, injected = self.server.state.begin_call(path)
            if latency:
                time.sleep(latency)
            if injected is not None:
                raise ApiError(injected, E_INJECTED, "injected failure")
            self._api(path, body)
        except ApiError as err:
            self._error(err)
        except Exception:
            log.exception("internal error on %s %s", self.command, path)
            self._json(500, {"ErrorCode": 99, "Message": "internal error"})

    do_GET = do_POST = do_PUT = do_DELETE = _dispatch  # http.server looks up do_<METHOD>

    # ---- the Resource API ------------------------------------------------------------------

    def _api(self, path: str, body: bytes) -> None:
        state = self.server.state
        method = self.command
        if method == "POST" and path == "/login":
            req = self._json_body(body)
            token = state.login(req.get("email"), req.get("password"))
            self._json(200, {"token": token})
        elif method == "POST" and (path == "/resources/get" or path.startswith("/resources/get/")):
            # Authenticate first: a caller without a token learns nothing about folder rules.
            user = state.authenticate(self.headers.get("Authorization"))
            folder = _folder(path[len("/resources/get/") :] if path != "/resources/get" else "")
            data = state.get_resource(user, folder, self._json_body(body))
            self._send(200, data, "application/octet-stream")
        elif method == "POST" and path.startswith("/resources/") and path.count("/") == 2:
            user = state.authenticate(self.headers.get("Authorization"))
            folder = _folder(path[len("/resources/") :])
            self._upload(user, folder, body)
        elif method == "GET" and path == "/binary-split/key-fragment":
            user = state.authenticate(self.headers.get("Authorization"))
            self._send(200, state.key_fragment(user), "application/octet-stream")
        else:
            raise ApiError(404, E_NOT_FOUND, f"no route {method} {path}")

    def _upload(self, user: User, folder: str, body: bytes) -> None:
        state = self.server.state
        # Role first, so a caller without upload rights learns nothing from body errors.
        state.check_upload(user)
        fields = parse_multipart(self.headers.get("Content-Type", ""), body)
        filename, content = fields.get("data", (None, b""))
        if not filename:
            raise ApiError(400, E_BAD_REQUEST, "field 'data' with a file name is required")
        _name(filename, "file name")
        state.put_resource(user, folder, filename, content)
        self._json(200, {"fileName": filename, "folder": folder, "size": len(content)})

    # ---- /_control/: test switches, unauthenticated, for tests and demos only --------------

    def _control(self, action: str, body: bytes) -> None:
        state = self.server.state
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}
        method = self.command
        try:
            if action == "part":
                self._control_part(method, query, body)
                return
            if method == "GET" and action == "counters":
                self._json(200, {"calls": state.counters()})
                return
            if method == "GET" and action == "bindings":
                self._json(200, {"bindings": state.bindings()})
                return
            if method != "POST":
                raise ApiError(404, E_NOT_FOUND, f"no control {method} {action}")
            req = self._json_body(body)
            if action == "fail":
                count, prefix = int(req.get("count", 1)), str(req.get("prefix", ""))
                state.fail_next(count, prefix, int(req.get("status", 500)))
            elif action == "latency":
                state.set_latency(float(req.get("seconds", 0)))
            elif action == "expire-tokens":
                state.expire_tokens()
            elif action == "token-ttl":
                state.set_token_ttl(float(req["seconds"]))
            elif action == "corrupt":
                state.corrupt_next_get(
                    int(req.get("count", 1)), int(req.get("offset", -17)), int(req.get("mask", 0x80))
                )
            elif action == "reset-bindings":
                state.reset_bindings()
            elif action == "reset-counters":
                state.reset_counters()
            elif action == "reset":
                state.reset_switches()
            else:
                raise ApiError(404, E_NOT_FOUND, f"no control {action}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ApiError(400, E_BAD_REQUEST, f"bad control request: {type(exc).__name__}") from exc
        self._json(200, {"ok": True})

    def _control_part(self, method: str, query: dict[str, str], body: bytes) -> None:
        state = self.server.state
        folder = _folder(query.get("folder", ""))
        name = _name(query.get("name"), "name")
        if method == "GET":
            data = state.get_part(folder, name)
            if data is None:
                raise ApiError(404, E_NOT_FOUND, f"no file {name!r} in folder {folder!r}")
            self._send(200, data, "application/octet-stream")
        elif method in ("PUT", "POST"):
            state.put_part(folder, name, body)
            self._json(200, {"ok": True, "size": len(body)})
        elif method == "DELETE":
            if not state.delete_part(folder, name):
                raise ApiError(404, E_NOT_FOUND, f"no file {name!r} in folder {folder!r}")
            self._json(200, {"ok": True})
        else:
            raise ApiError(404, E_NOT_FOUND, f"no control {method} part")
