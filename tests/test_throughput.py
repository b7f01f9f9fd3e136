"""Large tensors: streamed in chunks both ways, cast or packed on the device before the
transfer; results identical to the unary path."""

from __future__ import annotations

import grpc
import ml_dtypes
import numpy as np
import pytest

from hessd.client import Client, InvalidArgument
from hessd.proto import codec, kinds, stream
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc

from conftest import allclose


@pytest.fixture(scope="module")
def quartic(server_address):
    with Client(server_address) as c:
        a = np.random.default_rng(0).normal(size=(30, 40))
        yield c.register("sum(tanh(A @ x)**2) + sum(x**4)", {"x": (40,)}, {"A": a}, dtype="float64")


@pytest.mark.parametrize("kind", ["gradient", "hessian", "taylor2"])
def test_streamed_equals_unary(server_address, quartic, kind):
    x = np.random.default_rng(1).normal(size=(64, 40))
    with Client(server_address) as unary, Client(server_address, stream_threshold=1000) as streamed:
        want, got = unary.compute(quartic, kind, x), streamed.compute(quartic, kind, x)
    if isinstance(want, dict):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    else:
        np.testing.assert_array_equal(got, want)


def test_stream_goes_past_the_channels_message_limit(server_address, quartic):
    # 256 Hessians of 40x40 float64 are 3.3 MB; this channel takes messages up to 1.1 MiB,
    # so only chunks can carry them.
    x = np.random.default_rng(2).normal(size=(256, 40))
    with Client(server_address) as c:
        want = c.hessian(quartic, x)
    request = hessd_pb2.ComputeRequest(function_id=quartic.id, kind=hessd_pb2.HESSIAN)
    codec.encode(x, out=request.inputs.add(name="x").tensor, data=False)
    options = [("grpc.max_receive_message_length", 1100 * 1024)]
    with grpc.insecure_channel(server_address, options=options) as channel:
        replies = hessd_pb2_grpc.HessdStub(channel).ComputeStream(
            stream.send("compute_request", request, [x]), timeout=60
        )
        messages = list(replies)
        header, (buffer,) = stream.receive(messages, "compute_response", 1 << 40)
    assert len(messages) >= 5 and all(len(m.data) <= stream.CHUNK_BYTES for m in messages)
    np.testing.assert_array_equal(codec.decode(header.output, "output", buffer), want)


def raw_stream(address, messages):
    with grpc.insecure_channel(address) as channel:
        return list(hessd_pb2_grpc.HessdStub(channel).ComputeStream(iter(messages), timeout=30))


def test_stream_without_header_is_refused(server_address):
    with pytest.raises(grpc.RpcError) as info:
        raw_stream(server_address, [hessd_pb2.StreamMessage(data=b"1234")])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must start with its header" in info.value.details()


def test_stream_with_missing_bytes_is_refused(server_address, quartic):
    request = hessd_pb2.ComputeRequest(function_id=quartic.id, kind=hessd_pb2.VALUE)
    codec.encode(np.ones((2, 40)), out=request.inputs.add(name="x").tensor, data=False)
    messages = [hessd_pb2.StreamMessage(compute_request=request),
                hessd_pb2.StreamMessage(data=b"\0" * 100)]  # fmt: skip
    with pytest.raises(grpc.RpcError) as info:
        raw_stream(server_address, messages)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ended inside input 'x'" in info.value.details()


def test_stream_declaring_too_much_is_refused_before_allocating(server_address, quartic):
    request = hessd_pb2.ComputeRequest(function_id=quartic.id, kind=hessd_pb2.VALUE)
    request.inputs.add(name="x").tensor.CopyFrom(
        hessd_pb2.Tensor(dtype=hessd_pb2.FLOAT64, shape=[1 << 40, 40])
    )
    with pytest.raises(grpc.RpcError) as info:
        raw_stream(server_address, [hessd_pb2.StreamMessage(compute_request=request)])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the limit" in info.value.details()


@pytest.mark.parametrize(
    ("name", "rtol"), [("float16", 2e-3), ("bfloat16", 1e-2), ("float32", 1e-6)]
)
def test_output_dtype_casts_on_the_server(client, quartic, name, rtol):
    x = np.random.default_rng(3).normal(size=(8, 40))
    full = client.hessian(quartic, x)
    cast = client.hessian(quartic, x, output_dtype=name)
    assert cast.dtype == np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
    allclose(cast.astype(np.float64), full, atol=rtol * np.abs(full).max())


def test_packed_hessian(client, quartic):
    x = np.random.default_rng(4).normal(size=(8, 40))
    full = client.hessian(quartic, x)
    # Unpacking mirrors the upper triangle; AD's lower triangle agrees to rounding.
    allclose(client.hessian(quartic, x, packed=True), full)
    packed = client.hessian(quartic, x, packed=True, unpack=False)
    assert packed.shape == (8, 40 * 41 // 2)
    rows, cols = np.triu_indices(40)
    np.testing.assert_array_equal(packed, full[:, rows, cols])
    with Client(client.connection.target, stream_threshold=1000) as streamed:
        allclose(streamed.hessian(quartic, x, packed=True), full)


@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 600])
def test_pack_and_unpack_invert_each_other(n):
    full = np.random.default_rng(n).normal(size=(3, n, n))
    full = full + full.transpose(0, 2, 1)
    rows, cols = np.triu_indices(n)
    packed = kinds.pack_triangles(full)
    np.testing.assert_array_equal(packed, full[:, rows, cols])
    np.testing.assert_array_equal(kinds.unpack_triangles(packed, n), full)


def test_packed_needs_a_scalar_hessian(client):
    f = client.register("sin(x)", {"x": (3,)}, dtype="float64")
    with pytest.raises(InvalidArgument, match="packed applies to the hessian of a scalar"):
        client.hessian(f, np.ones((1, 3)), packed=True)
    g = client.register("sum(x**2)", {"x": (3,)}, dtype="float64")
    with pytest.raises(InvalidArgument, match="packed applies"):
        client.gradient(g, np.ones((1, 3)), packed=True)


def test_output_dtype_must_be_floating(client, quartic):
    with pytest.raises(InvalidArgument, match="output_dtype int32 is not a floating dtype"):
        client.gradient(quartic, np.ones((1, 40)), output_dtype="int32")
