"""What training pipelines need: shared inputs (per-example gradients in one request),
several wrt (per-input blocks, or flattened), array-likes, and the async client."""

from __future__ import annotations

import asyncio

import jax.numpy as jnp
import numpy as np
import pytest

from hessd.client import AsyncClient, InvalidArgument, Spectrum

from conftest import allclose

MLP = "sum(tanh(x @ W1 + b1) * v)"
MLP_INPUTS = {"W1": (3, 4), "b1": (4,), "x": (3,), "v": (4,)}


@pytest.fixture(scope="module")
def mlp_points():
    rng = np.random.default_rng(5)
    return {name: rng.normal(size=(6, *shape)) for name, shape in MLP_INPUTS.items()}


def test_per_example_gradients_of_shared_parameters(client, rng):
    loss = client.register("(x @ w - y)**2", {"w": (3,), "x": (3,), "y": ()}, dtype="float64")
    w, x, y = rng.normal(size=3), rng.normal(size=(8, 3)), rng.normal(size=8)
    grads = client.gradient(loss, {"w": w, "x": x, "y": y}, wrt="w", shared=["w"])
    assert grads.shape == (8, 3)
    allclose(grads, 2 * (x @ w - y)[:, None] * x)
    # Equal to sending w once per example.
    allclose(grads, client.gradient(loss, {"w": np.tile(w, (8, 1)), "x": x, "y": y}, wrt="w"))
    hvp = client.hvp(loss, {"w": w, "x": x, "y": y}, np.ones((8, 3)), wrt="w", shared=["w"])
    allclose(hvp, 2 * x * x.sum(axis=1, keepdims=True))


def test_shared_input_with_a_batch_axis_is_refused(client):
    loss = client.register("(x @ w)**2", {"w": (3,), "x": (3,)}, dtype="float64")
    with pytest.raises(
        InvalidArgument, match=r"shared input 'w' has shape \(2, 3\); .*without a batch axis"
    ):
        client.value(loss, {"w": np.ones((2, 3)), "x": np.ones((2, 3))}, shared=["w"])


def test_every_input_shared_is_refused(client):
    f = client.register("sum(w**2)", {"w": (3,)}, dtype="float64")
    with pytest.raises(InvalidArgument, match="every input is shared"):
        client.value(f, np.ones(3), shared=["w"])


def test_unknown_shared_name_is_refused(client):
    f = client.register("sum(w**2)", {"w": (3,)}, dtype="float64")
    with pytest.raises(InvalidArgument, match="shared='u' is not an input"):
        client.value(f, np.ones((2, 3)), shared=["u"])


def test_several_wrt_give_per_input_results(client, mlp_points):
    f = client.register(MLP, MLP_INPUTS, dtype="float64")
    grads = client.gradient(f, mlp_points, wrt=["W1", "b1"])
    assert set(grads) == {"W1", "b1"}
    allclose(grads["W1"], client.gradient(f, mlp_points, wrt="W1"))
    allclose(grads["b1"], client.gradient(f, mlp_points, wrt="b1"))
    blocks = client.hessian(f, mlp_points, wrt=["W1", "b1"])
    assert {k: v.shape for k, v in blocks.items()} == {
        "W1,W1": (6, 3, 4, 3, 4),
        "W1,b1": (6, 3, 4, 4),
        "b1,W1": (6, 4, 3, 4),
        "b1,b1": (6, 4, 4),
    }
    allclose(blocks["W1,W1"], client.hessian(f, mlp_points, wrt="W1"))
    allclose(blocks["b1,b1"], client.hessian(f, mlp_points, wrt="b1"))
    allclose(blocks["W1,b1"], np.moveaxis(blocks["b1,W1"], 1, -1))


