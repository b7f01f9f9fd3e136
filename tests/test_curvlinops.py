"""Curvature over a data set against a peer: curvlinops (PyTorch) on the same model, data and
parameters, float64.

The model is the digits MLP (64-16-10 tanh, 1210 parameters) over all 1,797 images of
scikit-learn's digits, at a briefly trained point. Its conventions and curvlinops' agree
term by term:

    hessd softmax_cross_entropy, reduction="mean"   torch.nn.CrossEntropyLoss(reduction="mean")
    hessd hessian / ggn                             HessianLinearOperator / GGNLinearOperator
    hessd empirical_fisher  (1/N) Σᵢ gᵢgᵢᵀ          EFLinearOperator

with gᵢ the gradient of the i-th example's own (unreduced) loss. curvlinops' EF takes the
output gradients of the mean loss, multiplies them by N to undo the mean's 1/N, and scales
the sum of outer products by 1/N again: (1/N) Σᵢ gᵢgᵢᵀ, hessd's; with reduction="sum" both
are Σᵢ gᵢgᵢᵀ. The parameters are ordered differently: torch's Linear keeps W as (out, in),
the hessd model as (in, out), so vectors go through a fixed permutation (`PERM`).

Exact quantities (matvecs, the diagonal, the trace, the top eigenvalues) agree to float64
rounding; stochastic ones (Hutchinson, Diag++, Hutch++) lie within their stated standard
errors of the exact value. Skipped where torch or curvlinops is not installed (CI installs
only the dev extra).
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg

from hessd.client import Client
from hessd.service.config import ServerConfig
from hessd.service.server import create_server

# linear_operator (a curvlinops dependency) at import, and torch's forward mode at its first
# use, call the deprecated torch.jit.script.
JIT_SCRIPT_DEPRECATED = "`torch.jit.script` is deprecated"
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", JIT_SCRIPT_DEPRECATED, DeprecationWarning)
    torch = pytest.importorskip("torch")
    curvlinops = pytest.importorskip("curvlinops")
    sklearn_datasets = pytest.importorskip("sklearn.datasets")

pytestmark = pytest.mark.filterwarnings(f"ignore:{JIT_SCRIPT_DEPRECATED}:DeprecationWarning")

SIZES = (64, 16, 10)
LOSS = "softmax_cross_entropy"
K = 5  # top eigenvalues compared
MATVECS = 60  # of each stochastic estimate
RTOL = 1e-10  # float64 rounding, relative to the largest entry


def model_expression(sizes: tuple[int, ...]) -> tuple[str, np.ndarray]:
    """The MLP's logits as a hessd expression of flat w and one example x, and PERM: the
    torch flat vector (Linear weights (out, in), biases, layer by layer) is w[PERM]."""
    lines, perm, start = [], [], 0
    layers = len(sizes) - 1
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), 1):
        stop = start + fan_in * fan_out
        lines.append(f"W{i} = reshape(w[{start}:{stop}], ({fan_in}, {fan_out}))")
        perm.append((start + np.arange(fan_in * fan_out).reshape(fan_in, fan_out).T).ravel())
        lines.append(f"b{i} = w[{stop}:{stop + fan_out}]")
        perm.append(stop + np.arange(fan_out))
        start = stop + fan_out
    h = "x"
    for i in range(1, layers):
        h = f"tanh({h} @ W{i} + b{i})"
    lines.append(f"{h} @ W{layers} + b{layers}")
    return "\n".join(lines), np.concatenate(perm)


EXPRESSION, PERM = model_expression(SIZES)
P = len(PERM)


@pytest.fixture(scope="module")
def torch_float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def digits():
    """X (1797, 64) standardised pixels, float64; labels (1797,) int32."""
    d = sklearn_datasets.load_digits()
    std = d.data.std(axis=0)
    x = (d.data - d.data.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return x, d.target.astype(np.int32)


@pytest.fixture(scope="module")
def peer(torch_float64, digits):
    """The torch model after 30 full-batch Adam steps (lr 0.01, seed 0), its parameters
    as hessd's flat w, and curvlinops' three operators over the whole data set."""
    x, labels = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(SIZES[0], SIZES[1]), torch.nn.Tanh(), torch.nn.Linear(SIZES[1], SIZES[2])
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))
    loss = torch.nn.CrossEntropyLoss(reduction="mean")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        optimizer.zero_grad()
        loss(model(xt), yt).backward()
        optimizer.step()
    params = [p for p in model.parameters() if p.requires_grad]
    w = np.empty(P)
    w[PERM] = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
    data = [(xt, yt)]
    operators = {
        "hessian": curvlinops.HessianLinearOperator(model, loss, params, data),
        "ggn": curvlinops.GGNLinearOperator(model, loss, params, data),
        "empirical_fisher": curvlinops.EFLinearOperator(model, loss, params, data),
    }
    loss_sum = torch.nn.CrossEntropyLoss(reduction="sum")
    operators["empirical_fisher/sum"] = curvlinops.EFLinearOperator(model, loss_sum, params, data)
    return w, operators


@pytest.fixture(scope="module")
def c():
    server, port = create_server(ServerConfig(host="127.0.0.1", port=0, workers=4))
    server.start()
    with Client(f"127.0.0.1:{port}", timeout=300) as client:
        yield client
    server.stop(grace=None)


@pytest.fixture(scope="module")
def mlp(c):
    return c.register(EXPRESSION, {"w": (P,), "x": (SIZES[0],)}, dtype="float64")


@pytest.fixture(scope="module")
def data(c, digits):
    """The data set resident on the server: only handles travel with each call."""
    x, labels = digits
    return {"x": c.put(x), "y": c.put(labels)}


def apply(operator, vectors: np.ndarray) -> np.ndarray:
    """curvlinops' C V for V (k, p) in hessd's parameter order: (k, p)."""
    columns = torch.from_numpy(np.ascontiguousarray(vectors[:, PERM].T))
    out = np.empty_like(vectors)
    out[:, PERM] = (operator @ columns).numpy().T
    return out


@pytest.fixture(scope="module")
def dense(peer):
    """curvlinops' Hessian and GGN as (p, p) matrices in hessd's order (C @ I in blocks),
    with their eigenvalues, ascending."""
    _, operators = peer
    eye = np.eye(P)
    matrices = {
        name: np.concatenate([apply(operators[name], eye[i : i + 242]) for i in range(0, P, 242)])
        for name in ("hessian", "ggn")
    }
    return {name: (m, np.linalg.eigvalsh(m)) for name, m in matrices.items()}


def assert_rounding(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize(
    ("operator", "reduction"),
    [
        ("hessian", "mean"),
        ("ggn", "mean"),
        ("empirical_fisher", "mean"),
        ("empirical_fisher", "sum"),
    ],
)
def test_matvecs_equal_curvlinops(c, mlp, data, peer, operator, reduction):
    w, operators = peer
    vectors = np.random.default_rng(1).normal(size=(3, P))
    got = c.hvp(
        mlp, np.tile(w, (3, 1)), vectors, data=data, loss=LOSS, operator=operator,
        reduction=reduction,
    )  # fmt: skip
    key = operator if reduction == "mean" else f"{operator}/{reduction}"
    assert_rounding(got, apply(operators[key], vectors))


def test_hessian_differs_from_ggn_here(dense):
    """The point is not a degenerate one where the comparisons below could not tell the
    operators apart: the Hessian has negative curvature, the GGN none."""
    assert dense["hessian"][1][0] < -1e-4
    assert dense["ggn"][1][0] > -1e-12


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_top_eigenvalues_equal_eigsh(c, mlp, data, peer, dense, operator):
    """hessd's Lanczos (its default 80 steps) against ARPACK's implicitly restarted Lanczos
    (scipy eigsh, tol=0: to machine precision) on curvlinops' operator."""
    w, operators = peer
    top = c.spectrum(mlp, w[None], "lanczos", data=data, loss=LOSS, operator=operator, k=K)
    got = top.eigenvalues[0, -K:]
    want = np.sort(
        scipy.sparse.linalg.eigsh(
            operators[operator].to_scipy(np.float64), k=K, which="LA", return_eigenvectors=False
        )
    )
    np.testing.assert_allclose(got, want, rtol=1e-9)
    np.testing.assert_allclose(want, dense[operator][1][-K:], rtol=1e-9)
    assert (top.residuals[0, -K:] <= 1e-6 * np.abs(want)).all()


