"""The device path on a GPU: the same requests as on the CPU, against closed forms.

Skipped where JAX sees no GPU (CI, the development machines)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import allclose

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def test_server_reports_the_gpu(client):
    info = client.server_info()
    assert info["backend"] == "gpu" and info["devices"][0]["platform"] == "gpu"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kinds_on_the_gpu(client, rng, dtype):
    a = rng.normal(size=(16, 16))
    f = client.register("x @ A @ x", {"x": (16,)}, {"A": a.astype(dtype)}, dtype=dtype)
    x = rng.normal(size=(300, 16)).astype(dtype)  # 300: padded to a bucket of 512
    sym = (a + a.T).astype(dtype)
    allclose(client.gradient(f, x), x @ sym.T, dtype=dtype, atol=1e-4)
    allclose(client.hessian(f, x), np.broadcast_to(sym, (300, 16, 16)), dtype=dtype, atol=1e-4)
    allclose(client.hvp(f, x, x), x @ sym.T, dtype=dtype, atol=1e-4)


def test_spectrum_on_the_gpu(client):
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 64)))
    eigenvalues = np.linspace(-2.0, 5.0, 64)
    f = client.register("0.5 * x @ A @ x", {"x": (64,)}, {"A": q @ np.diag(eigenvalues) @ q.T},
                        dtype="float64")  # fmt: skip
    exact = client.spectrum(f, np.zeros((4, 64)))
    allclose(exact.eigenvalues, np.tile(eigenvalues, (4, 1)), atol=1e-10)
    lanczos = client.spectrum(f, np.zeros((4, 64)), "lanczos", k=3, num_steps=64)
    allclose(lanczos.eigenvalues[:, [0, -1]], np.tile([-2.0, 5.0], (4, 1)), atol=1e-8)
