"""The classic identities of matrix calculus, in denominator layout exactly as written, and
their numerator-layout transposes, at random A and x."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import allclose

N, M, BATCH = 4, 3, 5


@pytest.fixture
def a(rng):
    return rng.normal(size=(M, N))


@pytest.fixture
def square(rng):
    return rng.normal(size=(N, N))


@pytest.mark.parametrize("layout", ["numerator", "denominator"])
def test_d_Ax_dx_is_A_transposed(client, rng, a, layout):
    f = client.register("A @ x", {"x": (N,)}, {"A": a}, dtype="float64")
    x = rng.normal(size=(BATCH, N))
    jac = client.jacobian(f, x, layout=layout)
    expected = a.T if layout == "denominator" else a  # ∇ₓ(Ax) = Aᵀ
    allclose(jac, np.broadcast_to(expected, (BATCH, *expected.shape)))


@pytest.mark.parametrize("layout", ["numerator", "denominator"])
def test_d_xA_dx_is_A(client, rng, a, layout):
    f = client.register("x @ A", {"x": (M,)}, {"A": a}, dtype="float64")
    x = rng.normal(size=(BATCH, M))
    jac = client.jacobian(f, x, layout=layout)
    expected = a if layout == "denominator" else a.T  # ∇ₓ(xᵀA) = A
    allclose(jac, np.broadcast_to(expected, (BATCH, *expected.shape)))


@pytest.mark.parametrize("layout", ["numerator", "denominator"])
def test_d_xAx_dx_is_A_plus_AT_x(client, rng, square, layout):
    f = client.register("x @ A @ x", {"x": (N,)}, {"A": square}, dtype="float64")
    x = rng.normal(size=(BATCH, N))
    expected = x @ (square + square.T).T  # (A + Aᵀ) x per point
    allclose(client.gradient(f, x, layout=layout), expected)
    allclose(client.jacobian(f, x, layout=layout), expected)
    allclose(client.hessian(f, x, layout=layout), np.broadcast_to(square + square.T, (BATCH, N, N)))


@pytest.mark.parametrize("layout", ["numerator", "denominator"])
def test_d_norm_squared_dx_is_2x(client, rng, layout):
    f = client.register("sum(x**2)", {"x": (N,)}, dtype="float64")
    x = rng.normal(size=(BATCH, N))
    allclose(client.gradient(f, x, layout=layout), 2 * x)
    allclose(client.hessian(f, x, layout=layout), np.broadcast_to(2 * np.eye(N), (BATCH, N, N)))


@pytest.mark.parametrize("layout", ["numerator", "denominator"])
def test_d_frobenius_squared_dX_is_2X(client, rng, layout):
    f = client.register("norm(X)**2", {"X": (M, N)}, dtype="float64")
    x = rng.normal(size=(BATCH, M, N))
    allclose(client.gradient(f, x, layout=layout), 2 * x)
    allclose(client.jacobian(f, x, layout=layout), 2 * x)
