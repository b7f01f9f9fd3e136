"""Curvature over data sets: objectives, GGN and Fisher, diagonals, solves, resident tensors.

Against closed forms in float64: for a linear model with MSE the GGN equals the Hessian and
XᵀX/N; for softmax cross-entropy the Fisher's expectation is the GGN; the empirical Fisher
is the mean outer product of per-example gradients; a damped solve equals numpy's."""

from __future__ import annotations

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessd.client import Client, InvalidArgument, ResourceExhausted
from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc
from hessd.service.config import ServerConfig
from hessd.service.server import create_server

from conftest import allclose

P, N, C = 5, 23, 3  # parameters, examples, classes
RNG = np.random.default_rng(11)
X = RNG.normal(size=(N, P))
Y = RNG.normal(size=(N,))
LABELS = RNG.integers(0, C, size=N)
THETA = RNG.normal(size=(2, P))  # two checkpoints
W3 = RNG.normal(size=(2, P * C))  # softmax regression's parameters, (P*C,) flat


@pytest.fixture(scope="module")
def c():
    server, port = create_server(
        ServerConfig(port=0, workers=4, allow_jax_export=True, max_resident_bytes=1 << 20)
    )
    server.start()
    with Client(f"127.0.0.1:{port}", timeout=120) as client:
        yield client
    server.stop(grace=None)


@pytest.fixture(scope="module")
def linear(c):
    return c.register("x @ w", {"w": (P,), "x": (P,)}, dtype="float64")


@pytest.fixture(scope="module")
def softmax(c):
    """Logits of softmax regression: (C,) from w (P*C,) and x (P,)."""
    return c.register("x @ reshape(w, (5, 3))", {"w": (P * C,), "x": (P,)}, dtype="float64")


def closed_gram():
    return X.T @ X / N


@pytest.mark.parametrize("chunk_size", [0, 1, 4, N])
@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_linear_mse_ggn_equals_hessian_equals_gram(c, linear, operator, chunk_size):
    H = c.hessian(
        linear, THETA, data={"x": X, "y": Y}, loss="mse", operator=operator, chunk_size=chunk_size
    )
    assert H.shape == (2, P, P)
    for h in H:
        allclose(h, closed_gram(), atol=1e-12)


def test_scalar_loss_objective_value_gradient_hvp(c, rng):
    """Without a loss, f is the per-example term: L(θ) = mean f(θ, xᵢ, yᵢ)."""
    f = c.register("0.5 * (x @ w - t)**2", {"w": (P,), "x": (P,), "t": ()}, dtype="float64")
    data = {"x": X, "t": Y}
    residual = X @ THETA.T - Y[:, None]  # (N, 2)
    allclose(c.value(f, THETA, data=data), 0.5 * np.mean(residual**2, axis=0), atol=1e-12)
    allclose(c.gradient(f, THETA, data=data), (X.T @ residual / N).T, atol=1e-12)
    v = rng.normal(size=(2, P))
    allclose(c.hvp(f, THETA, v, data=data), v @ closed_gram(), atol=1e-12)
    total = c.value(f, THETA, data=data, reduction="sum")
    allclose(total, 0.5 * np.sum(residual**2, axis=0), atol=1e-10)


def test_result_does_not_depend_on_chunking(c, softmax):
    data = {"x": X, "y": LABELS}
    v = RNG.normal(size=(2, P * C))
    results = [
        c.hvp(softmax, W3, v, data=data, loss="softmax_cross_entropy", chunk_size=k)
        for k in (1, 5, N)
    ]
    for r in results[1:]:
        allclose(r, results[0], atol=1e-13)


def softmax_closed_forms(w):
    """GGN and the mean outer product of per-example gradients, by hand."""
    W = w.reshape(P, C)
    logits = X @ W
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    ggn = np.zeros((P * C, P * C))
    outer = np.zeros((P * C, P * C))
    grads = []
    for i in range(N):
        H_l = np.diag(p[i]) - np.outer(p[i], p[i])
        J = np.kron(X[i][:, None], np.eye(C))  # d logits / d vec(W), (P*C, C) -> transpose
        ggn += J @ H_l @ J.T / N
        g = J @ (p[i] - np.eye(C)[LABELS[i]])
        grads.append(g)
        outer += np.outer(g, g) / N
    return ggn, outer, np.array(grads)


