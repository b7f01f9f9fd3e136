"""Sparse Jacobians and Hessians: every sparse result equals the dense result of the same
call, on structured functions and on functions with data-dependent branches (where a
pattern read off one point would be wrong); passes equal colours; every refusal has its
status code and message."""

from __future__ import annotations

import asyncio
import math
import pathlib
import re
import subprocess
import sys

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import sparse as scipy_sparse

from hessd.client import AsyncClient, Client, InvalidArgument
from hessd.proto.kinds import Kind
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc
from hessd.service import sparse
from hessd.service.config import ServerConfig
from hessd.service.program import build_program
from hessd.service.server import create_server

from conftest import allclose

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
RNG = np.random.default_rng(12)
W = RNG.normal(size=(3, 3))

# name: (source, input shape, kind, constants)
FAMILY = {
    "banded": ("x[1:-1]**2 - x[:-2] * sin(x[2:])", (12,), "jacobian", {}),
    "tridiagonal hessian": ("sum(x[1:] * x[:-1]) + sum(x**4)", (12,), "hessian", {}),
    "arrowhead": ("x[0] * sum(x[1:]**2) + sum(cos(x))", (10,), "hessian", {}),
    "block-diagonal": ("sum(tanh(reshape(x, (4, 3)) @ W)**2)", (12,), "hessian", {"W": W}),
    "diagonal hessian": ("sum(exp(x) + x**4)", (10,), "hessian", {}),
    "five-point stencil": (
        "u[1:-1, 2:] + u[1:-1, :-2] + u[2:, 1:-1] + u[:-2, 1:-1] - 4 * u[1:-1, 1:-1]"
        " + u[1:-1, 1:-1]**3",
        (6, 6),
        "jacobian",
        {},
    ),
    "branches": (
        "where(x[:-1] > 0, x[1:]**2, 3 * x[:-1]) + maximum(x[:-1], x[1:])"
        " + relu(x[:-1] + x[1:]) + clip(x[1:], -0.5, 0.5) * x[:-1]",
        (10,),
        "jacobian",
        {},
    ),
    "branches hessian": (
        "sum(where(x[:-1] > 0, x[1:]**2 * x[:-1], 2 * relu(x[1:]))"
        " + maximum(x[1:], 0.5) * x[:-1]**2) + sum(clip(x, -1, 1)**3)",
        (10,),
        "hessian",
        {},
    ),
}


def _register(c, name, dtype="float64"):
    source, shape, _, constants = FAMILY[name]
    variable = "u" if "u[" in source else "x"
    return c.register(source, {variable: shape}, constants, dtype=dtype)


def _points(shape, batch=6, dtype=np.float64):
    """Points whose coordinates take both signs, and both sides of clip's bounds."""
    return (2 * RNG.normal(size=(batch, *shape))).astype(dtype)


def _dense(matrix, m, n):
    return np.asarray(matrix).reshape(-1, m, n)


@pytest.mark.parametrize("name", list(FAMILY))
def test_sparse_equals_dense(client, name):
    _, shape, kind, _ = FAMILY[name]
    f = _register(client, name)
    X = _points(shape)
    dense = client.compute(f, kind, X)
    result = client.compute(f, kind, X, sparse=True)
    assert len(result) == len(X)
    assert all(isinstance(r, scipy_sparse.csr_array) for r in result)
    m, n = result[0].shape
    allclose(np.stack([r.toarray() for r in result]), _dense(dense, m, n))


def test_float32_to_dtype_tolerance(client):
    f = _register(client, "five-point stencil", dtype="float32")
    X = _points((6, 6), dtype=np.float32)
    result = client.jacobian(f, X, sparse=True)
    assert result[0].dtype == np.float32
    allclose(
        np.stack([r.toarray() for r in result]),
        _dense(client.jacobian(f, X), 16, 36),
        dtype=np.float32,
    )


@pytest.mark.parametrize("name", ["branches", "branches hessian"])
def test_pattern_holds_for_all_inputs_not_one_point(client, name):
    """The pattern at one point misses entries other points have; the detected one holds
    every entry that is nonzero anywhere. At the first point every coordinate is below -1:
    each where, maximum, relu and clip takes the branch with the fewest dependencies."""
    _, shape, kind, _ = FAMILY[name]
    f = _register(client, name)
    X = _points(shape, batch=16)
    X[0] = -1 - np.sort(np.abs(X[0]))  # decreasing: maximum(x[:-1], x[1:]) is x[:-1]
    pattern = client.sparsity(f, kind)
    dense = _dense(client.compute(f, kind, X), *pattern.shape)
    detected = np.zeros(pattern.shape, bool)
    detected[pattern.rows, pattern.cols] = True
    anywhere = np.any(dense != 0, axis=0)
    assert not np.any(anywhere & ~detected)
    at_one_point = dense[0] != 0
    assert np.any(anywhere & ~at_one_point), "a single point should miss some entries"


