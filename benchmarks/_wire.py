"""What one Compute call moves, and moving exactly those bytes through the echo server.

`compute_call` builds a request as `Client.compute` builds it, from hessd.proto alone (the
codec, the stream framing and the kinds contract for the result's shape): one unary
ComputeRequest up to the client's stream_threshold, above it a ComputeStream header and
~1 MiB chunks. `wire_of` turns it into the bytes the client sends and the sizes of the
messages hessd answers; `Floor` moves those through the echo server (benchmarks/_servers.py)
over a channel configured as the client's.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import grpc
import numpy as np

from hessd.client import CHANNEL_OPTIONS, Function
from hessd.proto import codec, stream
from hessd.proto.kinds import JacobianMode, Kind, Layout, result_shapes, unpack_triangles
from hessd.proto.v1 import hessd_pb2

from _servers import ECHO_SERVICE, SIZES_KEY

__all__ = ["CHANNEL_OPTIONS", "Call", "Floor", "Wire", "compute_call", "echo_channel", "wire_of"]

COMPUTE = f"/{ECHO_SERVICE}/Compute"
COMPUTE_STREAM = f"/{ECHO_SERVICE}/ComputeStream"


@dataclasses.dataclass
class Call:
    """A Compute request as the client sends it: the header (tensors described, data
    empty), the arrays in stream order (inputs, then vector), and the result's shape
    (batch, *per point) and dtype as they travel."""

    request: hessd_pb2.ComputeRequest
    arrays: list[np.ndarray]
    out_shape: tuple[int, ...]
    out_dtype: np.dtype
    unpack: int | None = None  # n, to unpack a packed Hessian into (n, n)

    @property
    def input_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def output_bytes(self) -> int:
        return math.prod(self.out_shape) * self.out_dtype.itemsize

    def streamed(self, threshold: int) -> bool:
        """Whether the client streams this call (its rule: either side over `threshold`)."""
        return max(self.input_bytes, self.output_bytes) > threshold

    def messages(self, streamed: bool) -> list[bytes]:
        """The serialized request messages, as gRPC sends them. Unary: the header's tensors
        are filled in place, as the client's are, so build a new Call for another."""
        if streamed:
            return [
                m.SerializeToString()
                for m in stream.send("compute_request", self.request, self.arrays)
            ]
        for array, (_, tensor) in zip(self.arrays, stream.tensors(self.request), strict=True):
            tensor.data = codec.little_endian(array).tobytes()
        return [self.request.SerializeToString()]

    def result(self, messages: list[bytes], streamed: bool) -> np.ndarray:
        """The client's decoding of the serialized response messages: parse, reassemble a
        stream, decode (a read-only view of the bytes), unpack a packed Hessian."""
        if streamed:
            parsed = [hessd_pb2.StreamMessage.FromString(m) for m in messages]
            reply, buffers = stream.receive(parsed, "compute_response", max_bytes=1 << 62)
        else:
            reply, buffers = hessd_pb2.ComputeResponse.FromString(messages[0]), [None]
        ((what, tensor),) = stream.tensors(reply)
        output = codec.decode(tensor, what, buffers[0])
        return output if self.unpack is None else unpack_triangles(output, self.unpack)


def compute_call(
    f: Function,
    kind: str,
    points: Any,
    *,
    vector: Any = None,
    mode: str = "auto",
    packed: bool = False,
) -> Call:
    """The Call of `Client.compute(f, kind, points, vector=..., mode=..., packed=...)`, the
    derivatives taken with respect to f's first input (the client's default)."""
    the_kind = Kind.parse(kind)
    request = hessd_pb2.ComputeRequest(
        function_id=f.id,
        kind=the_kind.wire,
        jacobian_mode=JacobianMode.parse(mode).wire,
        layout=Layout.NUMERATOR.wire,
        packed=packed,
    )
    if not isinstance(points, Mapping):
        points = {next(iter(f.inputs)): points}
    arrays = []
    for name, shape in f.inputs.items():
        array = codec.coerce(points[name], f.dtype, f"input {name!r}")
        codec.check_points(array, shape, f.dtype, f"input {name!r}")
        codec.encode(array, out=request.inputs.add(name=name).tensor, data=False)
        arrays.append(array)
    variable = next(iter(f.inputs.values()))
    if vector is not None:
        shape = f.output_shape if the_kind.vector_is_output_shaped else variable
        arrays.append(codec.coerce(vector, f.dtype, the_kind.vector_name))
        codec.check_points(arrays[-1], shape, f.dtype, the_kind.vector_name)
        codec.encode(arrays[-1], out=request.vector, data=False)
    (per_point,) = result_shapes(the_kind, variable, f.output_shape, packed=packed).values()
    call = Call(request, arrays, (arrays[0].shape[0], *per_point), np.dtype(f.dtype))
    if packed:
        call.unpack = math.prod(variable)
    return call


@dataclasses.dataclass(frozen=True)
class Wire:
    """What one Compute call moves: the serialized request messages the client sends (one
    for a unary call) and the sizes of the response messages the server sends back."""

    streamed: bool
    request: list[bytes]
    response: list[int]

    @property
    def bytes_in(self) -> int:
        return sum(len(m) for m in self.request)

    @property
    def bytes_out(self) -> int:
        return sum(self.response)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        runs = [f"{size}*{len(list(run))}" for size, run in itertools.groupby(self.response)]
        return ((SIZES_KEY, ",".join(runs)),)


def wire_of(
    f: Function, kind: str, points: Any, options: Mapping[str, Any], threshold: int
) -> Wire:
    """The messages Client.compute(f, kind, points, **options) exchanges with hessd: the
    request as compute_call builds it; the response from the result's shape."""
    call = compute_call(f, kind, points, **options)
    response = hessd_pb2.ComputeResponse()
    response.output.dtype = codec.dtype_to_proto(call.out_dtype)
    response.output.shape[:] = call.out_shape
    if not call.streamed(threshold):
        response.output.data = bytes(call.output_bytes)
        return Wire(False, call.messages(streamed=False), [response.ByteSize()])
    sizes = [hessd_pb2.StreamMessage(compute_response=response).ByteSize()]
    for start in range(0, call.output_bytes, stream.CHUNK_BYTES):
        sizes.append(_data_message_bytes(min(stream.CHUNK_BYTES, call.output_bytes - start)))
    return Wire(True, call.messages(streamed=True), sizes)


@functools.cache
def _data_message_bytes(size: int) -> int:
    return hessd_pb2.StreamMessage(data=bytes(size)).ByteSize()


def echo_channel(address: str, api: ModuleType = grpc) -> Any:
    """A channel to the echo server configured as the client's; `api` grpc or grpc.aio."""
    return api.insecure_channel(address, options=CHANNEL_OPTIONS)


class Floor:
    """Raw calls to the echo server over a channel configured as the client's."""

    def __init__(self, address: str) -> None:
        self._channel = echo_channel(address)
        self._unary = self._channel.unary_unary(COMPUTE)
        self._stream = self._channel.stream_stream(COMPUTE_STREAM)

    def call(self, wire: Wire) -> int:
        """One exchange of `wire`'s bytes; the number of bytes received."""
        if not wire.streamed:
            return len(self._unary(wire.request[0], metadata=wire.metadata, timeout=600))
        replies = self._stream(iter(wire.request), metadata=wire.metadata, timeout=600)
        return sum(len(m) for m in replies)

    def close(self) -> None:
        self._channel.close()
