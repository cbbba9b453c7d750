"""From one received line to its reply: parse, request shape, then jsonrpcserver for the rest.

Check order (SPEC section 7): parse -> request shape -> method exists -> access -> params ->
the handler. Parsing and shape checks are ours: jsonrpcserver's jsonschema validator costs
about 50 us a call and refuses a whole batch for one bad element, while JSON-RPC wants one
-32600 per bad element. jsonrpcserver then finds the method (-32601) and calls our wrapper,
which checks access before params, so a caller who may not use a method learns nothing
about its params.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

from jsonrpcserver import Success
from jsonrpcserver.async_dispatcher import dispatch_request
from jsonrpcserver.async_main import dispatch_to_response
from jsonrpcserver.dispatcher import create_request
from jsonrpcserver.exceptions import JsonRpcError
from jsonrpcserver.result import Result
from jsonrpcserver.sentinels import NOID
from oslash.either import Left

from azaiond.errors import AzaionError, InvalidParams
from azaiond.rpc.table import Access, Call, CallObserver, CallRecord, MethodSpec, MethodTable, Param, Peer

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
FORBIDDEN = -32002
TOO_LARGE = -32008

_REQUEST_KEYS = frozenset(("jsonrpc", "method", "params", "id"))
_JSON_NAMES: dict[type, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    dict: "object",
    list: "array",
    type(None): "null",
}


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would let an id we cannot echo through.
    raise ValueError(f"not JSON: {name}")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)
# Built once: json.dumps with keyword arguments builds a new encoder on every call.
_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def error_line(code: int, message: str, kind: str, id_: Any = None) -> bytes:
    """One complete JSON-RPC error reply, newline included."""
    body = {"jsonrpc": "2.0", "error": {"code": code, "message": message, "data": {"kind": kind}}, "id": id_}
    return _encoder.encode(body).encode() + b"\n"


def _error_obj(code: int, message: str, kind: str, id_: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message, "data": {"kind": kind}}, "id": id_}


PARSE_ERROR_LINE = error_line(PARSE_ERROR, "parse error", "parse_error")
INVALID_REQUEST_LINE = error_line(INVALID_REQUEST, "invalid request", "invalid_request")
TOO_LARGE_LINE = error_line(TOO_LARGE, "message too large", "too_large")


def shape_ok(obj: Any) -> bool:
    """A JSON-RPC 2.0 request or notification object, as jsonrpcserver's schema defines it."""
    if type(obj) is not dict or obj.get("jsonrpc") != "2.0" or type(obj.get("method")) is not str:
        return False
    if not _REQUEST_KEYS.issuperset(obj):
        return False
    if "params" in obj and type(obj["params"]) not in (dict, list):
        return False
    if "id" in obj:
        id_type = type(obj["id"])
        if id_type not in (str, int, float) and obj["id"] is not None:
            return False
    return True


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(_JSON_NAMES.get(t, t.__name__) for t in types)


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    # bool is a subclass of int in Python but a different type in JSON.
    if isinstance(value, bool):
        return bool in types or object in types
    if isinstance(value, types):
        return True
    # JSON has one number type: 3 is a fine value for a float param.
    return float in types and isinstance(value, int)


def validate_params(params: Sequence[Param], given: Mapping[str, Any]) -> None:
    """Raise InvalidParams naming the first missing, extra or mistyped param."""
    names = {p.name for p in params}
    for key in given:
        if key not in names:
            raise InvalidParams(f"extra param '{key}'")
    for p in params:
        if p.name not in given:
            if p.required:
                raise InvalidParams(f"missing param '{p.name}'")
            continue
        types = p.type if isinstance(p.type, tuple) else (p.type,)
        if not _type_ok(given[p.name], types):
            raise InvalidParams(f"param '{p.name}' must be {_type_name(types)}")


def may_call(spec: MethodSpec, peer: Peer) -> bool:
    """Access from the table alone; a level this code does not know refuses."""
    if spec.access is Access.OPEN:
        return True
    if spec.access is Access.ADMIN:
        return peer.is_admin
    return False


class _Context:
    """What a wrapper needs about the message it serves; one per message, shared in a batch."""

    __slots__ = ("deferred", "fd", "fd_error", "fds", "peer", "reply_fds")

    def __init__(self, peer: Peer, fds: Sequence[int], batch: bool, reply_fds: list[int] | None = None) -> None:
        self.peer = peer
        self.fds = fds
        # Where a single request's handler puts descriptors for the reply; None in a batch,
        # whose one reply line cannot say which element a descriptor belongs to.
        self.reply_fds = None if batch else reply_fds
        self.fd: int | None = fds[0] if len(fds) == 1 and not batch else None
        self.fd_error: str | None = None
        if len(fds) > 1:
            self.fd_error = "a request may carry at most one descriptor"
        elif fds and batch:
            self.fd_error = "a descriptor may only accompany a single request, not a batch"
        # Set when a worker thread still holds the descriptor after its call was cancelled.
        self.deferred = False


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _identity(obj: Any) -> Any:
    return obj