def test_softmax_ggn_and_empirical_fisher_closed_forms(c, softmax):
    data = {"x": X, "y": LABELS}
    ggn = c.hessian(softmax, W3, data=data, loss="softmax_cross_entropy", operator="ggn")
    ef = c.hessian(
        softmax, W3, data=data, loss="softmax_cross_entropy", operator="empirical_fisher"
    )
    for k in range(2):
        want_ggn, want_ef, _ = softmax_closed_forms(W3[k])
        allclose(ggn[k], want_ggn, atol=1e-12)
        allclose(ef[k], want_ef, atol=1e-12)


def test_softmax_fisher_is_the_ggn_in_expectation(c, softmax):
    """Monte Carlo Fisher with S labels per example: its error falls as 1/√(S N)."""
    data = {"x": X, "y": LABELS}
    want, _, _ = softmax_closed_forms(W3[0])
    errors = []
    for samples in (1, 400):
        fisher = c.hessian(
            softmax, W3[:1], data=data, loss="softmax_cross_entropy", operator="fisher",
            mc_samples=samples, seed=5,
        )[0]  # fmt: skip
        allclose(fisher, fisher.T, atol=1e-12)
        errors.append(np.linalg.norm(fisher - want) / np.linalg.norm(want))
    assert errors[1] < 0.08
    assert errors[1] < errors[0] / 4


def test_fisher_is_reproducible_from_its_seed(c, softmax):
    data = {"x": X, "y": LABELS}
    calls = [
        c.hessian(
            softmax,
            W3,
            data=data,
            loss="softmax_cross_entropy",
            operator="fisher",
            seed=seed,
            chunk_size=chunk,
        )
        for seed, chunk in ((1, 0), (1, 4), (2, 0))
    ]
    allclose(calls[0], calls[1], atol=1e-13)
    assert not np.allclose(calls[0], calls[2])


def test_gradient_statistics_equal_per_example_gradients(c, softmax):
    data = {"x": X, "y": LABELS}
    stats = c.gradient_statistics(softmax, W3, data, loss="softmax_cross_entropy")
    for k in range(2):
        _, _, grads = softmax_closed_forms(W3[k])
        allclose(stats["gradient"][k], grads.mean(axis=0), atol=1e-12)
        allclose(stats["norms"][k], np.linalg.norm(grads, axis=1), atol=1e-12)
        allclose(stats["variance"][k], grads.var(axis=0), atol=1e-12)
        allclose(stats["sum_of_squares"][k], (grads**2).sum(axis=0), atol=1e-12)


def test_damped_solve_equals_numpy(c, linear):
    b = RNG.normal(size=(2, P))
    got = c.solve(
        linear, THETA, b, data={"x": X, "y": Y}, loss="mse", operator="ggn", damping=0.1,
        tolerance=1e-12,
    )  # fmt: skip
    want = np.linalg.solve(closed_gram() + 0.1 * np.eye(P), b.T).T
    allclose(got["solution"], want, atol=1e-10)
    assert got["converged"].all()
    assert (got["iterations"] <= P + 1).all()
    assert (got["residual"] <= 1e-12).all()


def test_solve_that_cannot_converge_says_so(c):
    """A saddle's Hessian is indefinite: CG stops at negative curvature, not converged."""
    f = c.register("x[0]**2 - x[1]**2 + 0.1 * x[2]**2", {"x": (3,)}, dtype="float64")
    got = c.solve(f, np.zeros((1, 3)), np.ones((1, 3)))
    assert not got["converged"][0]
    assert got["residual"][0] > 1e-3


def test_solve_without_data_is_newton_step(c):
    A = np.array([[3.0, 1, 0], [1, 2, 0], [0, 0, 1]])
    f = c.register("0.5 * x @ A @ x", {"x": (3,)}, {"A": A}, dtype="float64")
    got = c.solve(f, np.ones((2, 3)), np.array([[1.0, 2, 3], [0, 0, 1]]), tolerance=1e-13)
    allclose(got["solution"], np.linalg.solve(A, np.array([[1.0, 2, 3], [0, 0, 1]]).T).T)


