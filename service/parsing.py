"""Request bytes that do not parse are the client's error: INVALID_ARGUMENT, not INTERNAL.

gRPC Python answers a request its deserializer cannot parse with INTERNAL "Exception
deserializing request!", and INTERNAL is reserved for bugs in hessd. This interceptor wraps
every handler's deserializer so that a failure yields a marker instead of raising, and the
handler, seeing the marker, aborts with INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from hessd.service.errors import InvalidArgument

__all__ = ["ParseErrors"]


class _Unparsable:
    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError, or anything protobuf raises on bad bytes
            return _Unparsable(e)

    return parse


def _refuse(context: grpc.ServicerContext, method: str) -> None:
    context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request's bytes do not parse as the message {method} takes; send a message "
        "serialised from hessd's .proto (proto/v1/hessd.proto)",
    )


class ParseErrors(grpc.ServerInterceptor):
    """Turns unparsable request bytes into INVALID_ARGUMENT for every method it wraps."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        options = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            unary = handler.unary_unary

            def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                if isinstance(request, _Unparsable):
                    _refuse(context, method)
                return unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **options)

        def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for request in requests:
                if isinstance(request, _Unparsable):
                    # Raised inside the servicer's handler, which maps it to its status.
                    raise InvalidArgument(
                        f"a message of the stream does not parse as the message {method} "
                        "takes; send messages serialised from hessd's .proto"
                    )
                yield request

        if handler.stream_stream:
            streaming = handler.stream_stream

            def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return streaming(checked(requests, context), context)

            return grpc.stream_stream_rpc_method_handler(stream_stream, **options)
        if handler.stream_unary:
            collecting = handler.stream_unary

            def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                return collecting(checked(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **options)
        return handler
