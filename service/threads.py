"""The threaded transport (--server threads; the default is --server aio): hessd.v1's and
the Open Inference Protocol's handlers for a grpc.server over a pool of threads.

Each call runs on a pool thread from its first byte to its answer: the servicer's methods
as written, with Compute's fast path inside HessdServicer.Compute. What the asyncio
transport does on its event loop (service/handlers.py) is done here per thread: the
router's drain, token and max_concurrent checks, lenient parsing (bytes that do not parse
are INVALID_ARGUMENT), and reading streams, which take at most half the threads and are
cancelled when their client sends nothing for --stream-idle-seconds.

It is the older model, kept for comparison and for machines where it measures faster: on
the 2-core machine here, quiet, it served 1,583 small calls/s at 64 in flight against the
asyncio transport's 1,999 (before batches on the event loop waited for company, which took
the asyncio transport to ~3,400); with other processes busy on the same cores it did better
than the asyncio one then. What it cannot promise is the asyncio transport's: with every thread
computing, a health check waits for one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from hessd.proto import stream
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc
from hessd.service import parsing
from hessd.service.errors import InvalidArgument
from hessd.service.handlers import Collector, RouterBase
from hessd.service.security import Principal, Tokens
from hessd.service.servicer import (
    HessdServicer,
    Streamed,
    abort,
    bounded,
    stream_error,
    stream_idle,
    streams_busy,
)

__all__ = ["Router", "hessd_handlers", "plain_handlers"]


_Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _checked(behavior: _Behavior, method: str) -> _Behavior:
    """`behavior`, answering INVALID_ARGUMENT for a request that did not parse."""

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, parsing.Unparsable):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, parsing.refusal(method))
        return behavior(request, context)

    return unary


def plain_handlers(
    add: Callable[[Any], None], methods: Sequence[str]
) -> dict[str, grpc.RpcMethodHandler]:
    """The unary handlers `add(server)` adds for `methods`, parsing leniently."""
    collector = Collector()
    add(collector)
    return {
        method: grpc.unary_unary_rpc_method_handler(
            _checked(handler.unary_unary, method),
            request_deserializer=parsing.lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        for method, handler in collector.resolve(methods).items()
        if handler.unary_unary is not None
    }


def hessd_handlers(servicer: HessdServicer) -> dict[str, grpc.RpcMethodHandler]:
    """hessd.v1.Hessd's handlers: the unary methods as the servicer has them, and the two
    streams read here, then handed to the servicer as Streamed."""
    service = hessd_pb2.DESCRIPTOR.services_by_name["Hessd"]
    prefix = f"/{service.full_name}/"
    streamed = {prefix + "ComputeStream", prefix + "PutStream"}
    methods = [prefix + m.name for m in service.methods if prefix + m.name not in streamed]
    handlers = plain_handlers(
        lambda server: hessd_pb2_grpc.add_HessdServicer_to_server(servicer, server), methods
    )
    streams = _Streams(servicer)
    message = {
        "request_deserializer": parsing.lenient(hessd_pb2.StreamMessage.FromString),
    }
    handlers[prefix + "ComputeStream"] = grpc.stream_stream_rpc_method_handler(
        streams.compute_stream,
        response_serializer=None,  # the servicer's messages come serialised
        **message,
    )
    handlers[prefix + "PutStream"] = grpc.stream_unary_rpc_method_handler(
        streams.put_stream, response_serializer=hessd_pb2.PutResponse.SerializeToString, **message
    )
    return handlers


class _Streams:
    """ComputeStream and PutStream: read on the call's thread, then the servicer's half."""

    def __init__(self, servicer: HessdServicer):
        self.servicer = servicer
        config = servicer.config
        # Streams may take at most half the threads (at least one), so that idle or slow
        # uploads can never starve unary calls and health checks of a thread.
        self._limit = max(1, config.workers // 2)
        self._slots = threading.BoundedSemaphore(self._limit)

    def compute_stream(
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        limit = self.servicer.config.max_request_bytes
        received = self._receive("ComputeStream", requests, context, "compute_request", limit, "")
        return self.servicer.ComputeStream(received, context)

    def put_stream(
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> hessd_pb2.PutResponse:
        config = self.servicer.config
        limit = min(config.max_request_bytes, config.max_resident_bytes)
        flags = " (--max-resident-bytes, --max-request-bytes)"
        received = self._receive("PutStream", requests, context, "put_request", limit, flags)
        return self.servicer.PutStream(received, context)

    def _receive(
        self,
        method: str,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        field: str,
        limit: int,
        flags: str,
    ) -> Streamed:
        start = time.perf_counter()
        receiver = stream.Receiver(field, limit)
        watch = _IdleWatch(context, self.servicer.config.stream_idle_seconds)
        try:
            if not self._slots.acquire(blocking=False):
                raise streams_busy(self._limit)
            try:
                with watch:
                    for message in requests:
                        watch.last = time.monotonic()
                        if isinstance(message, parsing.Unparsable):
                            raise InvalidArgument(
                                parsing.refusal(f"/hessd.v1.Hessd/{method}", streamed=True)
                            )
                        receiver.feed(message)
                header, buffers = receiver.finish()
            finally:
                self._slots.release()
        except Exception as e:
            error = stream_idle(watch.seconds) if watch.expired else stream_error(e, flags)
            if error is not None:
                code, message = error.code, error.message
            elif not context.is_active():  # the client went away while sending
                code, message = grpc.StatusCode.CANCELLED, "the client cancelled the call"
            else:
                raise
            summary = receiver.header or hessd_pb2.ComputeRequest()
            self.servicer.record(method, summary, context, code, time.perf_counter() - start)
            abort(context, code, bounded(message))
        return Streamed.of(header, buffers)


class _IdleWatch:
    """Cancels a stream whose client sends nothing for `seconds` while it is read, so that
    a client that sends a header and waits cannot hold a thread for ever."""

    def __init__(self, context: grpc.ServicerContext, seconds: float):
        self.context, self.seconds = context, seconds
        self.last = time.monotonic()
        self.expired = False
        self._done = threading.Event()

    def __enter__(self) -> _IdleWatch:
        if self.seconds > 0:
            threading.Thread(target=self._watch, name="hessd-idle-watch", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.seconds / 4)):
            if time.monotonic() - self.last > self.seconds:
                self.expired = True
                self.context.cancel()
                return


class Router(RouterBase):
    """The threaded transport's router: its handlers are plain functions, run on threads."""

    def __init__(
        self,
        handlers: dict[str, grpc.RpcMethodHandler],
        tokens: Tokens,
        draining: Callable[[], bool],
    ):
        self._lock = threading.Lock()  # `active` changes on many threads
        super().__init__(handlers, tokens, draining)

    def _refuse(
        self, handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
    ) -> grpc.RpcMethodHandler:
        def refuse(request: object, context: grpc.ServicerContext) -> None:
            context.abort(code, message)

        return grpc.unary_unary_rpc_method_handler(refuse)

    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        streaming = handler.stream_stream is not None

        def counting(behavior: _Behavior) -> _Behavior:
            def counted(request: Any, context: grpc.ServicerContext) -> Any:
                self._count(1)
                try:
                    result = behavior(request, context)
                except BaseException:
                    self._count(-1)
                    raise
                if streaming:  # counted until its last response message is sent
                    return self._counting(result)
                self._count(-1)
                return result

            return counted

        return _rewrap(handler, counting)

    def _count(self, change: int) -> None:
        with self._lock:
            self.active += change

    def _counting(self, messages: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from messages
        finally:
            self._count(-1)

    def _bounded(
        self, handler: grpc.RpcMethodHandler, principal: Principal
    ) -> grpc.RpcMethodHandler:
        in_flight = self.in_flight

        def bounding(behavior: _Behavior) -> _Behavior:
            def bounded_call(request: Any, context: grpc.ServicerContext) -> Any:
                if reason := in_flight.enter(principal):
                    abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
                try:
                    return behavior(request, context)
                finally:
                    in_flight.leave(principal)

            return bounded_call

        return _rewrap(handler, bounding)


def _rewrap(
    handler: grpc.RpcMethodHandler, wrap: Callable[[_Behavior], _Behavior]
) -> grpc.RpcMethodHandler:
    """`handler` with its behavior wrapped. A stream-stream behavior returns its response
    iterator once it has read and computed, so the wrap spans its work."""
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream), **options)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary), **options)
    assert handler.unary_unary is not None  # hessd has no server-streaming methods
    return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary), **options)