def test_flatten_concatenates_the_raveled_inputs(client, mlp_points):
    f = client.register(MLP, MLP_INPUTS, dtype="float64")
    grads = client.gradient(f, mlp_points, wrt=["W1", "b1"])
    flat = client.gradient(f, mlp_points, wrt=["W1", "b1"], flatten=True)
    assert flat.shape == (6, 16)
    allclose(flat, np.concatenate([grads["W1"].reshape(6, 12), grads["b1"]], axis=1))
    h = client.hessian(f, mlp_points, wrt=["W1", "b1"], flatten=True)
    blocks = client.hessian(f, mlp_points, wrt=["W1", "b1"])
    assert h.shape == (6, 16, 16)
    allclose(h[:, :12, 12:], blocks["W1,b1"].reshape(6, 12, 4))
    allclose(h, np.swapaxes(h, 1, 2))
    v = np.random.default_rng(0).normal(size=(6, 16))
    allclose(
        client.hvp(f, mlp_points, v, wrt=["W1", "b1"], flatten=True), np.einsum("bij,bj->bi", h, v)
    )
    s = client.spectrum(f, mlp_points, wrt=["W1", "b1"])
    allclose(s.eigenvalues, np.linalg.eigvalsh(h), atol=1e-10)


def test_several_wrt_jacobian_in_both_layouts(client, mlp_points):
    f = client.register(
        "tanh(x @ W1 + b1)", {k: MLP_INPUTS[k] for k in ("W1", "b1", "x")}, dtype="float64"
    )
    points = {k: mlp_points[k] for k in ("W1", "b1", "x")}
    num = client.jacobian(f, points, wrt=["W1", "b1"])
    den = client.jacobian(f, points, wrt=["W1", "b1"], layout="denominator")
    assert num["W1"].shape == (6, 4, 3, 4) and den["W1"].shape == (6, 3, 4, 4)
    allclose(den["W1"], np.moveaxis(num["W1"], 1, -1))
    allclose(num["b1"], client.jacobian(f, points, wrt="b1"))


def test_hvp_with_several_wrt_needs_flatten(client, mlp_points):
    f = client.register(MLP, MLP_INPUTS, dtype="float64")
    with pytest.raises(InvalidArgument, match="set flatten=True"):
        client.hvp(f, mlp_points, np.ones((6, 16)), wrt=["W1", "b1"])


def test_wrt_named_twice_is_refused(client, mlp_points):
    f = client.register(MLP, MLP_INPUTS, dtype="float64")
    with pytest.raises(InvalidArgument, match="wrt names 'b1' twice"):
        client.gradient(f, mlp_points, wrt=["b1", "b1"])


class ArrayLike:
    """Anything with __array__ is a point set, as for np.asarray."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)


def test_array_likes_are_accepted_and_numpy_comes_back(client):
    f = client.register("sum(x**2)", {"x": (2,)}, dtype="float64")
    expected = np.array([[2.0, 4.0], [6.0, 8.0]])
    for points in ([[1.0, 2.0], [3.0, 4.0]], jnp.array([[1.0, 2.0], [3.0, 4.0]]),
                   ArrayLike(np.array([[1.0, 2.0], [3.0, 4.0]])), [[1, 2], [3, 4]]):  # fmt: skip
        result = client.gradient(f, points)
        assert type(result) is np.ndarray
        allclose(result, expected)


def test_torch_tensors_are_accepted(client):
    torch = pytest.importorskip("torch")
    f = client.register("sum(x**2)", {"x": (2,)}, dtype="float64")
    allclose(client.gradient(f, torch.tensor([[1.0, 2.0]], dtype=torch.float64)), [[2.0, 4.0]])


def test_async_client(server_address):
    async def session():
        async with AsyncClient(server_address, timeout=60) as c:
            info = await c.server_info()
            f = await c.register("x @ A @ x", {"x": (2,)}, {"A": np.eye(2)}, dtype="float64")
            x = np.array([[1.0, 2.0], [3.0, 4.0]])
            results = await asyncio.gather(
                c.value(f, x), c.gradient(f, x), c.hessian(f, x), c.hvp(f, x, x), c.spectrum(f, x)
            )
            with pytest.raises(InvalidArgument, match="only defined for scalar-output"):
                await c.gradient(await c.register("sin(x)", {"x": (2,)}, dtype="float64"), x)
            return info, results

    info, (value, grad, hess, hvp, spectrum) = asyncio.run(session())
    assert info["backend"] == "cpu"
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    allclose(value, [5.0, 25.0])
    allclose(grad, 2 * x)
    allclose(hess, np.broadcast_to(2 * np.eye(2), (2, 2, 2)))
    allclose(hvp, 2 * x)
    assert isinstance(spectrum, Spectrum) and spectrum.point_class.tolist() == ["minimum"] * 2
