"""The JSON-RPC 2.0 wire format of the socket: codes, ready error lines, parsing and encoding.

Parsing is ours, not jsonrpcserver's: one JSON parse, a shape check that gives each bad batch
element its own -32600, and a batch read element by element, so one longer than the limit is
refused before it is built and a long one lets the event loop run while it is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
FORBIDDEN = -32002
TOO_LARGE = -32008

# Batch elements parsed between two yields while a long batch line is read.
PARSE_SLICE = 256
_REQUEST_KEYS = frozenset(("jsonrpc", "method", "params", "id"))
WHITESPACE = re.compile(r"[ \t\n\r]*")


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would let an id we cannot echo through.
    raise ValueError(f"not JSON: {name}")


decoder = json.JSONDecoder(parse_constant=_reject_constant)
# Built once: json.dumps with keyword arguments builds a new encoder on every call.
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_raw_decode = decoder.raw_decode


def error_obj(code: int, message: str, kind: str, id_: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message, "data": {"kind": kind}}, "id": id_}


def error_line(code: int, message: str, kind: str, id_: Any = None) -> bytes:
    """One complete JSON-RPC error reply, newline included."""
    return _encoder.encode(error_obj(code, message, kind, id_)).encode() + b"\n"


PARSE_ERROR_LINE = error_line(PARSE_ERROR, "parse error", "parse_error")
INVALID_REQUEST_LINE = error_line(INVALID_REQUEST, "invalid request", "invalid_request")
TOO_LARGE_LINE = error_line(TOO_LARGE, "message too large", "too_large")
_INVALID_REQUEST_PART = INVALID_REQUEST_LINE[:-1]


def shape_ok(obj: Any) -> bool:
    """A JSON-RPC 2.0 request or notification whose id we can echo: a string, integer or null."""
    if type(obj) is not dict or obj.get("jsonrpc") != "2.0" or type(obj.get("method")) is not str:
        return False
    if not _REQUEST_KEYS.issuperset(obj):
        return False
    if "params" in obj and type(obj["params"]) not in (dict, list):
        return False
    # A float id (1.5, 1e400) is refused: JSON-RPC discourages fractions, and one that
    # overflowed to inf could not even be echoed back.
    return "id" not in obj or type(obj["id"]) in (str, int) or obj["id"] is None


# Longest line the quick path parses: quick requests are a few dozen bytes, and a longer line
# (an inline upload) goes to the full path, so no large line is ever parsed twice.
QUICK_LINE_MAX = 1024


def quick_request(line: bytes) -> tuple[str, Any, dict[str, Any]] | None:
    """``(method, id, params)`` of a line that is one well-formed request (``shape_ok``) with an
    id and named or no params; None for anything else, which the full path then parses and
    answers.
    """
    if len(line) > QUICK_LINE_MAX or line[:1] != b"{":
        return None
    try:
        text = line.decode()
        obj, end = _raw_decode(text)
    except (ValueError, RecursionError):
        return None
    # raw_decode stops at the object's end; trailing whitespace goes to the full path too.
    if end != len(text) or "id" not in obj or not shape_ok(obj):
        return None
    params = obj.get("params", {})
    return (obj["method"], obj["id"], params) if type(params) is dict else None


def result_line(result: Any, id_: Any) -> bytes:
    """A success reply line: the bytes ``encode_reply`` gives for it, for less work (the
    encoder's setup is paid once, for the result, not for the envelope)."""
    try:
        body = _encoder.encode(result)
    except (TypeError, ValueError):
        return encode_reply({"jsonrpc": "2.0", "result": result, "id": id_}) + b"\n"
    tail = b',"id":%d}\n' % id_ if type(id_) is int else b',"id":' + _encoder.encode(id_).encode() + b"}\n"
    return b'{"jsonrpc":"2.0","result":' + body.encode() + tail


class TooManyElements(Exception):
    """A batch longer than the limit, found while it was parsed."""


async def parse_batch(text: str, start: int, max_elements: int) -> list[Any]:
    """The elements of the JSON array that begins at ``text[start]`` (its ``[``).

    Decodes one element at a time and yields to the loop now and then, so a long line never
    holds it; stops with TooManyElements past ``max_elements`` without building the rest.
    Raises ValueError (or RecursionError) where ``json.loads`` would.
    """
    items: list[Any] = []
    decode = decoder.raw_decode
    skip = WHITESPACE.match
    pos = skip(text, start + 1).end()  # type: ignore[union-attr]
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            item, pos = decode(text, pos)
            items.append(item)
            if len(items) > max_elements:
                raise TooManyElements
            if len(items) % PARSE_SLICE == 0:
                await asyncio.sleep(0)
            pos = skip(text, pos).end()  # type: ignore[union-attr]
            if text.startswith(",", pos):
                pos = skip(text, pos + 1).end()  # type: ignore[union-attr]
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            raise ValueError("expected ',' or ']'")
    if skip(text, pos).end() != len(text):  # type: ignore[union-attr]
        raise ValueError("extra data after the batch")
    return items


def fix_error(reply: dict[str, Any]) -> dict[str, Any]:
    """Every error with data.kind; jsonrpcserver's own errors made ours."""
    error = reply.get("error")
    if error is None:
        return reply
    data = error.get("data")
    if isinstance(data, dict) and "kind" in data:
        return reply
    if error.get("code") == METHOD_NOT_FOUND:
        return error_obj(METHOD_NOT_FOUND, "method not found", "method_not_found", reply.get("id"))
    # Anything else came from inside jsonrpcserver, whose data is str(exc): never echo it.
    return error_obj(INTERNAL_ERROR, "internal error", "internal", reply.get("id"))


def encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply object as JSON (no newline)."""
    try:
        return _encoder.encode(reply).encode()
    except (TypeError, ValueError):
        # A handler returned something JSON cannot carry (a set, bytes, NaN...).
        log.error("a reply could not be encoded as JSON")
        return error_line(INTERNAL_ERROR, "internal error", "internal", reply.get("id"))[:-1]


# Progress notifications for one call: at most one per this many seconds (and the last).
PROGRESS_INTERVAL = 0.25

Notify = Callable[[bytes], None]


class Progress:
    """Call.progress for a caller who asked for it: throttled notification lines."""

    __slots__ = ("_id", "_last", "_notify")

    def __init__(self, notify: Notify, id_: Any) -> None:
        self._notify = notify
        self._id = id_
        self._last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL and done != total:
            return
        self._last = now
        params = {"id": self._id, "done": done, "total": total}
        line = encode_reply({"jsonrpc": "2.0", "method": "progress", "params": params}) + b"\n"
        try:
            self._notify(line)
        except Exception:
            log.exception("sending a progress notification failed")