def test_exact_diagonal_and_trace_equal_curvlinops(c, mlp, data, peer, dense):
    """The GGN's only: an exact diagonal is p matvecs, a few seconds on two cores (the
    Hessian's operator is compared exactly by its matvecs and eigenvalues above)."""
    w, _ = peer
    got = c.diagonal(mlp, w[None], data=data, loss=LOSS, operator="ggn", diagonal_estimator="exact")
    want = np.diag(dense["ggn"][0])
    assert_rounding(got["diagonal"][0], want)
    assert (got["std_error"] == 0).all()
    np.testing.assert_allclose(got["diagonal"][0].sum(), want.sum(), rtol=RTOL)


@pytest.mark.parametrize("estimator", ["hutchinson", "diag++"])
@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_stochastic_diagonal_within_its_standard_errors(
    c, mlp, data, peer, dense, operator, estimator
):
    """Per entry, z = (estimate - exact) / std_error: no |z| beyond 6, and z's root mean
    square near 1 (the errors are honest, neither too small nor too large). curvlinops'
    Hutchinson estimate from as many Rademacher probes has the same variance per entry, so
    hessd's standard errors describe its errors too."""
    w, operators = peer
    want = np.diag(dense[operator][0])
    got = c.diagonal(
        mlp, w[None], data=data, loss=LOSS, operator=operator, diagonal_estimator=estimator,
        num_matvecs=MATVECS, seed=4,
    )  # fmt: skip
    estimate, std_error = got["diagonal"][0], got["std_error"][0]
    # The 48 weights of the three pixels that are 0 in every image have no curvature: their
    # samples are all 0, exactly.
    zero = std_error == 0
    np.testing.assert_array_equal(estimate[zero], 0)
    assert zero.sum() <= 48
    z = (estimate - want)[~zero] / std_error[~zero]
    assert np.abs(z).max() < 6
    assert 0.7 < np.sqrt(np.mean(z**2)) < 1.3
    if estimator == "hutchinson":
        torch.manual_seed(5)
        theirs = np.empty(P)
        theirs[PERM] = curvlinops.hutchinson_diag(operators[operator], MATVECS).numpy()
        z_theirs = (theirs - want)[~zero] / std_error[~zero]
        assert np.abs(z_theirs).max() < 6
        assert 0.7 < np.sqrt(np.mean(z_theirs**2)) < 1.3


@pytest.mark.parametrize("estimator", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_stochastic_trace_within_its_standard_error(c, mlp, data, peer, dense, operator, estimator):
    w, operators = peer
    want = np.trace(dense[operator][0])
    got = c.spectrum(
        mlp, w[None], "trace", data=data, loss=LOSS, operator=operator,
        trace_estimator=estimator, num_matvecs=MATVECS, seed=6,
    )  # fmt: skip
    std_error = got.trace_std_error[0]
    assert 0 < std_error < 0.5 * abs(want)
    assert abs(got.trace[0] - want) <= 4 * std_error
    if estimator == "hutchinson":
        torch.manual_seed(7)
        theirs = float(curvlinops.hutchinson_trace(operators[operator], MATVECS))
        assert abs(theirs - want) <= 4 * std_error
