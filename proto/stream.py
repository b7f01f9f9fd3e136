"""Streamed tensors: a header message, then the tensors' bytes in chunks.

Both sides use this: `send` turns a header and its arrays into StreamMessages of at most
CHUNK_BYTES of data each; `receive` reads them back into one buffer per tensor, allocated
once from the sizes the header declares (checked against a limit first), so memory stays
the arrays plus a chunk in flight. `send_serialized` and `receive_serialized` do the same
with the messages' bytes, for a channel or server without a (de)serializer: one copy of
each chunk's bytes, not three.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, overload

import numpy as np
from google.protobuf.message import DecodeError

from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2

__all__ = [
    "CHUNK_BYTES",
    "Header",
    "Receiver",
    "receive",
    "receive_serialized",
    "send",
    "send_serialized",
    "serialized_output",
    "tensors",
]

# gRPC Python moves ~1 MiB messages about 4x faster than one large message (measured in
# benchmarks/throughput.py; README, Benchmarks).
CHUNK_BYTES = 1 << 20

# The messages a stream starts with: its header, whose tensors' bytes follow in chunks.
Header = hessd_pb2.ComputeRequest | hessd_pb2.ComputeResponse | hessd_pb2.PutRequest


def tensors(message: Header) -> list[tuple[str, hessd_pb2.Tensor]]:
    """The (name, Tensor) fields of a header whose bytes the stream carries, in stream
    order; tensors that name a resident tensor (handle) carry none."""
    if isinstance(message, hessd_pb2.PutRequest):
        return [("the tensor to put", message.tensor)]
    if isinstance(message, hessd_pb2.ComputeRequest):
        named = [(f"input {t.name!r}", t.tensor) for t in message.inputs]
        named += [("vector", message.vector)] if message.HasField("vector") else []
        named += [(f"data {t.name!r}", t.tensor) for t in message.objective.data]
        return [(what, tensor) for what, tensor in named if not tensor.handle]
    named = [("output", message.output)] if message.HasField("output") else []
    named += [(t.name, t.tensor) for t in message.outputs]
    pattern = message.sparsity
    return named + [
        (f"sparsity {name}", getattr(pattern, name))
        for name in ("rows", "cols")
        if pattern.HasField(name)
    ]


@overload
def send(
    field: Literal["compute_request"],
    header: hessd_pb2.ComputeRequest,
    arrays: Sequence[np.ndarray],
) -> Iterator[hessd_pb2.StreamMessage]: ...
@overload
def send(
    field: Literal["compute_response"],
    header: hessd_pb2.ComputeResponse,
    arrays: Sequence[np.ndarray],
) -> Iterator[hessd_pb2.StreamMessage]: ...
@overload
def send(
    field: Literal["put_request"],
    header: hessd_pb2.PutRequest,
    arrays: Sequence[np.ndarray],
) -> Iterator[hessd_pb2.StreamMessage]: ...
def send(
    field: str, header: Header, arrays: Sequence[np.ndarray]
) -> Iterator[hessd_pb2.StreamMessage]:
    """The header (its tensors' data empty) under `field`, then every array's bytes."""
    # The overloads pair each field with its message type, which a str key cannot carry.
    first: dict[str, Any] = {field: header}
    yield hessd_pb2.StreamMessage(**first)
    for array in arrays:
        flat = codec.little_endian(array).reshape(-1).view(np.uint8)
        for start in range(0, flat.size, CHUNK_BYTES):
            yield hessd_pb2.StreamMessage(data=flat[start : start + CHUNK_BYTES].tobytes())


@overload
def send_serialized(
    field: Literal["compute_request"],
    header: hessd_pb2.ComputeRequest,
    arrays: Sequence[np.ndarray],
) -> Iterator[bytes]: ...
@overload
def send_serialized(
    field: Literal["compute_response"],
    header: hessd_pb2.ComputeResponse,
    arrays: Sequence[np.ndarray],
) -> Iterator[bytes]: ...
@overload
def send_serialized(
    field: Literal["put_request"],
    header: hessd_pb2.PutRequest,
    arrays: Sequence[np.ndarray],
) -> Iterator[bytes]: ...
def send_serialized(field: str, header: Header, arrays: Sequence[np.ndarray]) -> Iterator[bytes]:
    """send()'s messages, serialised: the bytes StreamMessage.SerializeToString would give,
    each data chunk with one copy of its slice of the array (not three: tobytes, the
    message's field, its serialisation). For a channel or server that takes bytes."""
    first: dict[str, Any] = {field: header}
    yield hessd_pb2.StreamMessage(**first).SerializeToString()
    for array in arrays:
        flat = codec.little_endian(array).reshape(-1).view(np.uint8)
        for start in range(0, flat.size, CHUNK_BYTES):
            chunk = flat[start : start + CHUNK_BYTES]
            yield b"".join((_DATA_KEY, _varint(chunk.size), chunk.data))


# StreamMessage.data is field 3, length-delimited: its key byte is (3 << 3) | 2.
_DATA_KEY = bytes([(3 << 3) | 2])
# ComputeResponse.output (field 1) and Tensor.data (field 3), length-delimited.
_OUTPUT_KEY = bytes([(1 << 3) | 2])
_TENSOR_DATA_KEY = bytes([(3 << 3) | 2])


def serialized_output(array: np.ndarray) -> bytes:
    """ComputeResponse(output=codec.encode(array)).SerializeToString(), with one copy of
    the array's bytes (not three) and its Tensor's header serialised once per dtype and
    shape: a unary answer of the fast path."""
    array = np.asarray(array)
    data = codec.little_endian(array)  # at least 1-d: the shape is the array's
    header = _tensor_header(data.dtype, array.shape)
    if not data.nbytes:  # an empty data field is not written
        return _OUTPUT_KEY + _varint(len(header)) + header
    size = _varint(data.nbytes)
    tensor = len(header) + len(_TENSOR_DATA_KEY) + len(size) + data.nbytes
    return b"".join(
        (
            _OUTPUT_KEY,
            _varint(tensor),
            header,
            _TENSOR_DATA_KEY,
            size,
            data.reshape(-1).view(np.uint8).data,
        )
    )


@functools.lru_cache(maxsize=1024)
def _tensor_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A Tensor's dtype and shape, serialised."""
    return hessd_pb2.Tensor(dtype=codec.dtype_to_proto(dtype), shape=shape).SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _data_chunk(message: bytes) -> memoryview | None:
    """The data of a serialised StreamMessage that is a data chunk and nothing else (its
    key, its length, then exactly that many bytes), as a view; None for anything else,
    which the caller parses."""
    if message[:1] != _DATA_KEY:
        return None
    size = shift = 0
    for position in range(1, min(len(message), 11)):
        byte = message[position]
        size |= (byte & 0x7F) << shift
        if not byte & 0x80:
            start = position + 1
            return memoryview(message)[start:] if start + size == len(message) else None
        shift += 7
    return None


@overload
def receive(
    messages: Iterable[hessd_pb2.StreamMessage], field: Literal["compute_request"], max_bytes: int
) -> tuple[hessd_pb2.ComputeRequest, list[memoryview]]: ...
@overload
def receive(
    messages: Iterable[hessd_pb2.StreamMessage], field: Literal["compute_response"], max_bytes: int
) -> tuple[hessd_pb2.ComputeResponse, list[memoryview]]: ...
@overload
def receive(
    messages: Iterable[hessd_pb2.StreamMessage], field: Literal["put_request"], max_bytes: int
) -> tuple[hessd_pb2.PutRequest, list[memoryview]]: ...
def receive(
    messages: Iterable[hessd_pb2.StreamMessage], field: str, max_bytes: int
) -> tuple[Header, list[memoryview]]:
    """(header, one buffer per tensor of the header, in order) from a stream.

    LimitExceeded for a stream that declares more than `max_bytes` in all (checked before
    allocating); TensorError for one that does not start with `field` or carries more or
    fewer bytes than declared.
    """
    receiver = Receiver(field, max_bytes)
    for message in messages:
        receiver.feed(message)
    return receiver.finish()


@overload
def receive_serialized(
    messages: Iterable[bytes], field: Literal["compute_request"], max_bytes: int
) -> tuple[hessd_pb2.ComputeRequest, list[memoryview]]: ...
@overload
def receive_serialized(
    messages: Iterable[bytes], field: Literal["compute_response"], max_bytes: int
) -> tuple[hessd_pb2.ComputeResponse, list[memoryview]]: ...
@overload
def receive_serialized(
    messages: Iterable[bytes], field: Literal["put_request"], max_bytes: int
) -> tuple[hessd_pb2.PutRequest, list[memoryview]]: ...
def receive_serialized(
    messages: Iterable[bytes], field: str, max_bytes: int
) -> tuple[Header, list[memoryview]]:
    """`receive` of serialised StreamMessages (a channel read without a deserializer):
    each data chunk is copied once, from the message's bytes into its tensor's buffer.
    Raises as `receive` does, and TensorError for a message that does not parse."""
    receiver = Receiver(field, max_bytes)
    for message in messages:
        try:
            receiver.feed_serialized(message)
        except DecodeError as e:
            raise codec.TensorError(f"a message of the stream does not parse: {e}") from None
    return receiver.finish()


class Receiver:
    """`receive` one message at a time, for a reader that awaits each (the server's event
    loop): feed() every message as it comes, then finish(). Raises as `receive` does, at
    the message that breaks the rule."""

    def __init__(self, field: str, max_bytes: int):
        self.field, self.max_bytes = field, max_bytes
        self.header: Header | None = None
        self._named: list[tuple[str, hessd_pb2.Tensor]] = []
        self._sizes: list[int] = []
        self._buffers: list[np.ndarray] = []
        self._index = self._offset = 0

    def feed(self, message: hessd_pb2.StreamMessage) -> None:
        if self.header is None:
            self._start(message)
            return
        if message.WhichOneof("part") not in ("data", None):
            raise codec.TensorError(
                f"a stream carries one header, first; this one sent {message.WhichOneof('part')} "
                "again after it"
            )
        self._fill(memoryview(message.data))

    def feed_serialized(self, message: bytes) -> None:
        """feed() of a serialised StreamMessage. A data chunk is copied straight from these
        bytes into its buffer: parsing it first would copy it twice more (into the message,
        then into the bytes its field returns). Raises DecodeError for bytes that do not
        parse."""
        chunk = _data_chunk(message) if self.header is not None else None
        if chunk is None:
            self.feed(hessd_pb2.StreamMessage.FromString(message))
        else:
            self._fill(chunk)

    def _fill(self, chunk: memoryview) -> None:
        """Copy a data chunk into the buffers, where the last one left off."""
        sizes, buffers = self._sizes, self._buffers
        index, offset = self._index, self._offset
        while chunk:
            while index < len(buffers) and offset == sizes[index]:
                index, offset = index + 1, 0
            if index == len(buffers):
                raise codec.TensorError("the stream carries more bytes than its header declares")
            take = min(len(chunk), sizes[index] - offset)
            buffers[index][offset : offset + take] = chunk[:take]
            offset += take
            chunk = chunk[take:]
        self._index, self._offset = index, offset

    def _start(self, first: hessd_pb2.StreamMessage) -> None:
        if first.WhichOneof("part") != self.field:
            raise codec.TensorError(f"a stream must start with its header, {self.field}")
        header = getattr(first, self.field)
        named = tensors(header)
        sizes = [codec.nbytes(tensor, what) for what, tensor in named]
        if sum(sizes) > self.max_bytes:
            raise codec.LimitExceeded(
                f"the stream declares {sum(sizes)} bytes of tensors, over the limit of "
                f"{self.max_bytes}"
            )
        for what, tensor in named:
            if tensor.data:
                raise codec.TensorError(f"{what} carries data in the header of a stream")
        # np.empty, not bytearray: zero-filling 128 MiB alone cost 66 ms (benchmarks/throughput.py).
        self._buffers = [np.empty(size, np.uint8) for size in sizes]
        self.header, self._named, self._sizes = header, named, sizes

    def finish(self) -> tuple[Header, list[memoryview]]:
        """The header and the buffers, once the stream has ended."""
        if self.header is None:
            raise codec.TensorError(f"a stream must start with its header, {self.field}")
        index, offset, sizes = self._index, self._offset, self._sizes
        while index < len(sizes) and offset == sizes[index]:
            index, offset = index + 1, 0
        if index != len(sizes):
            raise codec.TensorError(f"the stream ended inside {self._named[index][0]}")
        return self.header, [memoryview(b.data) for b in self._buffers]
