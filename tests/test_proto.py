"""The wire contract: generated code in sync with the .proto, and the tensor codec."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generated_code_matches_proto():
    # The pinned generator lives in a virtualenv of its own, made on first use by pip.
    result = subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    if result.returncode == 2:
        pytest.skip(f"the pinned generator cannot be installed here: {result.stderr}")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32", "int64"])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4)])
def test_round_trip(dtype, shape):
    array = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    tensor = codec.encode(array)
    assert tensor.data == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    decoded = codec.decode(tensor)
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_encode_is_row_major_for_fortran_and_strided_arrays():
    array = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    assert codec.encode(array).data == np.arange(6.0).tobytes()
    assert codec.decode(codec.encode(array[:, ::2])).tolist() == [[0.0, 2.0], [3.0, 5.0]]


def test_encode_big_endian_becomes_little_endian():
    array = np.arange(3, dtype=">f8")
    np.testing.assert_array_equal(codec.decode(codec.encode(array)), [0.0, 1.0, 2.0])


def test_decode_rejects_wrong_byte_count():
    tensor = hessd_pb2.Tensor(dtype=hessd_pb2.FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(codec.TensorError, match=r"has 20 bytes of data but shape .* needs 24"):
        codec.decode(tensor, "input 'x'")


def test_decode_rejects_unspecified_dtype():
    with pytest.raises(codec.TensorError, match="DTYPE_UNSPECIFIED is not supported"):
        codec.decode(hessd_pb2.Tensor(shape=[1], data=b"\0" * 4))


def test_decode_rejects_negative_dimension():
    tensor = hessd_pb2.Tensor(dtype=hessd_pb2.FLOAT32, shape=[-1], data=b"")
    with pytest.raises(codec.TensorError, match="negative dimension"):
        codec.decode(tensor)


def test_encode_rejects_unsupported_dtype():
    with pytest.raises(codec.TensorError, match="complex128 cannot be sent"):
        codec.encode(np.zeros(2, dtype=complex))


def test_coerce_converts_only_exactly():
    assert codec.coerce([1, 2, 3], np.float32, "x").dtype == np.float32
    assert codec.coerce(np.float32([0.1]), np.float64, "x").dtype == np.float64
    assert codec.coerce(np.array([0.5, np.nan, np.inf]), np.float32, "x").dtype == np.float32
    with pytest.raises(
        codec.TensorError, match=r"input 'x' has dtype float64 .*x\.astype\(np\.float32\)"
    ):
        codec.coerce(np.array([0.1]), np.float32, "input 'x'")
    with pytest.raises(codec.TensorError, match="not numeric"):
        codec.coerce(np.array(["a"]), np.float32, "x")


def test_lists_and_python_numbers_take_the_function_dtype():
    point = codec.coerce([[0.1, 0.2, 0.3]], np.float32, "input 'x'")
    assert point.dtype == np.float32
    np.testing.assert_array_equal(point, np.array([[0.1, 0.2, 0.3]], np.float32))
    assert codec.coerce(2.5, np.float32, "v").dtype == np.float32
    # Integers still convert only when exact; numpy arrays keep their dtype's meaning.
    assert codec.coerce([1, 2], np.float32, "v").dtype == np.float32
    with pytest.raises(codec.TensorError, match="converting would change its values"):
        codec.coerce([2**40 + 1], np.float32, "v")
    with pytest.raises(codec.TensorError, match="converting would change its values"):
        codec.coerce(np.array([0.1]), np.float32, "v")
    with pytest.raises(codec.TensorError, match="not a rectangular array"):
        codec.coerce([[1.0], [1.0, 2.0]], np.float32, "v")


@pytest.mark.parametrize("shape", [(1, 8), (3,), (2, 0), (4, 2, 3), (1024, 256), ()])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "int32"])
def test_serialised_output_is_the_response_serialised(shape, dtype):
    """stream.serialized_output (the fast path's unary answer) gives exactly the bytes of
    the ComputeResponse protobuf serialises, and parses back to the array."""
    import ml_dtypes

    from hessd.proto import stream

    rng = np.random.default_rng(0)
    array = rng.normal(size=shape).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    expected = hessd_pb2.ComputeResponse()
    codec.encode(array, out=expected.output)
    got = stream.serialized_output(array)
    assert got == expected.SerializeToString()
    back = codec.decode(hessd_pb2.ComputeResponse.FromString(got).output)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back.reshape(-1).view(np.uint8), array.reshape(-1).view(np.uint8))


@pytest.mark.parametrize("sizes", [(0,), (1,), (16, 17), (300,), ((1 << 17) + 5, 3)])
def test_serialised_stream_is_the_messages_serialised(sizes):
    """stream.send_serialized (the server's, one copy per chunk) gives exactly the bytes of
    stream.send's messages serialised, whatever the sizes and chunk boundaries."""
    from hessd.proto import stream

    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=n) for n in sizes] + [np.arange(7, dtype=np.int32)]
    header = hessd_pb2.ComputeResponse()
    for array in arrays:
        codec.encode(array, out=header.outputs.add(name="a").tensor, data=False)
    expected = [m.SerializeToString() for m in stream.send("compute_response", header, arrays)]
    assert list(stream.send_serialized("compute_response", header, arrays)) == expected


