"""From one received line to its reply: parse, request shape, then jsonrpcserver for the rest.

Check order (docs/protocol.md): parse -> request shape -> method exists -> access -> params ->
the handler. Parsing and the request shape are ours: jsonrpcserver's jsonschema validator
costs about 50 us a call and refuses a whole batch for one bad element, while JSON-RPC wants
one -32600 per bad element; a batch is also parsed element by element, so an oversized one
is refused before it is built. jsonrpcserver is then used through its public API only
(``dispatch_to_serializable`` and its async twin, with our deserializer and validator): it
finds the method (-32601) and calls our wrapper, which checks access before params, so a
caller who may not use a method learns nothing about its params.

Two ways in. ``quick`` serves, synchronously, a line that is one request with an id and
named (or no) params to a quick method (``MethodSpec.blocking`` False: health, status,
unlock_status), with the same checks, observers and reply bytes as the full way, and None for
any other line; the transport tries it first. ``handle`` serves every line: quick methods
through jsonrpcserver's synchronous dispatch, which calls them inline with no task, blocking
ones through its async dispatch, which awaits a worker thread. A batch is dispatched in slices
with a yield to the event loop between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

from jsonrpcserver import JsonRpcError, Result, Success, async_dispatch_to_serializable, dispatch_to_serializable

from azaiond.errors import AzaionError, InvalidParams, TooLarge
from azaiond.rpc.checks import may_call, validate_params
from azaiond.rpc.quota import Limits, MemberSlots, inline_need, inline_used
from azaiond.rpc.table import Access, Call, CallObserver, CallRecord, MethodSpec, MethodTable, Peer
from azaiond.rpc.wire import (
    FORBIDDEN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    INVALID_REQUEST_LINE,
    PARSE_ERROR_LINE,
    TOO_LARGE,
    TOO_LARGE_LINE,
    WHITESPACE,
    Notify,
    Progress,
    TooManyElements,
    decoder,
    encode_reply,
    error_line,
    error_obj,
    fix_error,
    parse_batch,
    quick_request,
    result_line,
    shape_ok,
)

_INVALID_REQUEST_PART = INVALID_REQUEST_LINE[:-1]

# Names the transport and the tests take from here.
__all__ = [
    "INVALID_REQUEST",
    "TOO_LARGE_LINE",
    "Dispatcher",
    "Limits",
    "Notify",
    "error_line",
    "may_call",
    "validate_params",
]

log = logging.getLogger(__name__)

# Batch elements dispatched between two yields to the event loop: about a millisecond of
# quick calls, so other connections and the watchdog wait no longer than that.
SLICE = 64




class _Context:
    """What a wrapper needs about the message it serves; one per message, shared in a batch."""

    __slots__ = (
        "budget", "cancel", "deferred", "fd", "fd_error", "fds", "notify", "peer", "reply_fds", "request_id",
    )

    def __init__(
        self,
        peer: Peer,
        fds: Sequence[int],
        *,
        batch: bool,
        cancel: threading.Event,
        notify: Notify | None,
        budget: int | None,
        reply_fds: list[int] | None = None,
    ) -> None:
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
        self.cancel = cancel
        self.notify = notify
        # Inline bytes a batch may still move; None for a single request.
        self.budget = budget
        # The id of a single request (progress notifications name it); None in a batch.
        self.request_id: Any = None


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _identity(obj: Any) -> Any:
    return obj


def _error_dict(error: JsonRpcError) -> dict[str, Any]:
    return {"code": error.code, "message": error.message, "data": error.data}


def _raise(exc: AzaionError) -> JsonRpcError:
    return JsonRpcError(exc.code, exc.message, {"kind": exc.kind})


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
        limits: Limits | None = None,
    ) -> None:
        self.table = table
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="azaiond-rpc"
        )
        # Set at shutdown: reaches every call that was not given an event of its own.
        self.cancel = cancel or threading.Event()
        self._observers = tuple(observers)
        self.limits = limits or Limits()
        total = self.limits.member_calls if self.limits.member_calls is not None else max(1, workers - 4)
        self._slots = MemberSlots(self.limits.calls_per_uid, total)
        self._quick_specs = {name: spec for name, spec in table.items() if not spec.blocking}
        self._quick: dict[str, Callable[..., Result]] = {}
        self._async: dict[str, Callable[..., Awaitable[Result]]] = {}
        for name, spec in table.items():
            self._async[name] = self._wrap_async(spec)
            if not spec.blocking:
                self._quick[name] = self._as_method(self._run_quick(spec))
        self._threads: set[Future[Mapping[str, Any]]] = set()

    def set_limits(self, limits: Limits) -> None:
        """New limits (a live reload, on the loop); calls running keep the slots they hold."""
        self.limits = limits
        self._slots.per_uid = limits.calls_per_uid
        if limits.member_calls is not None:
            self._slots.total = limits.member_calls

    @property
    def busy_threads(self) -> int:
        """Handlers still running on worker threads (also those whose caller was cancelled)."""
        return len(self._threads)

    def close(self) -> None:
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- one call ------------------------------------------------------------------------

    @staticmethod
    def _open_call(
        spec: MethodSpec,
        peer: Peer,
        params: dict[str, Any],
        cancel: threading.Event,
        *,
        positional: bool = False,
        fd: int | None = None,
        fd_error: str | None = None,
    ) -> tuple[Call, bool]:
        """Access, then params, then descriptor checks, in that order: a caller who may not use
        a method learns nothing about its params. The Call the handler gets, and whether the
        caller asked for progress notifications."""
        if spec.access is not Access.OPEN and not may_call(spec, peer):
            raise InvalidCall(FORBIDDEN, "forbidden", "forbidden")
        if positional:
            raise InvalidCall(INVALID_PARAMS, "params must be named", "invalid_params")
        wants_progress = False
        if params:
            # Progress notifications are the transport's, not the method's: opt-in, stripped here.
            wants_progress = params.pop("progress", False)
            if type(wants_progress) is not bool:
                raise InvalidCall(INVALID_PARAMS, "param 'progress' must be boolean", "invalid_params")
        if params or spec.params:
            validate_params(spec.params, params)
        if fd_error is not None:
            raise InvalidParams(fd_error)
        return Call(peer, params, fd, cancel), wants_progress

    def _begin(self, spec: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        """The Call for jsonrpcserver's wrappers, whose first argument is the message's context."""
        ctx: _Context = args[0]
        call, wants_progress = self._open_call(
            spec, ctx.peer, kwargs, ctx.cancel, positional=len(args) > 1, fd=ctx.fd, fd_error=ctx.fd_error
        )
        if wants_progress and ctx.notify is not None and ctx.request_id is not None:
            call.progress = Progress(ctx.notify, ctx.request_id)
        return call

    def _record(self, name: str, peer: Peer, kind: str | None, start: float, call: Call | None) -> None:
        if not self._observers:
            return
        record = CallRecord(name, peer, kind, time.monotonic() - start, call.facts if call is not None else {})
        for observe in self._observers:
            try:
                observe(record)
            except Exception:
                log.exception("a call observer failed")

    @staticmethod
    def _result(name: str, result: Any, call: Call, reply_fds: list[int] | None) -> dict[str, Any]:
        """The handler's result as a plain dict; descriptors it made for the reply go to
        ``reply_fds``, the transport's. None: the reply cannot carry them (a batch, a
        notification, or a quick method, which is pure and answers from the loop)."""
        if type(result) is not dict:
            if not isinstance(result, Mapping):
                log.error("method %s returned %s, not an object", name, type(result).__name__)
                raise InvalidCall(INTERNAL_ERROR, "internal error", "internal")
            result = dict(result)
        if call.reply_fds:
            if reply_fds is None:
                raise InvalidParams(f"{name}: only a single request to a method that runs on a worker can get a "
                                    "descriptor back, not a batch or a notification")
            reply_fds.extend(call.reply_fds)
            call.reply_fds.clear()
        plain: dict[str, Any] = result
        return plain

    @staticmethod
    def _failure(name: str, exc: Exception, call: Call | None = None) -> tuple[str, JsonRpcError]:
        """The kind a failed call is recorded with, and the JSON-RPC error its caller gets.

        Descriptors the handler made for the reply are closed: an error carries none."""
        if call is not None and call.reply_fds:
            _close_fds(call.reply_fds)
            call.reply_fds.clear()
        if isinstance(exc, InvalidCall):
            return exc.kind, exc.error
        if isinstance(exc, AzaionError):
            return exc.kind, _raise(exc)
        log.error("method %s failed", name, exc_info=exc)
        return "internal", JsonRpcError(INTERNAL_ERROR, "internal error", {"kind": "internal"})

    def _run_quick(self, spec: MethodSpec) -> Callable[..., dict[str, Any]]:
        """A quick method as a plain call: ``(ctx, *args, **params)`` -> its result object.

        Fails with JsonRpcError. jsonrpcserver's synchronous dispatch calls it.
        """
        handler, name, record = spec.handler, spec.name, self._record

        def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
            start = time.monotonic()
            call: Call | None = None
            kind: str | None = "internal"
            try:
                call = self._begin(spec, args, kwargs)
                result = self._result(name, handler(call), call, None)
                kind = None
                return result
            except Exception as exc:
                kind, error = self._failure(name, exc, call)
                raise error from None
            finally:
                record(name, args[0].peer, kind, start, call)

        return run

    @staticmethod
    def _as_method(run: Callable[..., dict[str, Any]]) -> Callable[..., Result]:
        """``run`` as a jsonrpcserver method (it returns a Result)."""

        def method(*args: Any, **kwargs: Any) -> Result:
            return Success(run(*args, **kwargs))

        # jsonrpcserver binds every call against the method's signature; a ready one skips
        # inspect's work, and *args/**kwargs never fails to bind, so params errors stay ours.
        method.__signature__ = _WRAPPER_SIGNATURE  # type: ignore[attr-defined]
        return method

    def _wrap_async(self, spec: MethodSpec) -> Callable[..., Awaitable[Result]]:
        handler, name, blocking, record = spec.handler, spec.name, spec.blocking, self._record

        async def method(*args: Any, **kwargs: Any) -> Result:
            start = time.monotonic()
            ctx: _Context = args[0]
            call: Call | None = None
            kind: str | None = "internal"
            try:
                call = self._begin(spec, args, kwargs)
                if blocking:
                    reserved = self._reserve_inline(spec, ctx, kwargs)
                    result = await self._run_thread(handler, call, ctx)
                    self._settle_inline(ctx, reserved, result)
                else:
                    result = handler(call)
                out = Success(self._result(name, result, call, ctx.reply_fds))
                kind = None
                return out
            except asyncio.CancelledError:
                kind = "cancelled"
                raise
            except Exception as exc:
                kind, error = self._failure(name, exc, call)
                raise error from None
            finally:
                record(name, ctx.peer, kind, start, call)

        method.__signature__ = _WRAPPER_SIGNATURE  # type: ignore[attr-defined]
        return method

    def _reserve_inline(self, spec: MethodSpec, ctx: _Context, params: Mapping[str, Any]) -> int:
        """Take a batch element's worst case from the batch's inline budget, or refuse it."""
        if ctx.budget is None:
            return 0
        need = inline_need(spec.name, params, ctx.budget, self.limits)
        ctx.budget -= need
        return need

    def _settle_inline(self, ctx: _Context, reserved: int, result: Mapping[str, Any]) -> None:
        if ctx.budget is None:
            return
        used = inline_used(result)
        if used > reserved:  # a reply larger than it reserved: never let the batch grow past its cap
            ctx.budget -= used - reserved
            if ctx.budget < 0:
                raise TooLarge("the batch is over its inline byte limit: pass a descriptor")

    async def _run_thread(
        self, handler: Callable[[Call], Mapping[str, Any]], call: Call, ctx: _Context
    ) -> Mapping[str, Any]:
        peer = call.peer
        self._slots.acquire(peer)
        try:
            future = self._executor.submit(handler, call)
        except BaseException:
            self._slots.release(peer)
            raise
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
        finally:
            # The slot is the member's until its thread is free, also after a cancellation.
            if future.done():
                self._slots.release(peer)
            else:
                loop = asyncio.get_running_loop()
                future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._slots.release, peer))

    # -- lines ---------------------------------------------------------------------------

    def quick(self, line: bytes, peer: Peer, cancel: threading.Event) -> bytes | None:
        """The reply line to a line that is one quick request, served synchronously; None when
        the line is anything else, for ``handle``.

        A quick request has an id, named (or no) params, a method that runs on the loop, and
        no descriptor (the transport calls this only for lines without one). Those are the
        calls fleets make thousands of times a second (health, status), and jsonrpcserver's
        dispatch would cost more than the rest of their round trip together
        (docs/architecture.md). The checks, observers and reply bytes are the ones ``handle``
        gives for the same line (tests/test_dispatch.py holds the two to the same bytes).
        """
        request = quick_request(line)
        if request is None:
            return None
        name, id_, params = request
        spec = self._quick_specs.get(name)
        if spec is None:
            return None
        start = time.monotonic()
        call: Call | None = None
        kind: str | None = "internal"
        try:
            if params or spec.params or spec.access is not Access.OPEN:
                call, _ = self._open_call(spec, peer, params, cancel)
            else:
                # Nothing to check (health, status and unlock_status as clients call them), and
                # skipping the call to _open_call saves 5-8 % of this path's CPU (bench_observers).
                call = Call(peer, params, None, cancel)
            result = self._result(name, spec.handler(call), call, None)
            kind = None
            return result_line(result, id_)
        except Exception as exc:
            kind, error = self._failure(name, exc, call)
            return encode_reply({"jsonrpc": "2.0", "error": _error_dict(error), "id": id_}) + b"\n"
        finally:
            # _record, inlined: on this path its call is a fifth of what the observers cost.
            observers = self._observers
            if observers:
                record = CallRecord(name, peer, kind, time.monotonic() - start, call.facts if call is not None else {})
                for observe in observers:
                    try:
                        observe(record)
                    except Exception:
                        log.exception("a call observer failed")

    async def handle(
        self,
        line: bytes,
        peer: Peer,
        fds: Sequence[int] = (),
        reply_fds: list[int] | None = None,
        *,
        cancel: threading.Event | None = None,
        notify: Notify | None = None,
    ) -> bytes | None:
        """The reply line for one received line (newline stripped), or None when none is due.

        Takes ownership of ``fds``: they are closed once every handler of the line returned.
        ``cancel`` becomes ``Call.cancel`` of the calls of this line (default: the
        dispatcher's own event, set at shutdown). ``notify`` sends one complete line
        (newline included) to the caller ahead of the reply; it may be called from worker
        threads, and is used only for a single request that passed ``"progress": true``.
        Descriptors a handler passes back are appended to ``reply_fds`` (the transport sends
        them with the reply and closes them); without that list a call cannot pass any.
        """
        ctx: _Context | None = None
        event = cancel if cancel is not None else self.cancel
        try:
            items: list[Any] | None = None
            try:
                text = line.decode("utf-8")
                # Most lines are one object: skip the whitespace scan for them.
                first = 0 if line[:1] == b"{" else WHITESPACE.match(text).end()  # type: ignore[union-attr]
                if text.startswith("[", first):
                    items = await parse_batch(text, first, self.limits.max_batch)
                else:
                    obj = decoder.decode(text)
            except TooManyElements:
                message = f"a batch may hold at most {self.limits.max_batch} elements"
                return error_line(TOO_LARGE, message, "too_large")
            except (ValueError, RecursionError):
                return PARSE_ERROR_LINE
            del text
            if items is not None:
                if not items:
                    return INVALID_REQUEST_LINE
                ctx = _Context(peer, fds, batch=True, cancel=event, notify=None, budget=self.limits.batch_inline_bytes)
                return await self._batch(items, ctx)
            if type(obj) is not dict or not shape_ok(obj):
                return INVALID_REQUEST_LINE
            ctx = _Context(peer, fds, batch=False, cancel=event, notify=notify, budget=None,
                           reply_fds=reply_fds if "id" in obj else None)
            return await self._single(obj, ctx)
        finally:
            if ctx is None or not ctx.deferred:
                _close_fds(fds)

    async def _single(self, obj: dict[str, Any], ctx: _Context) -> bytes | None:
        ctx.request_id = obj.get("id")
        spec = self.table.get(obj["method"])
        # Our deserializer takes the parsed object as it is (no typing.cast: it costs a call).
        request: Any = obj
        if spec is None or not spec.blocking:
            # Quick methods and unknown names: the synchronous dispatch, no task, no extra turn.
            reply = dispatch_to_serializable(
                request, self._quick, context=ctx, deserializer=_identity, validator=_identity
            )
        else:
            reply = await async_dispatch_to_serializable(
                request, self._async, context=ctx, deserializer=_identity, validator=_identity
            )
        if reply is None:
            return None  # a notification: no reply, whatever happened
        return encode_reply(fix_error(reply)) + b"\n"  # type: ignore[arg-type]

    async def _batch(self, items: list[Any], ctx: _Context) -> bytes | None:
        parts: list[bytes] = []
        for first in range(0, len(items), SLICE):
            if first:
                await asyncio.sleep(0)  # let other connections and the watchdog run
            chunk = items[first : first + SLICE]
            good = [item for item in chunk if shape_ok(item)]
            replies: list[Any] = []
            if good:
                request: Any = good
                if all(not getattr(self.table.get(item["method"]), "blocking", False) for item in good):
                    answer = dispatch_to_serializable(
                        request, self._quick, context=ctx, deserializer=_identity, validator=_identity
                    )
                else:
                    answer = await async_dispatch_to_serializable(
                        request, self._async, context=ctx, deserializer=_identity, validator=_identity
                    )
                if isinstance(answer, list):
                    replies = answer
                elif answer is not None:
                    # jsonrpcserver failed as a whole and gave one error: give it to every request.
                    replies = [error_obj(INTERNAL_ERROR, "internal error", "internal", item.get("id"))
                               for item in good if "id" in item]
            # Put each bad element's error where it stood; jsonrpcserver kept the order of the rest.
            answered = iter(replies)
            for item in chunk:
                if not shape_ok(item):
                    parts.append(_INVALID_REQUEST_PART)
                elif "id" in item:
                    parts.append(encode_reply(fix_error(next(answered))))
            del chunk, good, replies
        if not parts:
            return None
        return b"[" + b",".join(parts) + b"]\n"


class InvalidCall(Exception):
    """A call refused before its handler ran, with its JSON-RPC error."""

    def __init__(self, code: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.error = JsonRpcError(code, message, {"kind": kind})