def _reply(outcome: Any, id_: Any) -> dict[str, Any]:
    """A jsonrpcserver Result (or Response) as its reply object, every error with data.kind."""
    if isinstance(outcome, Left):
        err = outcome._error
        data = err.data
        if isinstance(data, dict) and "kind" in data:
            return {"jsonrpc": "2.0", "error": {"code": err.code, "message": err.message, "data": data},
                    "id": id_}
        if err.code == METHOD_NOT_FOUND:
            return _error_obj(METHOD_NOT_FOUND, "method not found", "method_not_found", id_)
        # Anything else came from inside jsonrpcserver, whose data is str(exc): never echo it.
        return _error_obj(INTERNAL_ERROR, "internal error", "internal", id_)
    return {"jsonrpc": "2.0", "result": outcome._value.result, "id": id_}


def _serialize(response: Any) -> dict[str, Any]:
    """post_process for jsonrpcserver's batch path: a Response to its reply object."""
    inner = response._error if isinstance(response, Left) else response._value
    return _reply(response, inner.id)


_WRAPPER_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
)


class Dispatcher:
    """Turns received lines into reply lines, running handlers on the loop or on worker threads."""

    def __init__(
        self,
        table: MethodTable,
        *,
        workers: int = 32,
        executor: Executor | None = None,
        cancel: threading.Event | None = None,
        observers: Sequence[CallObserver] = (),
    ) -> None:
        self.table = table
        # Told about every call that reached a method (metrics, the per-call log), on the loop.
        self._observers = tuple(observers)
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="azaiond-rpc"
        )
        # One event for every call: setting it at shutdown reaches every call in flight.
        self.cancel = cancel or threading.Event()
        self._methods: dict[str, Callable[..., Awaitable[Result]]] = {
            name: self._wrap(spec) for name, spec in table.items()
        }
        self._threads: set[Future[Mapping[str, Any]]] = set()

    @property
    def busy_threads(self) -> int:
        """Handlers still running on worker threads (also those whose caller was cancelled)."""
        return len(self._threads)

    def close(self) -> None:
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _wrap(self, spec: MethodSpec) -> Callable[..., Awaitable[Result]]:
        handler = spec.handler
        params = spec.params
        blocking = spec.blocking
        name = spec.name

        async def method(*args: Any, **kwargs: Any) -> Result:
            ctx: _Context = args[0]
            observers = self._observers
            # With observers: the call's facts, its time and its outcome go to each of them.
            # One coroutine either way: a nested one would cost the hot path more than this.
            facts: dict[str, Any] | None = {} if observers else None
            start = time.perf_counter() if observers else 0.0
            kind: str | None = None
            try:
                if not may_call(spec, ctx.peer):
                    raise JsonRpcError(FORBIDDEN, "forbidden", {"kind": "forbidden"})
                if len(args) > 1:
                    raise JsonRpcError(INVALID_PARAMS, "params must be named", {"kind": "invalid_params"})
                try:
                    validate_params(params, kwargs)
                except InvalidParams as exc:
                    raise JsonRpcError(exc.code, exc.message, {"kind": exc.kind}) from None
                if ctx.fd_error is not None:
                    raise JsonRpcError(INVALID_PARAMS, ctx.fd_error, {"kind": "invalid_params"})
                call = Call(peer=ctx.peer, params=kwargs, fd=ctx.fd, cancel=self.cancel)
                if facts is not None:
                    call.facts = facts
                try:
                    if blocking:
                        result = await self._run_thread(handler, call, ctx)
                    else:
                        result = handler(call)
                except AzaionError as exc:
                    _close_fds(call.reply_fds)
                    raise JsonRpcError(exc.code, exc.message, {"kind": exc.kind}) from None
                except Exception:
                    _close_fds(call.reply_fds)
                    log.exception("method %s failed", name)
                    raise JsonRpcError(INTERNAL_ERROR, "internal error", {"kind": "internal"}) from None
                if call.reply_fds:
                    if ctx.reply_fds is None:
                        _close_fds(call.reply_fds)
                        raise JsonRpcError(INVALID_PARAMS, f"{name}: a reply descriptor needs a single request, "
                                           "not a batch or a notification", {"kind": "invalid_params"})
                    ctx.reply_fds.extend(call.reply_fds)
                if type(result) is not dict:
                    if not isinstance(result, Mapping):
                        log.error("method %s returned %s, not an object", name, type(result).__name__)
                        raise JsonRpcError(INTERNAL_ERROR, "internal error", {"kind": "internal"})
                    result = dict(result)
                return Success(result)
            except JsonRpcError as exc:
                kind = exc.data.get("kind", "internal") if isinstance(exc.data, dict) else "internal"
                raise
            except asyncio.CancelledError:
                kind = "cancelled"
                raise
            finally:
                if facts is not None:
                    record = CallRecord(name, ctx.peer, kind, time.perf_counter() - start, facts)
                    for observe in observers:
                        try:
                            observe(record)
                        except Exception:
                            log.exception("a call observer failed")

        # jsonrpcserver binds every call against the method's signature; a ready one skips
        # inspect's work, and *args/**kwargs never fails to bind, so params errors stay ours.
        method.__signature__ = _WRAPPER_SIGNATURE  # type: ignore[attr-defined]
        return method

    async def _run_thread(
        self, handler: Callable[[Call], Mapping[str, Any]], call: Call, ctx: _Context
    ) -> Mapping[str, Any]:
        future = self._executor.submit(handler, call)
        self._threads.add(future)
        # set.discard is atomic under the GIL, so the worker thread may run this callback.
        future.add_done_callback(self._threads.discard)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # Whatever the handler still makes for the reply has nobody to go to.
            future.add_done_callback(lambda _: _close_fds(call.reply_fds))
            if ctx.fds and not future.done():
                # The thread may still write to the descriptor: closing it now could hand its
                # number to another file. Close it when the thread lets go.
                ctx.deferred = True
                fds = ctx.fds
                future.add_done_callback(lambda _: _close_fds(fds))
            raise

    async def handle(
        self, line: bytes, peer: Peer, fds: Sequence[int] = (), reply_fds: list[int] | None = None
    ) -> bytes | None:
        """The reply line for one received line (newline stripped), or None when none is due.

        Takes ownership of ``fds``: they are closed once every handler of the line returned.
        Descriptors the handler passes back are appended to ``reply_fds`` (the transport sends
        them with the reply and closes them); without that list a call cannot pass any.
        """
        ctx: _Context | None = None
        try:
            try:
                obj = _decoder.decode(line.decode("utf-8"))
            except (ValueError, RecursionError):
                return PARSE_ERROR_LINE
            if type(obj) is dict:
                if not shape_ok(obj):
                    return INVALID_REQUEST_LINE
                ctx = _Context(peer, fds, batch=False, reply_fds=reply_fds if "id" in obj else None)
                return await self._single(obj, ctx)
            if type(obj) is list and obj:
                ctx = _Context(peer, fds, batch=True)
                return await self._batch(obj, ctx)
            return INVALID_REQUEST_LINE
        finally:
            if ctx is None or not ctx.deferred:
                _close_fds(fds)

    async def _single(self, obj: dict[str, Any], ctx: _Context) -> bytes | None:
        # The hot path. jsonrpcserver's dispatch_to_response wraps even one request in
        # asyncio.gather (a Task, an extra loop turn: ~15 us of a ~35 us round trip), so a
        # single request goes straight to its per-request step, which does the same work.
        request = create_request(obj)
        _, result = await dispatch_request(self._methods, ctx, request)
        if request.id is NOID:
            return None  # a notification: no reply, whatever happened
        return self._encode_one(_reply(result, request.id))

    async def _dispatch(self, obj: Any, ctx: _Context) -> Any:
        return await dispatch_to_response(
            "",
            self._methods,
            context=ctx,
            deserializer=lambda _: obj,
            validator=_identity,
            post_process=_serialize,
        )

    async def _batch(self, items: list[Any], ctx: _Context) -> bytes | None:
        good = [item for item in items if shape_ok(item)]
        replies: list[Any] = []
        if good:
            answer = await self._dispatch(good, ctx)
            if isinstance(answer, list):
                replies = answer
            elif answer is not None:
                # jsonrpcserver failed as a whole and gave one error: give it to every request.
                replies = [_error_obj(INTERNAL_ERROR, "internal error", "internal", item.get("id"))
                           for item in good if "id" in item]
        # Put each bad element's error where it stood; jsonrpcserver kept the order of the rest.
        out: list[Any] = []
        answered = iter(replies)
        for item in items:
            if not shape_ok(item):
                out.append(_error_obj(INVALID_REQUEST, "invalid request", "invalid_request"))
            elif "id" in item:
                out.append(next(answered))
        if not out:
            return None
        try:
            return _encoder.encode(out).encode() + b"\n"
        except (TypeError, ValueError):
            parts = [self._encode_one(reply)[:-1] for reply in out]
            return b"[" + b",".join(parts) + b"]\n"

    @staticmethod
    def _encode_one(reply: Any) -> bytes:
        try:
            return _encoder.encode(reply).encode() + b"\n"
        except (TypeError, ValueError):
            # A handler returned something JSON cannot carry (a set, bytes, NaN...).
            log.error("a reply could not be encoded as JSON")
            return error_line(INTERNAL_ERROR, "internal error", "internal", reply.get("id"))
