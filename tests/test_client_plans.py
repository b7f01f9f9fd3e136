"""The client's plans: a call like one answered before is built from the plan kept then
(its request's wire bytes, its reply's layout). Its results must be those of the full
path, and a plan must never serve a call whose shapes, dtype or options differ."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from hessd.client import AsyncClient, Client, InvalidArgument, _requests
from hessd.proto.v1 import hessd_pb2
from hessd.service.config import ServerConfig
from hessd.service.server import create_server

N = 4
A = np.arange(N * N, dtype=np.float64).reshape(N, N) / 10.0
KINDS = {
    "value": {},
    "gradient": {},
    "jacobian": {},
    "jacobian-denominator": {"layout": "denominator"},
    "hessian": {},
    "hessian-packed": {"packed": True},
    "hvp": {"vector": np.linspace(-1.0, 1.0, 3 * N).reshape(3, N)},
    "jvp": {"vector": np.ones((3, N))},
    "vjp": {"vector": np.full((3,), 2.0)},
    "taylor2": {},
}


@pytest.fixture
def scalar(client):
    return client.register("sum(tanh(A @ x)**2)", {"x": (N,)}, {"A": A}, dtype="float64")


def planned(f, kind, points, **options) -> bool:
    call = _requests.compute_call(f, kind, points, options, 1 << 20)
    return isinstance(call, _requests.PlannedCall)


def assert_same(first, again, writeable=True):
    assert type(first) is type(again)
    if isinstance(first, dict):
        assert list(first) == list(again)
        for name in first:
            assert_same(first[name], again[name], writeable)
        return
    assert first.dtype == again.dtype and first.shape == again.shape
    if writeable:  # a unary reply's arrays are read-only views, a streamed one's are not
        assert first.flags.writeable == again.flags.writeable
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("name", list(KINDS))
def test_a_repeated_call_returns_what_the_first_did(client, scalar, rng, name):
    kind = name.split("-")[0]
    options = KINDS[name]
    x = rng.normal(size=(3, N))
    assert not planned(scalar, kind, x, **options)
    first = client.compute(scalar, kind, x, **options)
    assert planned(scalar, kind, x, **options)
    for _ in range(3):
        assert_same(first, client.compute(scalar, kind, x, **options))
    # New values, same shapes: the plan serves them, and they are computed anew.
    y = rng.normal(size=(3, N))
    fresh = client.compute(
        client.register("sum(tanh(A @ x)**2)", {"x": (N,)}, {"A": A}, dtype="float64"),
        kind,
        y,
        **options,
    )
    assert_same(client.compute(scalar, kind, y, **options), fresh)


def test_the_planned_request_is_the_full_paths_request(client, scalar, rng):
    x, v = rng.normal(size=(2, N)), rng.normal(size=(2, N))
    client.hvp(scalar, x, v)
    call = _requests.compute_call(scalar, "hvp", x, {"vector": v}, 1 << 20)
    assert isinstance(call, _requests.PlannedCall)
    full = _requests.compute_request(scalar, "hvp", x, vector=v).filled()
    assert hessd_pb2.ComputeRequest.FromString(call.wire) == full


def test_a_plan_never_serves_another_batch_size_dtype_or_option(client, scalar, rng):
    x3, x5 = rng.normal(size=(3, N)), rng.normal(size=(5, N))
    g3 = client.gradient(scalar, x3)
    g5 = client.gradient(scalar, x5)
    assert g5.shape == (5, N)
    assert_same(client.gradient(scalar, x3), g3)
    assert_same(client.gradient(scalar, x5), g5)
    # Another batch size may run another executable: equal to rounding.
    np.testing.assert_allclose(client.gradient(scalar, x5[:3]), g5[:3], rtol=1e-12)
    # Other dtypes are converted by the full path (exactly, or refused), never planned.
    ints = np.arange(3 * N).reshape(3, N)
    assert not planned(scalar, "gradient", ints)
    expected = client.gradient(scalar, ints.astype(np.float64))
    assert_same(client.gradient(scalar, ints), expected)
    x32 = x3.astype(np.float32)
    assert_same(client.gradient(scalar, x32), client.gradient(scalar, x32.astype(np.float64)))
    assert_same(client.gradient(scalar, x3.tolist()), g3)
    single = client.gradient(scalar, x3, output_dtype="float32")
    assert single.dtype == np.float32
    assert_same(client.gradient(scalar, x3, output_dtype="float32"), single)
    assert client.gradient(scalar, x3).dtype == np.float64
    # A wrong shape after a planned call is refused as before.
    with pytest.raises(InvalidArgument, match="expected"):
        client.gradient(scalar, rng.normal(size=(3, N + 1)))


def test_views_other_arrays_and_dicts_of_inputs(client, rng):
    f = client.register("sum(a * b) + sum(a**2)", {"a": (N,), "b": (N,)}, dtype="float64")
    a, b = rng.normal(size=(2, N)), rng.normal(size=(2, N))
    first = client.gradient(f, {"a": a, "b": b}, wrt=["a", "b"])
    assert_same(client.gradient(f, {"a": a, "b": b}, wrt=["a", "b"]), first)
    assert_same(client.gradient(f, {"b": b, "a": a}, wrt=["a", "b"]), first)
    wide = np.zeros((2, 2 * N))
    wide[:, ::2] = a  # a strided view with a's values
    assert_same(client.gradient(f, {"a": wide[:, ::2], "b": b}, wrt=["a", "b"]), first)
    assert_same(client.gradient(f, {"a": wide[:, ::2], "b": b}, wrt=["a", "b"]), first)
    shared = client.value(f, {"a": a, "b": b[0]}, shared=["b"])
    assert_same(client.value(f, {"a": a, "b": b[0]}, shared=["b"]), shared)
    scaled = client.register("c * sum(x**2)", {"x": (N,), "c": ()}, dtype="float64")
    first = client.value(scaled, {"x": a, "c": np.float64(2.0)}, shared=["c"])
    assert_same(client.value(scaled, {"x": a, "c": np.float64(2.0)}, shared=["c"]), first)
    assert_same(client.value(scaled, {"x": a, "c": np.asarray(2.0)}, shared=["c"]), first)


def test_planned_calls_stream_when_the_threshold_says_so(server_address, scalar, rng):
    x = rng.normal(size=(3, N))
    with Client(server_address) as unary, Client(server_address, stream_threshold=16) as small:
        first = unary.compute(scalar, "hessian", x)
        assert planned(scalar, "hessian", x)
        assert_same(small.compute(scalar, "hessian", x), first, writeable=False)


def test_async_streams_both_ways_give_the_unary_result(server_address, scalar, rng):
    """AsyncClient over ComputeStream (request and result as bytes, the result fed to its
    buffer chunk by chunk) gives the unary call's result, whatever the chunking."""
    x = rng.normal(size=(3, N))

    async def streamed():
        async with AsyncClient(server_address, stream_threshold=16) as c:
            return await c.hessian(scalar, x), await c.hessian(scalar, x)

    with Client(server_address) as unary:
        first = unary.hessian(scalar, x)
    for got in asyncio.run(streamed()):
        np.testing.assert_array_equal(got, first)
        assert got.dtype == first.dtype and got.shape == first.shape == (3, N, N)


