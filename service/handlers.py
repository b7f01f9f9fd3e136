"""The server's gRPC handlers, on its asyncio event loop.

The event loop (one thread, `hessd-loop`) owns the transport: it parses requests, checks
tokens, reads streams, runs the fast path and the batcher, and encodes answers. Nothing on
it blocks. Work that can take long runs on one of two thread pools:

  workers  the full path: HessdServicer's methods as written (synchronous), for the first
           call of a computation, registrations, spectra, objectives, sparse, the Open
           Inference Protocol. Each runs with a ThreadContext standing for its call.
  device   the fast path's engine calls: batches of repeated Computes (service/fastpath.py,
           Batcher.run_async).

So a call waiting for a batch, or a stream whose client is slow to send, holds no thread;
health checks (grpc.health.v1, served on the loop) answer whatever the pools are doing.

Router is the one generic handler of hessd.v1.Hessd and the Open Inference Protocol: it
refuses new calls while the server drains (UNAVAILABLE), checks the bearer token
(UNAUTHENTICATED) and each token's max_concurrent (RESOURCE_EXHAUSTED), and gives every
method a lenient deserializer, so that bytes which do not parse are INVALID_ARGUMENT.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from hessd.proto import codec, stream
from hessd.proto.v1 import hessd_pb2
from hessd.service import fastpath, parsing
from hessd.service.errors import (
    Cancelled,
    InvalidArgument,
    ServiceError,
)
from hessd.service.security import UNAUTHENTICATED, InFlight, Principal, Tokens
from hessd.service.servicer import (
    HessdServicer,
    Streamed,
    bounded,
    compute_response,
    failure_status,
    stream_error,
    stream_idle,
    streams_busy,
)

__all__ = ["Collector", "Router", "RouterBase", "ThreadContext", "hessd_handlers"]

logger = logging.getLogger(__name__)

_AsyncBehavior = Callable[[Any, grpc.aio.ServicerContext], Any]


class Aborted(Exception):
    """ThreadContext.abort: the call ends with this status, answered on the loop."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(code, details)
        self.code, self.details = code, details


class ThreadContext:
    """What a synchronous handler on a worker thread sees of its call: the part of
    grpc.ServicerContext the servicer uses. abort() raises Aborted, which the loop turns
    into the status; is_active() is false once the call is cancelled, its deadline has
    passed, or the server has stopped waiting for it."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self._context = context
        self._metadata = context.invocation_metadata()
        remaining = context.time_remaining()
        self._deadline = math.inf if remaining is None else time.monotonic() + remaining
        self.gone = False

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]] | None:
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline == math.inf:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return not self.gone and not self._context.done() and time.monotonic() < self._deadline

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Aborted(code, details)


async def in_thread(
    executor: Executor,
    behavior: Callable[[Any, Any], Any],
    request: Any,
    context: grpc.aio.ServicerContext,
) -> Any:
    """`behavior(request, ThreadContext)` on `executor`; its abort becomes the status."""
    call = ThreadContext(context)
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, behavior, request, call)
    except Aborted as e:
        await context.abort(e.code, e.details)
    except asyncio.CancelledError:
        call.gone = True  # cancelled, or the server stopped waiting: is_active says so
        raise


def threaded(
    executor: Executor, behavior: Callable[[Any, Any], Any], method: str
) -> _AsyncBehavior:
    """A synchronous unary behavior as an async one that runs it on `executor`."""

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, parsing.Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, parsing.refusal(method))
        return await in_thread(executor, behavior, request, context)

    return handler


class Collector:
    """Stands in for a grpc.Server to an add_*_to_server function, collecting the method
    handlers it adds by their full method name."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def resolve(self, methods: Sequence[str]) -> dict[str, grpc.RpcMethodHandler]:
        """The handler of each of `methods`, from those added either way."""
        found = {}
        for method in methods:
            handler = self.handlers.get(method)
            for generic in self._generic:
                if handler is not None:
                    break
                handler = generic.service(_Details(method))
            if handler is None:
                raise LookupError(f"no handler was added for {method}")
            found[method] = handler
        return found


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str):
        self.method = method
        self.invocation_metadata = ()