def test_tridiagonal_needs_three_passes_whatever_n(client):
    for n in (12, 200):
        f = client.register("x[1:-1]**2 - x[:-2] * sin(x[2:])", {"x": (n,)}, dtype="float64")
        pattern = client.sparsity(f, "jacobian")
        assert (pattern.colors, pattern.passes, pattern.dense_passes) == (3, 3, n - 2)
        assert pattern.nnz == 3 * (n - 2)
        assert pattern.coloring in ("column", "row")
        assert pattern.dense_reason == ""
    h = client.register("sum(x[1:] * x[:-1]) + sum(x**4)", {"x": (200,)}, dtype="float64")
    pattern = client.sparsity(h, "hessian")
    assert (pattern.coloring, pattern.colors, pattern.passes) == ("symmetric", 3, 3)


@pytest.mark.parametrize("name", ["banded", "five-point stencil", "branches"])
def test_colours_within_the_greedy_bounds(client, name):
    """Column colouring: at least the largest row degree (those columns must differ), at
    most one more than the largest degree of the column intersection graph (greedy)."""
    f = _register(client, name)
    p = client.sparsity(f, "jacobian", mode="forward")
    assert p.coloring == "column" and p.passes == p.colors
    matrix = np.zeros(p.shape, bool)
    matrix[p.rows, p.cols] = True
    intersect = (matrix.T.astype(int) @ matrix.astype(int)) > 0
    np.fill_diagonal(intersect, False)
    assert matrix.sum(axis=1).max() <= p.colors <= intersect.sum(axis=1).max() + 1


def test_passes_are_the_seed_rows(client):
    """The compressed products run one JVP per row of the seed matrix: as many as colours."""
    f = _register(client, "five-point stencil")
    reported = client.sparsity(f, "jacobian", mode="forward")
    pattern = next(p for p in sparse._cache.values() if p.shape == reported.shape)
    seeds = pattern.coloring.colors == np.arange(pattern.coloring.num_colors)[:, None]
    assert seeds.shape[0] == reported.passes == reported.colors
    assert reported.colors < reported.dense_passes


