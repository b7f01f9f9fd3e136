"""Every derivative kind, over a real socket, against float64 central finite differences
and against each other (hvp = H v, jvp = J t, vjp = uᵀ J, auto = forward = reverse)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import fd
from conftest import allclose


@dataclasses.dataclass(frozen=True)
class Case:
    expression: str
    inputs: dict
    constants: dict = dataclasses.field(default_factory=dict)
    wrt: str | None = None


_A = np.random.default_rng(1).normal(size=(3, 4))
CASES = {
    "tanh_affine": Case("sum(tanh(A @ x)**2)", {"x": (4,)}, {"A": _A}),
    "vector_out": Case("sin(x) * exp(-x**2)", {"x": (3,)}),
    "matrix_in": Case("trace(X @ X.T) + sum(sin(X))", {"X": (2, 3)}),
    "several_inputs_w": Case(
        "sum(w * x) * log1p(exp(b))", {"x": (3,), "w": (3,), "b": ()}, wrt="w"
    ),
    "several_inputs_b": Case(
        "sum(w * x) * log1p(exp(b))", {"x": (3,), "w": (3,), "b": ()}, wrt="b"
    ),
    "matrix_out": Case("outer(x, x) * sin(x[0])", {"x": (3,)}),
    "scalar_in": Case("stack([cos(t), sin(t), t**2])", {"t": ()}),
    "logsumexp": Case("logsumexp(A @ x) - 0.5 * norm(x)**2", {"x": (4,)}, {"A": _A}),
}
SCALAR = [k for k in CASES if k not in ("vector_out", "matrix_out", "scalar_in")]
BATCH = 3


@pytest.fixture(scope="module")
def registered(server_address):
    from hessd.client import Client

    with Client(server_address) as c:
        yield {
            name: c.register(case.expression, case.inputs, case.constants, dtype="float64")
            for name, case in CASES.items()
        }


def setup(client, registered, name):
    case = CASES[name]
    f = registered[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    points = {k: rng.normal(size=(BATCH, *s)) for k, s in case.inputs.items()}
    wrt = case.wrt or next(iter(case.inputs))

    def value(p):
        return client.value(f, p)

    return f, points, wrt, value


def with_wrt(name):
    return {"wrt": CASES[name].wrt} if CASES[name].wrt else {}


@pytest.mark.parametrize("name", list(CASES))
def test_shapes(client, registered, name):
    f, points, wrt, _ = setup(client, registered, name)
    x, out = f.inputs[wrt], f.output_shape
    kw = with_wrt(name)
    assert client.value(f, points).shape == (BATCH, *out)
    assert client.jacobian(f, points, **kw).shape == (BATCH, *out, *x)
    assert client.jacobian(f, points, layout="denominator", **kw).shape == (BATCH, *x, *out)
    assert client.hessian(f, points, **kw).shape == (BATCH, *out, *x, *x)
    assert client.hessian(f, points, layout="denominator", **kw).shape == (BATCH, *x, *x, *out)
    assert client.jvp(f, points, points[wrt], **kw).shape == (BATCH, *out)
    u = np.ones((BATCH, *out))
    assert client.vjp(f, points, u, **kw).shape == (BATCH, *x)


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("name", list(CASES))
def test_jacobian_matches_finite_differences(client, registered, name, mode):
    f, points, wrt, value = setup(client, registered, name)
    jac = client.jacobian(f, points, mode=mode, **with_wrt(name))
    allclose(jac, fd.jacobian(value, points, wrt), fd=True)


@pytest.mark.parametrize("name", SCALAR)
def test_gradient_matches_finite_differences(client, registered, name):
    f, points, wrt, value = setup(client, registered, name)
    allclose(client.gradient(f, points, **with_wrt(name)), fd.jacobian(value, points, wrt), fd=True)


@pytest.mark.parametrize("name", list(CASES))
def test_hessian_matches_finite_differences(client, registered, name):
    f, points, wrt, value = setup(client, registered, name)
    hess = client.hessian(f, points, **with_wrt(name))
    allclose(hess, fd.hessian(value, points, wrt), fd=True, atol=1e-5)


@pytest.mark.parametrize("name", SCALAR)
def test_hessian_of_scalar_is_symmetric(client, registered, name):
    f, points, wrt, _ = setup(client, registered, name)
    h = client.hessian(f, points, **with_wrt(name))
    n = math.prod(f.inputs[wrt])
    h = h.reshape(BATCH, n, n)
    allclose(h, np.swapaxes(h, 1, 2))


@pytest.mark.parametrize("name", SCALAR)
def test_hvp_equals_hessian_times_v(client, registered, name):
    f, points, wrt, _ = setup(client, registered, name)
    kw = with_wrt(name)
    v = np.random.default_rng(2).normal(size=points[wrt].shape)
    n = math.prod(f.inputs[wrt])
    h = client.hessian(f, points, **kw).reshape(BATCH, n, n)
    expected = np.einsum("bij,bj->bi", h, v.reshape(BATCH, n)).reshape(v.shape)
    allclose(client.hvp(f, points, v, **kw), expected)


@pytest.mark.parametrize("name", list(CASES))
def test_jvp_and_vjp_equal_jacobian_products(client, registered, name):
    f, points, wrt, _ = setup(client, registered, name)
    kw = with_wrt(name)
    rng = np.random.default_rng(3)
    n, m = math.prod(f.inputs[wrt]), math.prod(f.output_shape)
    jac = client.jacobian(f, points, **kw).reshape(BATCH, m, n)
    t = rng.normal(size=(BATCH, *f.inputs[wrt]))
    u = rng.normal(size=(BATCH, *f.output_shape))
    jt = np.einsum("bij,bj->bi", jac, t.reshape(BATCH, n)).reshape(BATCH, *f.output_shape)
    ujac = np.einsum("bi,bij->bj", u.reshape(BATCH, m), jac).reshape(t.shape)
    allclose(client.jvp(f, points, t, **kw), jt)
    allclose(client.vjp(f, points, u, **kw), ujac)


@pytest.mark.parametrize("name", list(CASES))
def test_auto_mode_equals_forward_and_reverse(client, registered, name):
    f, points, _, _ = setup(client, registered, name)
    kw = with_wrt(name)
    auto = client.jacobian(f, points, mode="auto", **kw)
    allclose(auto, client.jacobian(f, points, mode="forward", **kw))
    allclose(auto, client.jacobian(f, points, mode="reverse", **kw))


def test_denominator_layout_moves_output_axes_last(client, registered):
    f, points, _, _ = setup(client, registered, "matrix_out")  # (3,) -> (3, 3)
    num = client.jacobian(f, points)
    den = client.jacobian(f, points, layout="denominator")
    np.testing.assert_array_equal(den, np.moveaxis(num, 3, 1))
    h_num = client.hessian(f, points)
    h_den = client.hessian(f, points, layout="denominator")
    np.testing.assert_array_equal(h_den, np.transpose(h_num, (0, 3, 4, 1, 2)))


def test_float32_is_the_default_and_stays_float32(client, rng):
    f = client.register("sum(tanh(A @ x)**2)", {"x": (4,)}, {"A": _A.astype(np.float32)})
    x = rng.normal(size=(5, 4)).astype(np.float32)
    f64 = client.register("sum(tanh(A @ x)**2)", {"x": (4,)}, {"A": _A}, dtype="float64")
    for kind in ("value", "gradient", "hessian"):
        out32 = client.compute(f, kind, x)
        out64 = client.compute(f64, kind, x.astype(np.float64))
        assert out32.dtype == np.float32 and out64.dtype == np.float64
        allclose(out32, out64, dtype=np.float32, atol=1e-5)


def test_float64_spec_computes_in_float64(client):
    # (x + 1e-10) - x is 0 in float32 arithmetic and ~1e-10 in float64.
    x = np.ones((2, 1))
    f64 = client.register("sum((x + 1e-10) - x)", {"x": (1,)}, dtype="float64")
    f32 = client.register("sum((x + 1e-10) - x)", {"x": (1,)}, dtype="float32")
    np.testing.assert_allclose(client.value(f64, x), 1e-10, rtol=1e-6)
    np.testing.assert_array_equal(client.value(f32, x.astype(np.float32)), 0.0)


def test_nan_and_inf_points_are_computed_not_rejected(client):
    f = client.register("sum(x**2)", {"x": (2,)}, dtype="float64")
    x = np.array([[np.nan, 1.0], [np.inf, 1.0], [1.0, 2.0]])
    value = client.value(f, x)
    assert np.isnan(value[0]) and np.isinf(value[1]) and value[2] == 5.0
    grad = client.gradient(f, x)
    assert np.isnan(grad[0, 0]) and grad[0, 1] == 2.0 and np.isinf(grad[1, 0])


def test_empty_batch(client):
    f = client.register("sum(x**2)", {"x": (2,)}, dtype="float64")
    assert client.hessian(f, np.zeros((0, 2))).shape == (0, 2, 2)


def test_points_as_a_list_take_the_function_dtype(client):
    f = client.register("sum(x**2)", {"x": (3,)})  # float32, the default
    gradient = client.gradient(f, [[0.1, 0.2, 0.3]])
    assert gradient.dtype == np.float32
    np.testing.assert_allclose(gradient, [[0.2, 0.4, 0.6]], rtol=1e-6)