def _threaded_handlers(
    handlers: dict[str, grpc.RpcMethodHandler], executor: Executor
) -> dict[str, grpc.RpcMethodHandler]:
    """Synchronous unary handlers as async ones on `executor`, deserializing leniently."""
    wrapped = {}
    for method, handler in handlers.items():
        if handler.unary_unary is None:
            raise TypeError(f"{method}: only unary methods run on the worker threads")
        wrapped[method] = grpc.unary_unary_rpc_method_handler(
            threaded(executor, handler.unary_unary, method),
            request_deserializer=parsing.lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    return wrapped


def hessd_handlers(
    servicer: HessdServicer,
    workers: Executor,
    device: Executor,
) -> dict[str, grpc.RpcMethodHandler]:
    """hessd.v1.Hessd's handlers: Compute's fast path, the streams read on the loop, and
    every other method on the worker threads."""
    from hessd.proto.v1 import hessd_pb2_grpc

    collector = Collector()
    hessd_pb2_grpc.add_HessdServicer_to_server(servicer, collector)
    service = hessd_pb2.DESCRIPTOR.services_by_name["Hessd"]
    methods = [f"/{service.full_name}/{m.name}" for m in service.methods]
    plain = collector.resolve(methods)
    streamed = {f"/{service.full_name}/{name}" for name in ("ComputeStream", "PutStream")}
    handlers = _threaded_handlers({m: h for m, h in plain.items() if m not in streamed}, workers)
    calls = _Calls(servicer, workers, device)
    compute = f"/{service.full_name}/Compute"
    handlers[compute] = grpc.unary_unary_rpc_method_handler(
        calls.compute,
        request_deserializer=parsing.lenient(hessd_pb2.ComputeRequest.FromString),
        response_serializer=_compute_serialized,
    )
    handlers[f"/{service.full_name}/ComputeStream"] = grpc.stream_stream_rpc_method_handler(
        calls.compute_stream,
        request_deserializer=None,  # _receive parses the bytes, each chunk copied once
        response_serializer=None,  # compute_stream yields StreamMessages serialised
    )
    handlers[f"/{service.full_name}/PutStream"] = grpc.stream_unary_rpc_method_handler(
        calls.put_stream,
        request_deserializer=None,
        response_serializer=hessd_pb2.PutResponse.SerializeToString,
    )
    return handlers


def _compute_serialized(response: hessd_pb2.ComputeResponse | bytes) -> bytes:
    """A Compute's answer on the wire: the fast path's comes serialised already."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def threaded_handlers(
    add: Callable[[Any], None], methods: Sequence[str], workers: Executor
) -> dict[str, grpc.RpcMethodHandler]:
    """The handlers `add(server)` adds for `methods` (synchronous, unary), on `workers`."""
    collector = Collector()
    add(collector)
    return _threaded_handlers(collector.resolve(methods), workers)


class _Calls:
    """The async behaviors of Compute and the two streams."""

    def __init__(
        self,
        servicer: HessdServicer,
        workers: Executor,
        device: Executor,
    ):
        self.servicer, self.workers, self.device = servicer, workers, device
        config = servicer.config
        # Streams being read at once (their buffers are allocated as the header declares).
        self._stream_limit = max(1, config.workers // 2)
        self._streams = 0

    async def compute(
        self, request: hessd_pb2.ComputeRequest, context: grpc.aio.ServicerContext
    ) -> hessd_pb2.ComputeResponse | bytes:
        if isinstance(request, parsing.Unparsable):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, parsing.refusal("/hessd.v1.Hessd/Compute")
            )
        planned = self.servicer.plan_of(request)
        if planned is not None:
            return await self._planned(*planned, request, context)
        return await in_thread(self.workers, self.servicer.Compute, request, context)

    def _quick(self, plan: fastpath.Plan, args: Sequence[np.ndarray]) -> bool:
        """Whether a batch of `plan` is short enough to run on the loop: compiled, and
        its last call took under fastpath.QUICK_SECONDS for as many points."""
        points = next(a for i, a in enumerate(args) if i not in plan.task.shared).shape[0]
        if plan.expected_seconds(points) > fastpath.QUICK_SECONDS:
            return False
        return self.servicer.engine.compiled(plan.program, plan.task, args)

    async def _planned(
        self,
        plan: fastpath.Plan,
        args: list[np.ndarray],
        batch: int,
        request: hessd_pb2.ComputeRequest,
        context: grpc.aio.ServicerContext,
    ) -> hessd_pb2.ComputeResponse | bytes:
        """A Compute of a key seen before: the full path's checks already hold."""
        servicer = self.servicer
        start = time.perf_counter()
        status, message = grpc.StatusCode.OK, ""
        held = 0
        bound = servicer.config.max_call_seconds
        remaining = context.time_remaining()
        give_up = start + min(bound or math.inf, math.inf if remaining is None else remaining)

        def is_active() -> bool:
            return not context.done() and time.perf_counter() < give_up

        try:
            nbytes = batch * plan.point_bytes
            if nbytes > servicer.config.max_output_bytes:
                servicer.check_output(plan.program, plan.task, batch)  # raises, saying why
            temp = plan.temp_bytes(batch, servicer.engine, args)
            held = servicer.admit(sum(a.nbytes for a in args) + nbytes + temp)
            try:
                result = await servicer.batcher.run_async(
                    plan.program,
                    plan.task,
                    args,
                    executor=self.device,
                    is_active=is_active,
                    key=plan,
                    quick=functools.partial(self._quick, plan),
                    timed=plan.timed,
                )
            except Cancelled:
                elapsed = time.perf_counter() - start
                if bound and elapsed > bound:
                    raise servicer.overran() from None
                if remaining is not None and elapsed > remaining:
                    raise servicer.deadline_passed() from None
                raise
            servicer.metrics.observe_compute(plan.task.label, time.perf_counter() - start)
            if isinstance(result, np.ndarray):
                return stream.serialized_output(result)
            return compute_response(result)
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            status, message = failure_status("Compute", e, not context.done())
        finally:
            if held:
                servicer.release(held)
            servicer.record_call(
                "Compute", plan.label, batch, request.function_id, context, status,
                time.perf_counter() - start,
            )  # fmt: skip
        await context.abort(status, bounded(message))
        raise AssertionError("context.abort returned")

    async def compute_stream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        limit = self.servicer.config.max_request_bytes
        received = await self._receive(
            "ComputeStream", requests, context, "compute_request", limit, ""
        )
        messages = await in_thread(self.workers, self.servicer.ComputeStream, received, context)
        async for message in _ahead(messages, self.workers):
            yield message

    async def put_stream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> hessd_pb2.PutResponse:
        config = self.servicer.config
        limit = min(config.max_request_bytes, config.max_resident_bytes)
        received = await self._receive(
            "PutStream", requests, context, "put_request", limit,
            " (--max-resident-bytes, --max-request-bytes)",
        )  # fmt: skip
        return await in_thread(self.workers, self.servicer.PutStream, received, context)

    async def _receive(
        self,
        method: str,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        field: str,
        limit: int,
        flags: str,
    ) -> Streamed:
        """Read a stream on the loop, from its messages' bytes: its header and tensors'
        bytes, each data chunk copied once into its tensor. A stream that sends
        nothing for --stream-idle-seconds is cancelled; one beyond the streams this server
        reads at once is RESOURCE_EXHAUSTED."""
        start = time.perf_counter()
        receiver = stream.Receiver(field, limit)
        idle = self.servicer.config.stream_idle_seconds or None
        try:
            if self._streams >= self._stream_limit:
                raise streams_busy(self._stream_limit)
            self._streams += 1
            try:
                iterator = aiter(requests)
                while True:
                    try:
                        message = await asyncio.wait_for(anext(iterator), idle)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        assert idle is not None  # wait_for times out only with a bound
                        raise stream_idle(idle) from None
                    try:
                        receiver.feed_serialized(message)
                    except DecodeError:
                        raise InvalidArgument(
                            parsing.refusal(f"/hessd.v1.Hessd/{method}", True)
                        ) from None
                header, buffers = receiver.finish()
            finally:
                self._streams -= 1
        except (codec.TensorError, ServiceError) as e:
            error = stream_error(e, flags)
            assert error is not None  # both kinds have a status
            summary = receiver.header or hessd_pb2.ComputeRequest()
            self.servicer.record(method, summary, context, error.code, time.perf_counter() - start)
            await context.abort(error.code, bounded(error.message))
        return Streamed.of(header, buffers)


# Messages of a streamed result made ahead of the one being sent.
_AHEAD = 4


async def _ahead(messages: Iterator[bytes], executor: Executor) -> AsyncIterator[bytes]:
    """`messages` (serialised), made on `executor` at most _AHEAD ahead of the loop that
    sends them: each is a ~1 MiB copy of the result, which on the loop itself would stall
    what the loop sends and serves meanwhile (a 256 MiB Jacobian measured 15-20% slower so,
    a packed Hessian 35%)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    room = threading.Semaphore(_AHEAD)
    stopped = False
    end = object()

    def produce() -> None:
        try:
            for message in messages:
                room.acquire()
                if stopped:
                    return
                loop.call_soon_threadsafe(queue.put_nowait, message)
            loop.call_soon_threadsafe(queue.put_nowait, end)
        except BaseException as e:  # handed to the loop, which raises it
            loop.call_soon_threadsafe(queue.put_nowait, _Failed(e))

    producing = loop.run_in_executor(executor, produce)
    try:
        while (message := await queue.get()) is not end:
            if isinstance(message, _Failed):
                raise message.error
            room.release()
            yield message
    finally:
        stopped = True
        room.release()  # a producer waiting for room wakes, sees `stopped`, and ends
        del producing  # not awaited: the thread ends by itself once it sees `stopped`


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class RouterBase(grpc.GenericRpcHandler):
    """The generic handler of the methods in `handlers` (full name → handler): drain,
    tokens and each token's max_concurrent, then the method's handler; `active` counts the
    calls in flight, which a drain waits for. Each transport's Router says how a handler
    of its kind is refused, counted and bounded."""

    def __init__(
        self,
        handlers: dict[str, grpc.RpcMethodHandler],
        tokens: Tokens,
        draining: Callable[[], bool],
    ):
        self.tokens = tokens
        self.draining = draining
        self.in_flight = InFlight()
        self.active = 0
        self.handlers = {method: self._counted(h) for method, h in handlers.items()}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = self.handlers.get(handler_call_details.method)
        if handler is None:
            return None
        if self.draining():
            return self._refuse(
                handler,
                grpc.StatusCode.UNAVAILABLE,
                "this server is shutting down; retry another replica",
            )
        principal = self.tokens.identify(handler_call_details.invocation_metadata)
        if principal is None:
            return self._refuse(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)
        if principal.max_concurrent is None:
            return handler
        return self._bounded(handler, principal)

    @abc.abstractmethod
    def _refuse(
        self, handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
    ) -> grpc.RpcMethodHandler:
        """A handler in place of `handler` that answers `code` at once, reading nothing."""

    @abc.abstractmethod
    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler`, counted in `active` for as long as it runs."""

    @abc.abstractmethod
    def _bounded(
        self, handler: grpc.RpcMethodHandler, principal: Principal
    ) -> grpc.RpcMethodHandler:
        """`handler`, counted against its token's max_concurrent for as long as it runs."""


class Router(RouterBase):
    """The asyncio transport's router: its handlers are coroutines."""

    def _refuse(
        self, handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
    ) -> grpc.RpcMethodHandler:
        refuse = _refusal_behavior(code, message)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)

    def _counted(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        async def enter(context: grpc.aio.ServicerContext) -> None:
            self.active += 1

        def leave() -> None:
            self.active -= 1

        return _around(handler, enter, leave)

    def _bounded(
        self, handler: grpc.RpcMethodHandler, principal: Principal
    ) -> grpc.RpcMethodHandler:
        in_flight = self.in_flight

        async def enter(context: grpc.aio.ServicerContext) -> None:
            if reason := in_flight.enter(principal):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)

        return _around(handler, enter, lambda: in_flight.leave(principal))


def _around(
    handler: grpc.RpcMethodHandler,
    enter: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
    leave: Callable[[], None],
) -> grpc.RpcMethodHandler:
    """`handler` (async), with `enter` awaited before it runs (it may abort the call) and
    `leave` called once it has ended, a streamed result's last message sent included."""
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.stream_stream is not None:
        streaming = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await enter(context)
            try:
                async for message in streaming(requests, context):
                    yield message
            finally:
                leave()

        return grpc.stream_stream_rpc_method_handler(stream_stream, **options)
    behavior = handler.unary_unary or handler.stream_unary
    assert behavior is not None  # hessd has no server-streaming methods

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await enter(context)
        try:
            return await behavior(request, context)
        finally:
            leave()

    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **options)
    return grpc.unary_unary_rpc_method_handler(unary, **options)


@functools.cache
def _refusal_behavior(code: grpc.StatusCode, message: str) -> Callable[..., Awaitable[None]]:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return refuse
