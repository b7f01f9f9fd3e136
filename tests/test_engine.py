"""The engine: bucketed batches reuse executables, chunks and padding are invisible."""

from __future__ import annotations

import numpy as np
import pytest

from hessd.client import Client
from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2
from hessd.service import kinds
from hessd.service.engine import Engine, bucket_for
from hessd.service.program import build_program


def spec(source="sum(tanh(x)**2)", shape=(3,), dtype=hessd_pb2.FLOAT64):
    return hessd_pb2.FunctionSpec(
        expression=hessd_pb2.Expression(source=source),
        inputs=[hessd_pb2.InputSpec(name="x", shape=shape, dtype=dtype)],
    )


def test_bucket_for():
    assert [bucket_for(b, 64) for b in (1, 2, 3, 4, 5, 8, 9, 64, 65, 1000)] == [
        1,
        2,
        4,
        4,
        8,
        8,
        16,
        64,
        64,
        64,
    ]


def test_new_batch_size_in_known_bucket_does_not_compile():
    engine = Engine(max_bucket=64)
    program = build_program(spec())
    request = kinds.make_request(program, kinds.Kind.HESSIAN)
    rng = np.random.default_rng(0)
    engine.run(program, request, [rng.normal(size=(5, 3))])
    assert engine.stats.compiles == 1
    for batch in (6, 7, 8):  # same bucket of 8
        engine.run(program, request, [rng.normal(size=(batch, 3))])
    assert engine.stats.compiles == 1
    assert engine.stats.hits == 3
    engine.run(program, request, [rng.normal(size=(9, 3))])  # bucket 16
    assert engine.stats.compiles == 2


def test_auto_mode_shares_the_executable_of_its_choice():
    engine = Engine(max_bucket=8)
    program = build_program(spec("sin(x) * 2.0", shape=(3,)))
    x = [np.ones((2, 3))]
    auto = kinds.make_request(program, kinds.Kind.JACOBIAN, mode=kinds.JacobianMode.AUTO)
    reverse = kinds.make_request(program, kinds.Kind.JACOBIAN, mode=kinds.JacobianMode.REVERSE)
    engine.run(program, auto, x)
    engine.run(program, reverse, x)  # n == m: auto chose reverse
    assert engine.stats.compiles == 1


def test_registering_twice_is_free_and_ids_are_content_addressed(server_address):
    with Client(server_address) as c:
        f1 = c.register("x @ A @ x", {"x": (2,)}, {"A": np.eye(2)}, dtype="float64")
        f2 = c.register("x @ A @ x", {"x": (2,)}, {"A": np.eye(2)}, dtype="float64")
        f3 = c.register("x @ A @ x", {"x": (2,)}, {"A": 2 * np.eye(2)}, dtype="float64")
    assert f1.id == f2.id != f3.id
    assert len(f1.id) == 64


def test_chunks_and_padding_give_the_same_result_as_one_call():
    program = build_program(spec())
    request = kinds.make_request(program, kinds.Kind.GRADIENT)
    x = np.random.default_rng(1).normal(size=(37, 3))
    whole = Engine(max_bucket=64).run(program, request, [x])
    chunked = Engine(max_bucket=8).run(program, request, [x])  # 5 chunks, the last padded
    np.testing.assert_array_equal(whole, chunked)
    np.testing.assert_allclose(whole, 2 * np.tanh(x) / np.cosh(x) ** 2, rtol=1e-12)


def test_executable_cache_is_bounded_lru():
    engine = Engine(max_bucket=8, cache_size=2)
    program = build_program(spec())
    request = kinds.make_request(program, kinds.Kind.VALUE)
    for batch in (1, 2, 4, 1):  # three buckets through a cache of two: 1 is evicted
        engine.run(program, request, [np.zeros((batch, 3))])
    assert engine.stats.compiles == 4


def test_max_bucket_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        Engine(max_bucket=100)


def test_inline_spec_computes_without_register(server_address):
    import grpc

    from hessd.proto.v1 import hessd_pb2_grpc

    with grpc.insecure_channel(server_address) as channel:
        stub = hessd_pb2_grpc.HessdStub(channel)
        request = hessd_pb2.ComputeRequest(
            spec=spec("sum(x**2)"),
            kind=hessd_pb2.GRADIENT,
            inputs=[hessd_pb2.NamedTensor(name="x", tensor=codec.encode(np.ones((2, 3))))],
        )
        out = codec.decode(stub.Compute(request, timeout=30).output)
    np.testing.assert_array_equal(out, 2 * np.ones((2, 3)))


def test_register_warmup_compiles_ahead_of_the_first_call(server_address):
    from hessd.service.config import ServerConfig
    from hessd.service.server import create_server

    server, port = create_server(ServerConfig(port=0))
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as c:
            stats = server.servicer.engine.stats
            f = c.register("sum(x**3)", {"x": (3,)}, dtype="float64", warmup=[5, 64],
                           warmup_kinds=["gradient", "hvp"])  # fmt: skip
            assert stats.compiles == 4  # 2 kinds x buckets 8 and 64
            c.gradient(f, np.ones((7, 3)))
            c.hvp(f, np.ones((50, 3)), np.ones((50, 3)))
            assert stats.compiles == 4 and stats.hits >= 2
    finally:
        server.stop(None)


def test_compiled_and_temp_bytes_describe_the_executable_a_call_would_use():
    """Engine.compiled (the fast path's "run it on the loop" test) and Engine.temp_bytes
    (XLA's memory analysis of the intermediates, counted in the in-flight budget)."""
    program = build_program(
        hessd_pb2.FunctionSpec(
            expression=hessd_pb2.Expression(source="sum(tanh(x) ** 2) * sum(x ** 3)"),
            inputs=[hessd_pb2.InputSpec(name="x", shape=[32], dtype=hessd_pb2.FLOAT64)],
        )
    )
    engine = Engine(max_bucket=8)
    request = kinds.make_request(program, kinds.Kind.HESSIAN)
    points = np.ones((3, 32))
    assert not engine.compiled(program, request, [points])
    assert engine.temp_bytes(program, request, [points]) == 0
    engine.run(program, request, [points])
    assert engine.compiled(program, request, [points])  # bucket 4
    assert engine.compiled(program, request, [np.ones((4, 32))])  # the same bucket
    assert not engine.compiled(program, request, [np.ones((5, 32))])  # bucket 8: not yet
    assert not engine.compiled(program, request, [np.ones((9, 32))])  # two chunks
    temp = engine.temp_bytes(program, request, [points])
    assert temp > 0
    executable = next(iter(engine._cache.values()))
    assert temp == executable.memory_analysis().temp_size_in_bytes