@pytest.mark.parametrize(
    ("source", "kind", "colors"),
    [
        ("x[1:-1]**2 - x[:-2] * sin(x[2:])", Kind.JACOBIAN, 3),
        ("sum(x[1:] * x[:-1]) + sum(x**4)", Kind.HESSIAN, 3),
    ],
)
def test_the_computation_is_one_pass_per_colour(source, kind, colors):
    """In the traced computation the seeds are (colours, n), and no intermediate holds more
    than batch x colours x n numbers: the dense kind's n passes never happen."""
    spec = hessd_pb2.FunctionSpec(
        expression=hessd_pb2.Expression(source=source),
        inputs=[hessd_pb2.InputSpec(name="x", shape=(50,), dtype=hessd_pb2.FLOAT64)],
    )
    program = build_program(spec)
    task = sparse.make_sparse_request(program, kind)
    assert (task.pattern.colors, task.pattern.passes) == (colors, colors)
    jaxpr = jax.make_jaxpr(task.transform(program))(np.zeros((4, 50)))
    assert (colors, 50) in [getattr(c, "shape", None) for c in jaxpr.consts]
    largest = max(math.prod(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars)
    assert largest <= 4 * colors * 50 < 4 * 50 * 48


def test_costs_against_dense(client):
    f = _register(client, "five-point stencil")
    p = client.sparsity(f, "jacobian", counts_only=True)
    assert p.rows is None and p.shape == (16, 36)
    assert p.bytes_per_point == 8 * p.nnz and p.dense_bytes_per_point == 8 * 16 * 36
    assert client.sparsity(f, "jacobian", output_dtype="float32").bytes_per_point == 4 * p.nnz


def test_arrays_format_and_options(client):
    f = client.register(
        "sum(s * x[1:] * x[:-1]) + sum(x**4)", {"x": (8,), "s": ()}, dtype="float64"
    )
    X = {"x": _points((8,)), "s": np.float64(1.5)}
    (rows, cols), values = client.hessian(
        f, X, sparse=True, sparse_format="arrays", shared=["s"], output_dtype="float32"
    )
    assert values.shape == (6, rows.size) and values.dtype == np.float32
    dense = client.hessian(f, X, shared=["s"])
    allclose(values, dense[:, rows, cols], dtype=np.float32)


def test_several_inputs_flattened(client):
    f = client.register("sum(a * b**2) + sum(a[1:] * a[:-1])", {"a": (5,), "b": (5,)})
    X = {"a": _points((5,), dtype=np.float32), "b": _points((5,), dtype=np.float32)}
    result = client.hessian(f, X, wrt=["a", "b"], flatten=True, sparse=True)
    dense = client.hessian(f, X, wrt=["a", "b"], flatten=True)
    allclose(np.stack([r.toarray() for r in result]), dense, dtype=np.float32)


def test_streamed_equals_unary(server_address, client):
    f = _register(client, "five-point stencil")
    X = _points((6, 6))
    with Client(server_address, stream_threshold=0) as streaming:
        streamed = streaming.jacobian(f, X, sparse=True)
    unary = client.jacobian(f, X, sparse=True)
    for a, b in zip(streamed, unary, strict=True):
        np.testing.assert_array_equal(a.toarray(), b.toarray())


def test_async_client(server_address):
    async def run():
        async with AsyncClient(server_address) as c:
            f = await c.register("sum(x[1:] * x[:-1])", {"x": (9,)}, dtype="float64")
            pattern = await c.sparsity(f, "hessian")
            result = await c.hessian(f, _points((9,)), sparse=True)
            return pattern, result

    pattern, result = asyncio.run(run())
    assert pattern.nnz == 16 and result[0].nnz == 16


def test_pattern_detected_once(client):
    f = _register(client, "banded")
    client.sparsity(f, "jacobian")
    size = len(sparse._cache)
    client.jacobian(f, _points((12,)), sparse=True)
    client.jacobian(f, _points((12,)), sparse=True)
    assert len(sparse._cache) == size


# Answered dense, and saying so.


def test_colours_near_n_answer_dense_and_say_so(client):
    f = client.register("sum(x)**2 + sum(x**3)", {"x": (6,)}, dtype="float64")
    p = client.sparsity(f, "hessian")
    assert p.colors == 6 and p.passes == p.dense_passes == 6
    assert "computed dense" in p.dense_reason
    X = _points((6,))
    result = client.hessian(f, X, sparse=True)
    allclose(np.stack([r.toarray() for r in result]), client.hessian(f, X))


def test_detection_without_a_rule_falls_back_to_dense(client):
    f = client.register("reshape(inv(reshape(x, (3, 3))), (9,))", {"x": (9,)}, dtype="float64")
    p = client.sparsity(f, "jacobian")
    assert p.every_entry and p.nnz == 81 and (p.coloring, p.colors, p.passes) == ("none", 0, 9)
    assert "no rule for primitive 'custom_linear_solve'" in p.dense_reason
    X = _points((9,)) + 4 * np.eye(3).reshape(9)
    result = client.jacobian(f, X, sparse=True)
    allclose(np.stack([r.toarray() for r in result]), _dense(client.jacobian(f, X), 9, 9))


def test_too_dense_to_detect_is_computed_dense(client, monkeypatch):
    monkeypatch.setattr(sparse, "MAX_DETECTED_NONZEROS", 100)
    f = client.register("tanh(sum(x)) * x + 0.5", {"x": (40,)}, dtype="float64")
    p = client.sparsity(f, "jacobian")
    assert p.every_entry and "too dense to detect" in p.dense_reason
    X = _points((40,), batch=2)
    result = client.jacobian(f, X, sparse=True)
    allclose(np.stack([r.toarray() for r in result]), client.jacobian(f, X))


# Refusals: status code and what the message says.


def _refused(call, code, fragment):
    with pytest.raises(Exception) as info:
        call()
    assert info.value.code == code, info.value
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("kind", "options", "fragment"),
    [
        ("gradient", {}, "sparse applies to kinds jacobian and hessian, not gradient"),
        ("value", {}, "sparse applies to kinds jacobian and hessian"),
        ("hessian", {"packed": True}, "sparse does not take packed"),
        ("jacobian", {"layout": "denominator"}, "layout=denominator"),
        ("hessian", {"wrt": ["a", "b"]}, "sparse takes one variable"),
    ],
)
def test_refused_options(client, kind, options, fragment):
    f = client.register("sum(a**2 * b)", {"a": (4,), "b": (4,)}, dtype="float64")
    X = {"a": _points((4,)), "b": _points((4,))}
    _refused(
        lambda: client.compute(f, kind, X, sparse=True, **options),
        grpc.StatusCode.INVALID_ARGUMENT,
        fragment,
    )


