"""AsyncClient: the Client's methods as coroutines, over grpc.aio, for asyncio pipelines."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from hessd.client import _requests
from hessd.client._client import (
    _AboutAFunction,
    _Kinds,
    _with_spec,
)
from hessd.client._errors import NotFound, from_rpc_error
from hessd.client._requests import Function, Points, Spectrum
from hessd.proto import stream
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
        timeout: float | None = None,
    ) -> Function:
        dtype = np.dtype(dtype)
        # The platform to export for, asked of the server only when there is a callable.
        backend: str = (await self.server_info())["backend"] if callable(function) else ""
        request = _requests.register_request(
            function, inputs, constants, dtype, lambda: backend, warmup, warmup_kinds
        )
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
        call = _requests.compute_request(f, kind, points, **options)
        if max(call.input_bytes, call.output_bytes) <= self.stream_threshold:
            return call.result(await self._call_on(f, self._stub.Compute, call.filled(), timeout))
        try:
            return await self._streamed(call, timeout)
        except NotFound:
            if f.spec is None:
                raise
            call.request = _with_spec(call.request, f)
            return await self._streamed(call, timeout)

    async def _streamed(
        self, call: _requests.ComputeCall, timeout: float | None
    ) -> np.ndarray | dict[str, np.ndarray]:
        messages = stream.send("compute_request", call.request, call.arrays)
        try:
            replies = self._stub.ComputeStream(messages, **self._call_options(timeout))
            # The stream's messages are small; gathering them keeps `receive` one function.
            header, buffers = stream.receive(
                [m async for m in replies], "compute_response", max_bytes=1 << 62
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return call.result(header, buffers)

    async def spectrum(
        self,
        f: Function,
        points: Points,
        method: str = "exact",
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> Spectrum:
        request = _requests.spectrum_request(f, points, method, **options)
        reply = await self._call_on(f, self._stub.Spectrum, request, timeout)
        return _requests.spectrum_result(reply)

    async def _call_on(
        self,
        f: Function,
        method: Callable[..., Any],
        request: _AboutAFunction,
        timeout: float | None,
    ) -> Any:
        try:
            return await self._call(method, request, timeout)
        except NotFound:
            if f.spec is None:
                raise
            return await self._call(method, _with_spec(request, f), timeout)

    async def _call(
        self, method: Callable[..., Any], request: Message, timeout: float | None
    ) -> Any:
        try:
            return await method(request, **self._call_options(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