@pytest.mark.parametrize("estimator", ["exact", "hutchinson", "diag++"])
def test_diagonal_estimators(c, softmax, estimator):
    data = {"x": X, "y": LABELS}
    want, _, _ = softmax_closed_forms(W3[0])
    got = c.diagonal(
        softmax, W3[:1], data=data, loss="softmax_cross_entropy", operator="ggn",
        diagonal_estimator=estimator, num_matvecs=300, seed=3,
    )  # fmt: skip
    if estimator == "exact":
        allclose(got["diagonal"][0], np.diag(want), atol=1e-12)
        assert (got["std_error"] == 0).all()
    else:
        error = np.abs(got["diagonal"][0] - np.diag(want))
        # Within 5 standard errors per entry (and the errors are honest: not all zero).
        assert (error <= 5 * got["std_error"][0] + 1e-12).all()
        assert got["std_error"][0].max() > 0


def test_diag_pp_beats_hutchinson_on_a_low_rank_operator(c):
    """Diag++ deflates the top of the spectrum exactly: on a rank-3 operator its error is
    rounding, Hutchinson's is stochastic."""
    U = np.random.default_rng(2).normal(size=(40, 3))
    f = c.register("0.5 * sum((U.T @ x)**2)", {"x": (40,)}, {"U": U}, dtype="float64")
    want = np.diag(U @ U.T)
    hutch = c.diagonal(f, np.zeros((1, 40)), diagonal_estimator="hutchinson", num_matvecs=30)
    pp = c.diagonal(f, np.zeros((1, 40)), diagonal_estimator="diag++", num_matvecs=30)
    assert np.abs(pp["diagonal"][0] - want).max() < 1e-10
    assert np.abs(hutch["diagonal"][0] - want).max() > 1e-3


def test_spectrum_of_objective_operators(c, linear, softmax):
    data = {"x": X, "y": Y}
    exact = c.spectrum(linear, THETA, "exact", data=data, loss="mse", operator="ggn")
    allclose(exact.eigenvalues, np.tile(np.linalg.eigvalsh(closed_gram()), (2, 1)), atol=1e-12)
    assert list(exact.point_class) == ["minimum", "minimum"]
    want, _, _ = softmax_closed_forms(W3[0])
    top = c.spectrum(
        softmax, W3[:1], "lanczos", data={"x": X, "y": LABELS}, loss="softmax_cross_entropy",
        operator="ggn", k=2, num_steps=P * C,
    )  # fmt: skip
    values = np.linalg.eigvalsh(want)
    allclose(top.eigenvalues[0], np.concatenate([values[:2], values[-2:]]), atol=1e-10)
    trace = c.spectrum(linear, THETA, "trace", data=data, loss="mse", num_matvecs=30)
    allclose(trace.trace, np.trace(closed_gram()) * np.ones(2), atol=1e-10)


def test_export_model_equals_expression_model(c, softmax):
    """GGN, Fisher and Hessian of a jax.export model, from its reverse-mode artifact."""

    def model(w, x):
        return x @ w.reshape(P, C)

    exported = c.register(model, {"w": (P * C,), "x": (P,)}, dtype="float64")
    data = {"x": X, "y": LABELS}
    for operator in ("hessian", "ggn", "fisher", "empirical_fisher"):
        got = c.hessian(exported, W3, data=data, loss="softmax_cross_entropy", operator=operator)
        want = c.hessian(softmax, W3, data=data, loss="softmax_cross_entropy", operator=operator)
        allclose(got, want, atol=1e-12)
    got = c.spectrum(exported, W3, "exact", data=data, loss="softmax_cross_entropy")
    want = c.spectrum(softmax, W3, "exact", data=data, loss="softmax_cross_entropy")
    allclose(got.eigenvalues, want.eigenvalues, atol=1e-12)


def test_loss_expression_equals_builtin(c, linear):
    data = {"x": X, "y": Y}
    builtin = c.hessian(linear, THETA, data=data, loss="mse", operator="ggn")
    expression = c.hessian(
        linear, THETA, data=data, loss="0.5 * sum((output - target)**2)", operator="ggn"
    )
    allclose(expression, builtin, atol=1e-13)


