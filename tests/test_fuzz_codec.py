"""The tensor codec under arbitrary input: `codec.decode` of arbitrary Tensor messages gives
a view of the bytes or a TensorError, never another exception nor an allocation that grows
with the declared shape; encode then decode of arbitrary numpy arrays is the identity;
`codec.coerce` converts points exactly or refuses. Strategies and profiles:
fuzz_strategies.py.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2

from fuzz_strategies import _WIRE_DTYPES, fuzz, tensors


@fuzz(1000)
@given(tensors())
def test_decode_gives_an_array_or_a_tensor_error(tensor):
    """Never another exception, and no allocation that grows with the declared shape:
    decode is a view of the bytes or a refusal. Where the shape declares over 1 MiB,
    tracemalloc (which sees numpy's allocations) watches the call."""
    huge = math.prod(abs(d) for d in tensor.shape if d) > 2**20
    if huge:
        tracemalloc.start()
    try:
        array = codec.decode(tensor, "input 'x'")
    except codec.TensorError as error:
        assert str(error)
        event("refused")
        return
    finally:
        if huge:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < 64 * 1024, (tuple(tensor.shape), peak)
    event("decoded")
    assert array.shape == tuple(tensor.shape)
    assert array.dtype == _WIRE_DTYPES[tensor.dtype]
    assert array.tobytes() == tensor.data


# The wire dtypes hypothesis can fill, in both byte orders (ml_dtypes' bfloat16 it cannot).
_ENCODABLE = st.sampled_from(
    [
        np.dtype(dtype).newbyteorder(order)
        for dtype in _WIRE_DTYPES.values()
        if np.dtype(dtype).kind in "biuf" and np.dtype(dtype).type.__module__ == "numpy"
        for order in "<>"
    ]
)


@fuzz(600)
@given(
    hnp.arrays(_ENCODABLE, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)),
    st.sampled_from([(), (slice(None, None, 2),), (slice(None, None, -1),), "T"]),
)
def test_encode_then_decode_is_the_identity(array, view):
    """Any numpy array of a wire dtype, in either byte order and any memory layout, comes
    back with the same shape, values (NaN included) and native little-endian dtype."""
    if view == "T":
        array = array.T
    elif array.ndim:
        array = array[view]
    tensor = codec.encode(array)
    decoded = codec.decode(tensor)
    assert decoded.shape == array.shape
    assert decoded.dtype == array.dtype.newbyteorder("<")
    np.testing.assert_array_equal(decoded, array, strict=False)
    assert decoded.tobytes() == array.astype(decoded.dtype).tobytes()


_UNSENDABLE = [
    np.dtype(t)
    for t in ("u1", "i1", "i2", "u4", "u8", "c8", "c16", "U3", "M8[s]")
    if np.dtype(t).name not in {d.name for d in _WIRE_DTYPES.values()}
]


@fuzz(100)
@given(
    hnp.arrays(st.sampled_from(_UNSENDABLE), hnp.array_shapes(min_dims=0, max_dims=3, max_side=3))
)
def test_encode_refuses_dtypes_the_wire_does_not_carry(array):
    with pytest.raises(codec.TensorError, match="cannot be sent"):
        codec.encode(array)


# What a client may hand over as points, against the dtypes a function computes in: values
# at and past the float32 range, NaN and Inf, ints past 2**53 and 2**24.
_POINT_DTYPES = ["<f8", "<f4", "<f2", "<i8", "<i4", "<u8", "|b1"]
_POINT_VALUES = [1e300, -1e300, 3.5e38, 1e-320, 2.0**53 + 2, 2**53 + 1, 2**64 - 1, 16_777_217]


@st.composite
def _points(draw) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(_POINT_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3))
    array = draw(hnp.arrays(dtype, shape))
    if array.size and dtype.kind != "b" and draw(st.booleans()):
        with np.errstate(all="ignore"):  # an edge value as this dtype holds it
            edge = np.array(draw(st.sampled_from(_POINT_VALUES))).astype(dtype)
        array.flat[draw(st.integers(0, array.size - 1))] = edge
    return array


@fuzz(300)
@given(_points(), st.sampled_from([np.dtype("<f4"), np.dtype("<f8")]))
def test_coerce_converts_exactly_or_refuses(array, dtype):
    """An array converts to the function's dtype only when no value changes, else a
    TensorError says which cast to make; never a numpy warning on the way (a float64 1e300
    as float32 once warned 'overflow encountered in cast', an exception under -W error)."""
    try:
        converted = codec.coerce(array, dtype, "points")
    except codec.TensorError as error:
        assert "astype" in str(error), str(error)
        event("refused")
        return
    assert converted.dtype == dtype and converted.shape == array.shape
    with np.errstate(all="ignore"):
        back = converted.astype(array.dtype)
    np.testing.assert_array_equal(back, array)
    event("converted")


def test_decode_zero_size_shape_with_huge_dimensions():
    tensor = hessd_pb2.Tensor(dtype=hessd_pb2.FLOAT32, shape=[0, 2**62], data=b"")
    with pytest.raises(codec.TensorError):
        codec.decode(tensor)


def test_decode_more_than_64_dimensions():
    tensor = hessd_pb2.Tensor(dtype=hessd_pb2.FLOAT32, shape=[1] * 65, data=b"\0" * 4)
    with pytest.raises(codec.TensorError):
        codec.decode(tensor)