@pytest.mark.parametrize("sizes", [(0,), (1,), (16, 17), (300,), ((1 << 17) + 5, 3)])
def test_serialised_stream_is_received_as_parsed(sizes):
    """stream.receive_serialized (a data chunk copied straight from its bytes) gives the
    header and buffers stream.receive gives from the parsed messages, every chunk boundary
    included; the streams' requests (send_serialized of a ComputeRequest) the same."""
    from hessd.proto import stream

    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=n) for n in sizes] + [np.arange(7, dtype=np.int32)]
    header = hessd_pb2.ComputeRequest(function_id="f")
    for array in arrays:
        codec.encode(array, out=header.inputs.add(name="x").tensor, data=False)
    serialised = list(stream.send_serialized("compute_request", header, arrays))
    assert serialised == [
        m.SerializeToString() for m in stream.send("compute_request", header, arrays)
    ]
    got_header, got = stream.receive_serialized(serialised, "compute_request", 1 << 30)
    want_header, want = stream.receive(
        map(hessd_pb2.StreamMessage.FromString, serialised), "compute_request", 1 << 30
    )
    assert got_header == want_header == header
    assert [bytes(b) for b in got] == [bytes(b) for b in want]
    assert [bytes(b) for b in got] == [a.tobytes() for a in arrays]


def test_serialised_stream_parses_what_is_not_a_bare_chunk():
    """A message that is not one data field and nothing else (data twice, whose last wins
    as protobuf has it; a second header; an empty chunk) takes the parser's way, with the
    parser's rules and errors; bytes that do not parse are a TensorError."""
    from hessd.proto import stream

    header = hessd_pb2.ComputeResponse()
    codec.encode(np.zeros(2), out=header.output, data=False)
    first = hessd_pb2.StreamMessage(compute_response=header).SerializeToString()
    chunk = np.arange(2.0).tobytes()
    twice = hessd_pb2.StreamMessage(data=b"\xff" * 16).SerializeToString()
    twice += hessd_pb2.StreamMessage(data=chunk).SerializeToString()
    empty = hessd_pb2.StreamMessage(data=b"").SerializeToString()
    _, (buffer,) = stream.receive_serialized([first, empty, twice], "compute_response", 1 << 20)
    np.testing.assert_array_equal(np.frombuffer(buffer, np.float64), [0.0, 1.0])
    with pytest.raises(codec.TensorError, match="one header, first"):
        stream.receive_serialized([first, first], "compute_response", 1 << 20)
    with pytest.raises(codec.TensorError, match="does not parse"):
        stream.receive_serialized([first, b"\x1a\xff"], "compute_response", 1 << 20)
    with pytest.raises(codec.TensorError, match="more bytes than its header declares"):
        stream.receive_serialized([first, twice, twice], "compute_response", 1 << 20)