# Resident tensors --------------------------------------------------------------------


def test_put_handle_stands_for_the_array(c, linear):
    hx, hy = c.put(X), c.put(Y)
    assert c.put(X).handle == hx.handle  # content-addressed
    by_handle = c.hessian(linear, THETA, data={"x": hx, "y": hy}, loss="mse")
    allclose(by_handle, np.tile(closed_gram(), (2, 1, 1)), atol=1e-12)
    points = c.put(THETA)
    allclose(c.value(linear, {"w": points, "x": X[:2]}), np.sum(THETA * X[:2], axis=1))


def test_evicted_handle_is_put_again_by_the_client(c, linear):
    """The server holds 1 MiB of resident tensors: putting 1.2 MB more evicts X and Y, and
    the next call that names them puts them again by itself."""
    hx, hy = c.put(X), c.put(Y)
    c.put(np.zeros(75_000))  # 600 kB each
    c.put(np.ones(75_000))
    got = c.hessian(linear, THETA, data={"x": hx, "y": hy}, loss="mse")
    allclose(got[0], closed_gram(), atol=1e-12)


def test_put_over_the_resident_limit_is_refused(c):
    with pytest.raises(ResourceExhausted, match="--max-resident-bytes"):
        c.put(np.zeros(1 << 18))  # 2 MiB


def raw(c):
    return hessd_pb2_grpc.HessdStub(c._channel)


def test_unknown_handle_is_not_found(c, linear):
    request = hessd_pb2.ComputeRequest(function_id=linear.id, kind=hessd_pb2.VALUE)
    request.inputs.add(name="w").tensor.handle = "0" * 64
    codec.encode(X[:1], out=request.inputs.add(name="x").tensor)
    with pytest.raises(grpc.RpcError) as info:
        raw(c).Compute(request)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "resident tensor 0000000000000000" in info.value.details()


# Bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "fragment"),
    [
        ({"operator": "ggn"}, InvalidArgument, "needs the model and its loss given apart"),
        ({"data": {"x": X, "y": Y[:5]}, "loss": "mse"}, InvalidArgument, "differ in their number"),
        ({"data": {"x": X}, "loss": "mse"}, InvalidArgument, "the loss needs targets"),
        ({"data": {"x": X, "y": Y, "z": X}}, InvalidArgument, "not inputs of the function"),
        ({"chunk_size": 1 << 50}, ResourceExhausted, "over the device's"),
        ({"loss": "mse", "operator": "curvy"}, InvalidArgument, "operator='curvy'"),
    ],
)
def test_objective_errors(c, options, error, fragment):
    f = c.register("0.5 * (x @ w - y)**2", {"w": (P,), "x": (P,), "y": ()}, dtype="float64")
    call = {"data": {"x": X, "y": Y}} | options
    if "loss" in call:
        f = c.register("x @ w", {"w": (P,), "x": (P,)}, dtype="float64")
    with pytest.raises(error, match=fragment):
        c.hessian(f, THETA, **call)


def test_labels_out_of_range(c, softmax):
    with pytest.raises(InvalidArgument, match="labels run from 0 to 2"):
        c.hvp(softmax, W3, W3, data={"x": X, "y": LABELS + 1}, loss="softmax_cross_entropy")


def test_fisher_of_expression_loss_is_refused(c, linear):
    with pytest.raises(InvalidArgument, match="only a built-in loss"):
        c.hessian(linear, THETA, data={"x": X, "y": Y}, loss="sum((output - target)**2)",
                  operator="fisher")  # fmt: skip


def test_exact_diagonal_too_large(c):
    f = c.register("sum(x**4)", {"x": (5000,)}, dtype="float64")
    with pytest.raises(InvalidArgument, match="diag\\+\\+ or hutchinson"):
        c.diagonal(f, np.ones((1, 5000)), diagonal_estimator="exact")


def test_gradient_statistics_needs_data(c, linear):
    f = c.register("sum(x**2)", {"x": (3,)}, dtype="float64")
    with pytest.raises(InvalidArgument, match="over a data set: set objective"):
        c.compute(f, "gradient_statistics", np.ones((1, 3)))


