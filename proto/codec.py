"""numpy <-> Tensor, the one codec both the client and the server use.

A Tensor is a dtype, a shape and the raw little-endian row-major bytes of the array in one
field. Decoding is a view (np.frombuffer, no copy); encoding is one copy into the
message's bytes field. Nothing here imports jax.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from hessd.proto.v1 import hessd_pb2

__all__ = [
    "LimitExceeded",
    "TensorError",
    "check_points",
    "coerce",
    "decode",
    "dtype_from_proto",
    "dtype_to_proto",
    "encode",
]


class TensorError(ValueError):
    """A tensor that cannot be decoded or used as asked; the message says why."""


class LimitExceeded(TensorError):
    """Tensors that are well formed but larger than the receiver accepts."""


_BY_PROTO: dict[hessd_pb2.DType, np.dtype] = {
    hessd_pb2.FLOAT32: np.dtype("<f4"),
    hessd_pb2.FLOAT64: np.dtype("<f8"),
    hessd_pb2.FLOAT16: np.dtype("<f2"),
    hessd_pb2.INT32: np.dtype("<i4"),
    hessd_pb2.INT64: np.dtype("<i8"),
    hessd_pb2.BOOL: np.dtype("bool"),
    hessd_pb2.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
}
_BY_NAME: dict[str, hessd_pb2.DType] = {np.dtype(d).name: p for p, d in _BY_PROTO.items()}


def dtype_to_proto(dtype: np.dtype | str | type) -> hessd_pb2.DType:
    """The DType enum value of a numpy dtype; TensorError for types the wire does not carry."""
    name = np.dtype(dtype).name
    try:
        return _BY_NAME[name]
    except KeyError:
        raise TensorError(
            f"dtype {name} cannot be sent; supported dtypes are {', '.join(_BY_NAME)}"
        ) from None


def dtype_from_proto(value: int) -> np.dtype:
    """The numpy dtype of a DType enum value; TensorError for unknown or unset values."""
    try:
        return _BY_PROTO[value]  # type: ignore[index]  # an int, checked here
    except KeyError:
        name = hessd_pb2.DType.Name(value) if value in hessd_pb2.DType.values() else value
        raise TensorError(
            f"dtype {name} is not supported; use one of "
            + ", ".join(hessd_pb2.DType.Name(p) for p in _BY_PROTO)
        ) from None


def encode(
    array: np.ndarray, out: hessd_pb2.Tensor | None = None, data: bool = True
) -> hessd_pb2.Tensor:
    """A Tensor holding `array` (any shape) as little-endian row-major bytes.

    With `out` (a Tensor field of a message being built), fills it in place and returns it:
    passing a finished Tensor to a message constructor copies all its bytes again, which
    for a 4 MB result costs more than computing it (measured: 5 ms against 1 ms). With
    `data=False` only dtype and shape are set: the header of a streamed tensor.
    """
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<")
    tensor = hessd_pb2.Tensor() if out is None else out
    tensor.dtype = dtype_to_proto(dtype)
    tensor.shape[:] = array.shape
    if data:
        tensor.data = little_endian(array).tobytes()
    return tensor


def little_endian(array: np.ndarray) -> np.ndarray:
    """`array` as a C-contiguous little-endian array (itself when it already is)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


# numpy's limits: at most 64 axes, and no extent product past what an index can address.
MAX_AXES = 32
MAX_ELEMENTS = 1 << 62


def nbytes(tensor: hessd_pb2.Tensor, what: str = "tensor") -> int:
    """How many bytes the tensor's dtype and shape call for; TensorError if invalid."""
    dtype = dtype_from_proto(tensor.dtype)
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"{what} has a negative dimension in shape {shape}")
    if len(shape) > MAX_AXES or any(d > MAX_ELEMENTS for d in shape):
        raise TensorError(
            f"{what} has shape {shape}: at most {MAX_AXES} axes of at most {MAX_ELEMENTS} each"
        )
    return math.prod(shape) * dtype.itemsize


def decode(
    tensor: hessd_pb2.Tensor, what: str = "tensor", data: bytes | memoryview | None = None
) -> np.ndarray:
    """A numpy view of the tensor's bytes, shaped; TensorError if they disagree.

    `what` names the tensor in messages ("input 'x'"). `data` (a buffer) stands in for
    tensor.data: the bytes of a streamed tensor, which never pass through the message.
    """
    expected = nbytes(tensor, what)
    dtype, shape = dtype_from_proto(tensor.dtype), tuple(tensor.shape)
    data = tensor.data if data is None else data
    if len(data) != expected:
        raise TensorError(
            f"{what} has {len(data)} bytes of data but shape {shape} of {dtype.name} "
            f"needs {expected}; send prod(shape) * itemsize bytes, row-major little-endian"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as e:  # an empty array whose other extents numpy cannot address
        raise TensorError(f"{what} with shape {shape} cannot be represented: {e}") from None


def coerce(array: object, dtype: np.dtype | str, what: str) -> np.ndarray:
    """`array` as a numpy array of `dtype`, converted only where no value changes.

    Integers, booleans and lower-precision floats convert when every value survives the
    round trip exactly; anything else (float64 data for a float32 function, say) raises
    TensorError naming `what` and the cast to do, so nothing a user sent is silently changed.
    A list or a Python number has no dtype of its own, so its floats take `dtype` (as
    jnp.asarray does): [[0.1, 0.2]] is a float32 point of a float32 function.
    """
    dtype = np.dtype(dtype)
    if not hasattr(array, "dtype"):
        try:
            array = np.asarray(array)
        except ValueError as e:  # ragged nesting
            raise TensorError(f"{what} is not a rectangular array of numbers: {e}") from None
        if array.dtype.kind == "f":
            return array.astype(dtype)
    array = np.asarray(array)
    if array.dtype == dtype:
        return array
    if array.dtype.kind not in "biuf":
        raise TensorError(f"{what} has dtype {array.dtype}, which is not numeric")
    with np.errstate(invalid="ignore", over="ignore"):  # a value that changes is refused below
        converted = array.astype(dtype)
        exact = np.array_equal(converted.astype(array.dtype), array, equal_nan=True)
    if not exact:
        raise TensorError(
            f"{what} has dtype {array.dtype} and the function computes in {dtype.name}; "
            f"converting would change its values. Convert it yourself "
            f"(x.astype(np.{dtype.name})) or register the function with dtype='{array.dtype}'"
        )
    return converted


def check_points(array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    """TensorError unless `array` is (batch, *shape) of `dtype`: a batch of points."""
    if array.ndim != len(shape) + 1 or array.shape[1:] != tuple(shape):
        batched = str(("batch", *shape)).replace("'", "")
        raise TensorError(
            f"{what} has shape {array.shape}; expected {batched}: a leading batch axis, "
            f"then the shape of one point {tuple(shape)}"
        )
    if array.dtype != dtype:
        raise TensorError(f"{what} has dtype {array.dtype.name}; the function takes {dtype.name}")
