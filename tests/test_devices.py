"""Several devices and device memory: the batch axis sharded over 4 CPU devices gives the
results of one device; running out of device memory halves the chunk, then refuses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from hessd.proto.v1 import hessd_pb2
from hessd.service import kinds
from hessd.service.engine import Engine
from hessd.service.errors import ResourceExhausted
from hessd.service.program import build_program

SHARDED = textwrap.dedent(
    """
    import jax, numpy as np
    from hessd.client import Client
    from hessd.proto.v1 import hessd_pb2
    from hessd.service import analysis, kinds
    from hessd.service.config import ServerConfig
    from hessd.service.engine import Engine
    from hessd.service.program import build_program
    from hessd.service.server import create_server, enable_x64

    enable_x64()
    assert len(jax.local_devices()) == 4, jax.local_devices()
    spec = hessd_pb2.FunctionSpec(
        expression=hessd_pb2.Expression(source="sum(tanh(x)**2) * sum(w * x) + sum(x**4)"),
        inputs=[hessd_pb2.InputSpec(name=n, shape=[5], dtype=hessd_pb2.FLOAT64) for n in "xw"],
    )
    program = build_program(spec)
    four = Engine(max_bucket=16)
    one = Engine(max_bucket=16, devices=jax.local_devices()[:1])
    x, w = np.random.default_rng(0).normal(size=(37, 5)), np.arange(5.0)
    requests = [kinds.make_request(program, k, shared=("w",)) for k in
                (kinds.Kind.VALUE, kinds.Kind.GRADIENT, kinds.Kind.HESSIAN, kinds.Kind.TAYLOR2)]
    requests.append(analysis.make_spectrum_request(program, analysis.Method.EXACT, shared=("w",)))
    for request in requests:
        jax.tree.map(np.testing.assert_array_equal,
                     four.run(program, request, [x, w]), one.run(program, request, [x, w]))
    # Through a server too: three points on four devices (a bucket of at least four).
    server, port = create_server(ServerConfig(port=0))
    server.start()
    with Client(f"127.0.0.1:{port}") as c:
        f = c.register("sum(x**2)", {"x": (3,)}, dtype="float64")
        np.testing.assert_array_equal(c.gradient(f, np.ones((3, 3))), 2 * np.ones((3, 3)))
        assert len(c.server_info()["devices"]) == 4
    server.stop(None)
    print("sharded results equal")
    """
)


def test_four_devices_give_the_results_of_one():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded results equal" in result.stdout


def program():
    spec = hessd_pb2.FunctionSpec(
        expression=hessd_pb2.Expression(source="sum(x**2)"),
        inputs=[hessd_pb2.InputSpec(name="x", shape=[3], dtype=hessd_pb2.FLOAT64)],
    )
    return build_program(spec)


class OutOfMemory(jax.errors.JaxRuntimeError):
    pass


def test_out_of_memory_halves_the_chunk(monkeypatch):
    engine = Engine(max_bucket=64)
    real = engine._run_chunk
    sizes = []

    def run_chunk(program, request, args, batched, size):
        sizes.append(size)
        if size > 8:
            raise OutOfMemory("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes")
        return real(program, request, args, batched, size)

    monkeypatch.setattr(engine, "_run_chunk", run_chunk)
    p = program()
    x = np.random.default_rng(0).normal(size=(40, 3))
    out = engine.run(p, kinds.make_request(p, kinds.Kind.GRADIENT), [x])
    np.testing.assert_allclose(out, 2 * x)
    assert sizes[:4] == [64, 32, 16, 8] and set(sizes[4:]) == {8}


def test_out_of_memory_at_one_point_is_resource_exhausted(monkeypatch):
    engine = Engine(max_bucket=4)

    def run_chunk(*args):
        raise OutOfMemory("RESOURCE_EXHAUSTED: Out of memory")

    monkeypatch.setattr(engine, "_run_chunk", run_chunk)
    p = program()
    with pytest.raises(ResourceExhausted, match="does not fit in device memory"):
        engine.run(p, kinds.make_request(p, kinds.Kind.GRADIENT), [np.ones((3, 3))])


def test_other_runtime_errors_are_not_retried(monkeypatch):
    engine = Engine(max_bucket=4)

    def run_chunk(*args):
        raise OutOfMemory("INTERNAL: something else")

    monkeypatch.setattr(engine, "_run_chunk", run_chunk)
    p = program()
    with pytest.raises(OutOfMemory, match="something else"):
        engine.run(p, kinds.make_request(p, kinds.Kind.GRADIENT), [np.ones((3, 3))])