def test_kind_without_meaning_over_data(c, linear):
    with pytest.raises(InvalidArgument, match="does not apply to an objective"):
        c.jacobian(linear, THETA, data={"x": X, "y": Y}, loss="mse")


def test_option_of_another_kind_is_refused(c):
    f = c.register("sum(x**2)", {"x": (3,)}, dtype="float64")
    with pytest.raises(InvalidArgument, match="damping does not apply to kind diagonal"):
        c.diagonal(f, np.ones((1, 3)), damping=1.0)
    with pytest.raises(InvalidArgument, match="num_matvecs does not apply to kind gradient"):
        c.gradient(f, np.ones((1, 3)), num_matvecs=3)


# Memory -------------------------------------------------------------------------------


def test_memory_of_a_pass_is_bounded_by_the_chunk():
    """The compiled HVP over 10x the data holds the same temporaries: only the data (an
    argument) grows. XLA's own memory analysis of the executables, not a timing."""
    from hessd.proto.kinds import BuiltinLoss, Kind
    from hessd.service.curvature import CurvatureRequest, Objective
    from hessd.service.program import build_program
    from hessd.service.server import enable_x64

    enable_x64()
    spec = hessd_pb2.FunctionSpec(
        expression=hessd_pb2.Expression(source="tanh(x @ W1) @ W2"),
        inputs=[
            hessd_pb2.InputSpec(name="W1", shape=[64, 64], dtype=hessd_pb2.FLOAT64),
            hessd_pb2.InputSpec(name="W2", shape=[64, 10], dtype=hessd_pb2.FLOAT64),
            hessd_pb2.InputSpec(name="x", shape=[64], dtype=hessd_pb2.FLOAT64),
        ],
    )
    program = build_program(spec)
    wrt = program.wrt(["W1", "W2"], flatten=True)
    temps, args = [], []
    for examples in (1050, 10_050):  # no multiple of the chunk: a remainder step too
        objective = Objective(
            data=(2,), examples=examples, chunk=100, loss=BuiltinLoss.SOFTMAX_CROSS_ENTROPY
        )
        request = CurvatureRequest(kind=Kind.HVP, wrt=wrt, shared=(3, 4, 5), objective=objective)
        p = 64 * 64 + 64 * 10
        avals = [
            jax.ShapeDtypeStruct((1, 64, 64), jnp.float64),
            jax.ShapeDtypeStruct((1, 64, 10), jnp.float64),
            jax.ShapeDtypeStruct((1, p), jnp.float64),
            jax.ShapeDtypeStruct((examples, 64), jnp.float64),
            jax.ShapeDtypeStruct((examples,), jnp.int32),
            jax.ShapeDtypeStruct((examples,), jnp.float64),
        ]
        compiled = jax.jit(request.transform(program)).lower(*avals).compile()
        analysis = compiled.memory_analysis()
        temps.append(analysis.temp_size_in_bytes)
        args.append(analysis.argument_size_in_bytes)
    assert args[1] > 8 * args[0] / 2  # the data grew 10x (parameters are the rest)
    assert temps[1] <= 1.1 * temps[0] + (64 << 10), temps


def test_streamed_call_and_put_carry_the_data(c, linear):
    """Above the stream threshold, data travel in ComputeStream and Put in PutStream."""
    saved = c.stream_threshold
    c.stream_threshold = 64
    try:
        streamed = c.hessian(linear, THETA, data={"x": X, "y": Y}, loss="mse")
        handle = c.put(X + 1)
        by_handle = c.hessian(linear, THETA, data={"x": handle, "y": Y}, loss="mse")
    finally:
        c.stream_threshold = saved
    allclose(streamed[0], closed_gram(), atol=1e-12)
    allclose(by_handle[0], (X + 1).T @ (X + 1) / N, atol=1e-12)


def test_async_client_objective_and_put(c, linear):
    import asyncio

    from hessd.client import AsyncClient

    async def main(target):
        async with AsyncClient(target, timeout=60) as a:
            hx = await a.put(X)
            return await a.hessian(linear, THETA, data={"x": hx, "y": Y}, loss="mse")

    got = asyncio.run(main(c.connection.target))
    allclose(got[0], closed_gram(), atol=1e-12)
