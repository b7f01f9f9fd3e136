"""Hessian analysis over a real socket: exact and iterative spectra against matrices with
known eigenvalues, classification of stationary points, Taylor models."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from hessd.client import InvalidArgument

from conftest import allclose


def with_spectrum(eigenvalues, seed=0):
    """A symmetric matrix Q diag(λ) Qᵀ with a random orthogonal Q."""
    n = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q @ np.diag(eigenvalues) @ q.T


def quadratic(client, eigenvalues, dtype="float64", seed=0):
    a = with_spectrum(np.asarray(eigenvalues, float), seed).astype(dtype)
    return client.register("0.5 * x @ A @ x", {"x": (len(eigenvalues),)}, {"A": a}, dtype=dtype), a


@pytest.mark.parametrize(
    ("eigenvalues", "expected"),
    [
        ([1.0, 2.0, 5.0], "minimum"),
        ([-1.0, -2.0, -5.0], "maximum"),
        ([-1.0, 2.0, 5.0], "saddle"),
        ([0.0, 2.0, 5.0], "degenerate"),
        ([-3.0, 0.0, -1.0], "degenerate"),
    ],
)
def test_exact_classifies_quadratics(client, eigenvalues, expected):
    f, _ = quadratic(client, eigenvalues)
    x = np.array([[0.0, 0.0, 0.0], [1.0, -1.0, 0.5]])
    s = client.spectrum(f, x)
    allclose(s.eigenvalues, np.tile(np.sort(eigenvalues), (2, 1)), atol=1e-12)
    assert s.point_class.tolist() == [expected, expected]
    assert s.stationary.tolist() == [True, False]
    assert s.gradient_norm[0] == 0.0 and s.gradient_norm[1] > 0


def test_exact_eigenvectors_and_agreement_with_hessian(client, rng):
    f = client.register("sum(tanh(A @ x)**2) + 0.1 * sum(x**4)", {"x": (6,)},
                        {"A": rng.normal(size=(4, 6))}, dtype="float64")  # fmt: skip
    x = rng.normal(size=(3, 6))
    s = client.spectrum(f, x, eigenvectors=True)
    h = client.hessian(f, x)
    allclose(s.eigenvalues, np.linalg.eigvalsh(h), atol=1e-10)
    hv = np.einsum("bij,bjk->bik", h, s.eigenvectors)
    allclose(hv, s.eigenvectors * s.eigenvalues[:, None, :], atol=1e-10)
    allclose(s.gradient_norm, np.linalg.norm(client.gradient(f, x), axis=1))


@pytest.mark.parametrize(
    ("expression", "point", "expected", "stationary"),
    [
        ("(1 - x[0])**2 + 100 * (x[1] - x[0]**2)**2", [1.0, 1.0], "minimum", True),
        ("(1 - x[0])**2 + 100 * (x[1] - x[0]**2)**2", [-1.0, 1.0], "minimum", False),
        ("x[0]**2 - x[1]**2", [0.0, 0.0], "saddle", True),
        ("-sum(x**2) + 3.0", [0.0, 0.0], "maximum", True),
        ("x[0]**4 + x[1]**2", [0.0, 0.0], "degenerate", True),  # H = diag(0, 2)
    ],
)
def test_classification_of_stationary_points(client, expression, point, expected, stationary):
    f = client.register(expression, {"x": (2,)}, dtype="float64")
    s = client.spectrum(f, np.array([point]))
    assert s.point_class[0] == expected
    assert bool(s.stationary[0]) is stationary


def test_default_tolerances_scale_with_dtype_and_hessian_norm(client):
    f, _ = quadratic(client, [1e-9, 2.0, 4.0])
    s = client.spectrum(f, np.zeros((1, 3)))
    allclose(s.tol, np.sqrt(np.finfo(np.float64).eps) * 4.0)
    allclose(s.gtol, np.sqrt(np.finfo(np.float64).eps) * 4.0)
    assert s.point_class[0] == "degenerate"  # 1e-9 < tol = 6e-8
    assert client.spectrum(f, np.zeros((1, 3)), tol=1e-10).point_class[0] == "minimum"
    # float32: tol = sqrt(eps32) * 4 = 1.4e-3, so 1e-2 is curvature and 1e-3 is not.
    for smallest, expected in ((1e-2, "minimum"), (1e-3, "degenerate")):
        f32, _ = quadratic(client, [smallest, 2.0, 4.0], dtype="float32")
        s32 = client.spectrum(f32, np.zeros((1, 3), np.float32))
        assert s32.eigenvalues.dtype == np.float32
        allclose(s32.tol, np.sqrt(np.finfo(np.float32).eps) * 4.0, dtype=np.float32)
        assert s32.point_class[0] == expected


OUTLIERS = [-5.0, -3.0, 3.0, 4.0, 10.0]
BULK = list(np.linspace(-1.0, 1.0, 95))


def test_lanczos_finds_extreme_eigenvalues_and_vectors(client):
    f, a = quadratic(client, BULK + OUTLIERS)  # n = 100
    x = np.random.default_rng(1).normal(size=(2, 100))
    s = client.spectrum(f, x, "lanczos", k=2, eigenvectors=True)
    expected = np.array([-5.0, -3.0, 4.0, 10.0])
    allclose(s.eigenvalues, np.tile(expected, (2, 1)), atol=1e-8)
    assert s.eigenvectors.shape == (2, 100, 4)
    av = np.einsum("ij,bjk->bik", a, s.eigenvectors)
    allclose(av, s.eigenvectors * s.eigenvalues[:, None], atol=1e-6)
    assert np.all(s.residuals < 1e-6)
    assert s.point_class.tolist() == ["saddle", "saddle"]
    # The edge of the clustered bulk converges more slowly; its residual says by how much.
    s3 = client.spectrum(f, x, "lanczos", k=3)
    error = np.abs(s3.eigenvalues[:, 2] + 1.0)
    assert np.all(error < 1e-5) and np.all(error <= s3.residuals[:, 2] + 1e-12)


def test_lanczos_float32(client):
    f, _ = quadratic(client, BULK + OUTLIERS, dtype="float32")
    s = client.spectrum(f, np.zeros((1, 100), np.float32), "lanczos", k=2)
    assert s.eigenvalues.dtype == np.float32
    allclose(s.eigenvalues[0], [-5.0, -3.0, 4.0, 10.0], dtype=np.float32, fd=True)


def test_lanczos_agrees_with_exact_on_a_nonquadratic(client, rng):
    f = client.register("sum(tanh(A @ x)**2) - 0.05 * sum(x**2)", {"x": (40,)},
                        {"A": rng.normal(size=(30, 40)) / 6}, dtype="float64")  # fmt: skip
    x = rng.normal(size=(2, 40))
    exact = client.spectrum(f, x)
    lanczos = client.spectrum(f, x, "lanczos", k=4, num_steps=40)
    allclose(lanczos.eigenvalues[:, :4], exact.eigenvalues[:, :4], atol=1e-9)
    allclose(lanczos.eigenvalues[:, 4:], exact.eigenvalues[:, -4:], atol=1e-9)
    assert lanczos.point_class.tolist() == exact.point_class.tolist()


@pytest.mark.parametrize("estimator", ["hutch++", "hutchinson"])
def test_trace_estimate(client, estimator):
    eigenvalues = 10.0 / np.arange(1, 201) ** 2  # fast decay: Hutch++'s sketch takes most
    f, _ = quadratic(client, eigenvalues)
    x = np.zeros((1, 200))
    s = client.spectrum(f, x, "trace", num_matvecs=60, trace_estimator=estimator, seed=3)
    assert abs(s.trace[0] - eigenvalues.sum()) <= 4 * s.trace_std_error[0] + 1e-9
    again = client.spectrum(f, x, "trace", num_matvecs=60, trace_estimator=estimator, seed=3)
    np.testing.assert_array_equal(s.trace, again.trace)  # a seed fixes the probes


def test_hutchpp_beats_hutchinson_on_decaying_spectrum(client):
    eigenvalues = 10.0 / np.arange(1, 201) ** 2
    f, _ = quadratic(client, eigenvalues)
    errors = {}
    for estimator in ("hutch++", "hutchinson"):
        estimates = [
            client.spectrum(f, np.zeros((1, 200)), "trace", num_matvecs=60,
                            trace_estimator=estimator, seed=seed).trace[0]
            for seed in range(8)
        ]  # fmt: skip
        errors[estimator] = np.mean(np.abs(np.array(estimates) - eigenvalues.sum()))
    assert errors["hutch++"] * 3 < errors["hutchinson"]


def test_density_quadrature_and_smoothed_density(client):
    eigenvalues = np.concatenate([np.full(50, -1.0), np.full(50, 2.0)]) + np.linspace(0, 0.1, 100)
    f, _ = quadratic(client, eigenvalues)
    s = client.spectrum(f, np.zeros((1, 100)), "density", num_probes=8, num_steps=40, grid_size=400)
    assert s.nodes.shape == s.weights.shape == (1, 8, 40)
    allclose(s.weights.sum(axis=2), np.ones((1, 8)), atol=1e-10)
    assert s.nodes.min() >= -1.0 - 1e-8 and s.nodes.max() <= 2.1 + 1e-8
    grid, density = s.grid[0], s.density[0]
    assert abs(np.trapezoid(density, grid) - 1.0) < 1e-3
    left = np.trapezoid(np.where(grid < 0.5, density, 0.0), grid)
    assert abs(left - 0.5) < 0.15
    # Gauss quadrature with 40 nodes is exact for moments up to 79: the mean of the second
    # moments estimates tr(A²)/n.
    second = np.sum(s.weights * s.nodes**2, axis=2).mean()
    assert abs(second - np.mean(eigenvalues**2)) < 0.2 * np.mean(eigenvalues**2)


def test_density_classifies_from_extreme_ritz_values(client):
    f, _ = quadratic(client, [0.5, 1.0, 2.0, 3.0])
    s = client.spectrum(f, np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]), "density")
    assert s.point_class.tolist() == ["minimum", "minimum"]
    assert s.stationary.tolist() == [True, False]
    saddle, _ = quadratic(client, [-0.5, 1.0, 2.0, 3.0])
    assert client.spectrum(saddle, np.zeros((1, 4)), "density").point_class[0] == "saddle"


def test_empty_batch(client):
    f, _ = quadratic(client, [1.0, 2.0])
    assert client.spectrum(f, np.zeros((0, 2))).eigenvalues.shape == (0, 2)


# Refusals, each with the status and a fragment of the message.


def test_spectrum_of_non_scalar_function(client):
    f = client.register("sin(x)", {"x": (3,)}, dtype="float64")
    with pytest.raises(InvalidArgument, match="spectrum needs a scalar-output function"):
        client.spectrum(f, np.zeros((1, 3)))


def test_option_for_another_method(client):
    f, _ = quadratic(client, [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(
        InvalidArgument, match="k does not apply to method exact; it applies to lanczos"
    ):
        client.spectrum(f, np.zeros((1, 4)), "exact", k=2)
    with pytest.raises(InvalidArgument, match="num_probes does not apply to method trace"):
        client.spectrum(f, np.zeros((1, 4)), "trace", num_probes=2)


def test_lanczos_k_too_large(client):
    f, _ = quadratic(client, [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(InvalidArgument, match="k must be between 1 and 2; got k=3") as info:
        client.spectrum(f, np.zeros((1, 4)), "lanczos", k=3)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_num_steps_above_n(client):
    f, _ = quadratic(client, [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(InvalidArgument, match="num_steps must be at most n=4"):
        client.spectrum(f, np.zeros((1, 4)), "density", num_steps=5)


def test_exact_over_the_size_limit(client):
    f = client.register("sum(x**2)", {"x": (5000,)}, dtype="float64")
    with pytest.raises(InvalidArgument, match="Use method lanczos"):
        client.spectrum(f, np.zeros((1, 5000)))


def test_unknown_method(client):
    f, _ = quadratic(client, [1.0, 2.0])
    with pytest.raises(InvalidArgument, match="method='qr'"):
        client.spectrum(f, np.zeros((1, 2)), "qr")


# Taylor models.


def test_taylor2_equals_value_gradient_hessian(client, rng):
    f = client.register("sum(tanh(A @ x)**2) + log1p(sum(x**2))", {"x": (5,)},
                        {"A": rng.normal(size=(3, 5))}, dtype="float64")  # fmt: skip
    x = rng.normal(size=(4, 5))
    t = client.taylor2(f, x)
    allclose(t["value"], client.value(f, x))
    allclose(t["gradient"], client.gradient(f, x))
    allclose(t["hessian"], client.hessian(f, x))
    d = 1e-3 * rng.normal(size=x.shape)
    model = (
        t["value"]
        + np.einsum("bi,bi->b", t["gradient"], d)
        + 0.5 * np.einsum("bi,bij,bj->b", d, t["hessian"], d)
    )
    # The second-order model's error is third order in |d|.
    assert np.all(np.abs(client.value(f, x + d) - model) < 1e-6)


def test_taylor_of_polynomial_is_exact(client, rng):
    f = client.register("sum(x**3)", {"x": (3,)}, dtype="float64")
    x, d = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    series = client.taylor(f, x, d, order=4)
    expected = np.stack(
        [3 * np.sum(x**2 * d, 1), 6 * np.sum(x * d**2, 1), 6 * np.sum(d**3, 1), np.zeros(2)], 1
    )
    allclose(series, expected)
    t = 0.7  # a cubic's series ends: f(x + t d) is exact
    rebuilt = client.value(f, x) + sum(
        t**k / math.factorial(k) * series[:, k - 1] for k in range(1, 5)
    )
    allclose(rebuilt, client.value(f, x + t * d))


@pytest.mark.parametrize(
    ("expression", "derivative"),
    [
        ("sum(exp(x))", lambda x, d, k: np.sum(np.exp(x) * d**k, axis=-1)),
        ("sum(sin(x))", lambda x, d, k: np.sum(np.sin(x + k * np.pi / 2) * d**k, axis=-1)),
    ],
)
def test_taylor_of_exp_and_sin(client, rng, expression, derivative):
    f = client.register(expression, {"x": (3,)}, dtype="float64")
    x, d = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    series = client.taylor(f, x, d, order=6)
    allclose(series, np.stack([derivative(x, d, k) for k in range(1, 7)], axis=1), atol=1e-10)


def test_taylor_of_vector_function_and_linear_algebra(client, rng):
    f = client.register("sin(x)", {"x": (3,)}, dtype="float64")
    x, d = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    series = client.taylor(f, x, d, order=3)
    assert series.shape == (2, 3, 3)
    allclose(series[:, 1], -np.sin(x) * d**2)
    g = client.register("logdet(X @ X.T + 3.0 * inv(X.T @ X))", {"X": (2, 2)}, dtype="float64")
    X, D = np.eye(2)[None] + 0.1 * rng.normal(size=(1, 2, 2)), rng.normal(size=(1, 2, 2))
    h = 1e-3
    series = client.taylor(g, X, D, order=2)
    values = client.value(g, np.concatenate([X - h * D, X, X + h * D]))
    allclose(series[0, 0], (values[2] - values[0]) / (2 * h), fd=True)
    allclose(series[0, 1], (values[2] - 2 * values[1] + values[0]) / h**2, fd=True, atol=1e-4)


def test_taylor_order_out_of_range(client):
    f = client.register("sum(x**2)", {"x": (2,)}, dtype="float64")
    with pytest.raises(InvalidArgument, match="order between 1 and 8, got 9"):
        client.taylor(f, np.zeros((1, 2)), np.ones((1, 2)), order=9)
    with pytest.raises(InvalidArgument, match="order between 1 and 8, got 0"):
        client.taylor(f, np.zeros((1, 2)), np.ones((1, 2)), order=0)


def test_taylor2_of_non_scalar(client):
    f = client.register("sin(x)", {"x": (2,)}, dtype="float64")
    with pytest.raises(InvalidArgument, match="taylor2 is only defined for scalar-output"):
        client.taylor2(f, np.zeros((1, 2)))