def test_a_planned_call_registers_its_function_where_it_is_unknown(rng):
    x = rng.normal(size=(2, N))
    started = [create_server(ServerConfig(host="127.0.0.1", port=0)) for _ in range(3)]
    servers = [server for server, _ in started]
    for server in servers:
        server.start()
    a, b, c = (f"127.0.0.1:{port}" for _, port in started)

    async def on(address, f):
        async with AsyncClient(address) as client:
            return await client.gradient(f, x)

    try:
        with Client(a) as on_a, Client(b) as on_b:
            f = on_a.register("sum(x**3)", {"x": (N,)}, dtype="float64")
            first = on_a.gradient(f, x)
            assert planned(f, "gradient", x)
            assert_same(on_b.gradient(f, x), first)  # planned, NOT_FOUND, then with its spec
            assert_same(asyncio.run(on(c, f)), first)
        assert [len(s.servicer.registry) for s in servers] == [1, 1, 1]
    finally:
        for server in servers:
            server.stop(None)


def test_async_planned_calls_in_flight(server_address, scalar, rng):
    points = [rng.normal(size=(1, N)) for _ in range(32)]

    async def run() -> list:
        async with AsyncClient(server_address) as c:
            await c.gradient(scalar, points[0])
            return await asyncio.gather(*(c.gradient(scalar, p) for p in points))

    with Client(server_address) as c:
        expected = [c.gradient(scalar, p) for p in points]
    for got, want in zip(asyncio.run(run()), expected, strict=True):
        # Calls in flight together may be batched together on the server: equal to rounding.
        assert got.dtype == want.dtype and got.shape == want.shape and not got.flags.writeable
        np.testing.assert_allclose(got, want, rtol=1e-12)