def test_sparse_hessian_needs_a_scalar_function(client):
    f = _register(client, "banded")
    _refused(
        lambda: client.hessian(f, _points((12,)), sparse=True),
        grpc.StatusCode.INVALID_ARGUMENT,
        "a sparse hessian is for a scalar function",
    )
    _refused(
        lambda: client.sparsity(f, "hessian"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "a sparse hessian is for a scalar function",
    )


def test_sparsity_of_another_kind(client):
    f = _register(client, "banded")
    _refused(
        lambda: client.sparsity(f, "hvp"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sparse applies to kinds jacobian and hessian, not hvp",
    )


def test_sparsity_of_an_unknown_function(server_address):
    with grpc.insecure_channel(server_address) as channel:
        stub = hessd_pb2_grpc.HessdStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Sparsity(hessd_pb2.SparsityRequest(function_id="0" * 64, kind=hessd_pb2.HESSIAN))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_client_checks_sparse_format(client):
    f = _register(client, "banded")
    with pytest.raises(InvalidArgument, match="sparse_format='dense'"):
        client.jacobian(f, _points((12,)), sparse=True, sparse_format="dense")
    with pytest.raises(InvalidArgument, match="only with sparse=True"):
        client.jacobian(f, _points((12,)), sparse_format="arrays")


@pytest.fixture(scope="module")
def export_client():
    server, port = create_server(ServerConfig(port=0, allow_jax_export=True, workers=2))
    server.start()
    with Client(f"127.0.0.1:{port}", timeout=120) as c:
        yield c
    server.stop(grace=None)


def test_jax_export_functions_are_refused(export_client):
    def banded(x):
        return x[1:-1] ** 2 - x[:-2] * jnp.sin(x[2:])

    f = export_client.register(banded, {"x": (8,)}, dtype="float64")
    for call in (
        lambda: export_client.jacobian(f, _points((8,)), sparse=True),
        lambda: export_client.sparsity(f, "jacobian"),
    ):
        _refused(
            call,
            grpc.StatusCode.INVALID_ARGUMENT,
            "sparse needs an expression function: pattern detection reads f's jaxpr",
        )


def test_readme_example_runs_as_written(server_address):
    match = re.search(r"<!-- sparse -->\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, "README.md lost its sparse block"
    code = match.group(1).replace("127.0.0.1:50051", server_address)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["2998 3 3 1000", "4 (1000, 1000) 2998"]


@pytest.fixture(scope="module")
def small_client():
    server, port = create_server(ServerConfig(port=0, max_output_bytes=500, workers=2))
    server.start()
    with Client(f"127.0.0.1:{port}", timeout=60) as c:
        yield c
    server.stop(grace=None)


def test_sparse_results_within_the_output_limit(small_client):
    c = small_client
    banded = _register(c, "banded")  # 30 nonzeros: 240 bytes a point
    assert len(c.jacobian(banded, _points((12,), batch=2), sparse=True)) == 2
    _refused(
        lambda: c.jacobian(banded, _points((12,), batch=4), sparse=True),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "send fewer points per request",
    )
    _refused(
        lambda: c.jacobian(banded, _points((12,), batch=1)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "sparse=True, if the matrix is sparse",
    )
    every = c.register("reshape(inv(reshape(x, (3, 3))), (9,))", {"x": (9,)}, dtype="float64")
    _refused(
        lambda: c.jacobian(every, _points((9,), batch=1), sparse=True),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "one point alone is 648 bytes",
    )


def test_a_known_pattern_goes_unary(server_address, monkeypatch):
    """The first call streams (its dense bound, 316 KB, is over the threshold); once nnz
    is known, a call whose values and indices fit goes unary."""
    with Client(server_address, stream_threshold=16384) as c:
        f = c.register("x[1:-1]**2 - x[:-2] * sin(x[2:])", {"x": (200,)}, dtype="float64")
        first = c.jacobian(f, _points((200,), batch=1), sparse=True)
        streamed = []
        unwrapped = c._streamed
        monkeypatch.setattr(c, "_streamed", lambda *a: streamed.append(a) or unwrapped(*a))
        again = c.jacobian(f, _points((200,), batch=1), sparse=True)
        assert not streamed and again[0].nnz == first[0].nnz == 594
        c.jacobian(f, _points((200,), batch=8), sparse=True)  # 594 * (8 * 8 + 8) bytes
        assert len(streamed) == 1
