"""AsyncClient: the Client's methods as coroutines, over grpc.aio, for asyncio pipelines."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from hessd.client import _requests, _sparse
from hessd.client._client import (
    _AboutAFunction,
    _carries_spec,
    _Kinds,
    _names_a_resident_tensor,
    _with_spec,
)
from hessd.client._data import Handle
from hessd.client._errors import NotFound, from_rpc_error
from hessd.client._requests import Function, Points, Spectrum
from hessd.client._sparse import Sparsity
from hessd.proto import codec, stream
from hessd.proto.v1 import hessd_pb2

__all__ = ["AsyncClient"]


class AsyncClient(_Kinds):
    """Client, awaited:

        async with AsyncClient("127.0.0.1:50051") as c:
            f = await c.register("sum(x**2)", {"x": (3,)})
            g = await c.gradient(f, X)

    Methods, arguments, results and exceptions are those of Client.
    """

    _api = grpc.aio

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def server_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        reply = await self._call(self._stub.ServerInfo, hessd_pb2.ServerInfoRequest(), timeout)
        return _requests.server_info_result(reply)

    async def register(
        self,
        function: str | Callable,
        inputs: Mapping[str, Sequence[int] | int],
        constants: Mapping[str, Any] | None = None,
        dtype: str | np.dtype = "float32",
        *,
        warmup: Sequence[int] = (),
        warmup_kinds: Sequence[str] = ("value", "gradient"),
        name: str = "",
        timeout: float | None = None,
    ) -> Function:
        dtype = np.dtype(dtype)
        # The platform to export for, asked of the server only when there is a callable.
        backend: str = (await self.server_info())["backend"] if callable(function) else ""
        request = _requests.register_request(
            function, inputs, constants, dtype, lambda: backend, warmup, warmup_kinds
        )
        request.name = name
        reply = await self._call(self._stub.Register, request, timeout)
        return _requests.function_of(request, reply, dtype)

    async def compute(
        self,
        f: Function,
        kind: str,
        points: Points,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> np.ndarray | dict[str, np.ndarray]:
        call = _requests.compute_call(f, kind, points, options, self.stream_threshold)
        if isinstance(call, _requests.PlannedCall):
            return call.result(await self._call_on(f, self._compute, call.wire, timeout))
        if max(call.input_bytes, call.output_bytes) <= self.stream_threshold:
            reply = await self._call_on(f, self._compute, call.filled(), timeout, call.handles)
            return call.result(reply)
        try:
            return await self._streamed(call, timeout)
        except NotFound as e:
            if _names_a_resident_tensor(e):
                await self._put_again(call.handles, timeout)
            elif f.spec is None:
                raise
            else:
                call.request = _with_spec(call.request, f)
            return await self._streamed(call, timeout)

    async def put(
        self, array: Any, dtype: str | np.dtype | None = None, *, timeout: float | None = None
    ) -> Handle:
        """As Client.put."""
        array = np.ascontiguousarray(array if dtype is None else np.asarray(array, dtype))
        request = hessd_pb2.PutRequest()
        try:
            if array.nbytes <= self.stream_threshold:
                codec.encode(array, out=request.tensor)
                reply = await self._stub.Put(request, **self._call_options(timeout))
            else:
                codec.encode(array, out=request.tensor, data=False)
                messages = stream.send_serialized("put_request", request, [array])
                reply = await self._put_stream(messages, **self._call_options(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return Handle(reply.handle, array)

    async def _put_again(self, handles: Sequence[Handle], timeout: float | None) -> None:
        for handle in handles:
            await self.put(handle.array, timeout=timeout)

    async def _streamed(
        self, call: _requests.ComputeCall, timeout: float | None
    ) -> np.ndarray | dict[str, np.ndarray]:
        messages = stream.send_serialized("compute_request", call.request, call.arrays)
        try:
            replies = self._compute_stream(messages, **self._call_options(timeout))
            # Fed as they come: gathering them first would hold the result twice.
            receiver = stream.Receiver("compute_response", max_bytes=1 << 62)
            async for message in replies:
                receiver.feed_serialized(message)
            header, buffers = receiver.finish()
            assert isinstance(header, hessd_pb2.ComputeResponse)  # the field it reads
        except DecodeError as e:
            raise codec.TensorError(f"a message of the stream does not parse: {e}") from None
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return call.result(header, buffers)

    async def sparsity(
        self,
        f: Function,
        kind: str = "jacobian",
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> Sparsity:
        request = _sparse.sparsity_request(f, kind, **options)
        reply = await self._call_on(f, self._stub.Sparsity, request, timeout)
        return _sparse.sparsity_result(reply)

    async def spectrum(
        self,
        f: Function,
        points: Points,
        method: str = "exact",
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> Spectrum:
        request, handles = _requests.spectrum_request(f, points, method, **options)
        reply = await self._call_on(f, self._stub.Spectrum, request, timeout, handles)
        return _requests.spectrum_result(reply)

    async def _call_on(
        self,
        f: Function,
        method: Callable[..., Any],
        request: _AboutAFunction | bytes,
        timeout: float | None,
        handles: Sequence[Handle] = (),
    ) -> Any:
        """As Client._call_on."""
        for attempt in range(3):
            try:
                return await self._call(method, request, timeout)
            except NotFound as e:
                if attempt == 2:
                    raise
                if _names_a_resident_tensor(e) and handles:
                    await self._put_again(handles, timeout)
                elif f.spec is not None and not _carries_spec(request):
                    request = _with_spec(request, f)
                else:
                    raise
        raise AssertionError("unreachable")

    async def _call(
        self, method: Callable[..., Any], request: Message | bytes, timeout: float | None
    ) -> Any:
        try:
            return await method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
