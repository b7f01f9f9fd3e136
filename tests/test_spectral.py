"""Matrix-free spectral estimators against dense matrices with a chosen spectrum.

A = Q diag(λ) Qᵀ with Q from the QR of a Gaussian matrix, matvec v ↦ A v. Everything runs in
float64 unless a test says otherwise. Tolerances: Lanczos quantities that are exact in exact
arithmetic are checked to 1e-10 (relative to ‖A‖ ≤ 10); converged Ritz values to 1e-8; Ritz
vectors, whose error is the square root of the eigenvalue error's, to 1e-6; float32 to 1e-4
relative; stochastic estimates by robust statements over many keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessd.service import spectral

# 194 eigenvalues in a dense cluster and three outliers on each side, well separated.
OUTLIERS = np.concatenate([np.linspace(-1.0, 1.0, 194), [-6.0, -4.0, -3.0, 3.0, 4.0, 10.0]])
SMALLEST = np.array([-6.0, -4.0, -3.0])
LARGEST = np.array([3.0, 4.0, 10.0])


def symmetric(spectrum, seed=0, dtype=np.float64):
    """A = Q diag(spectrum) Qᵀ as a jax array and its eigenvectors Q (columns) as numpy."""
    spectrum = np.asarray(spectrum, np.float64)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(spectrum.size,) * 2))
    return jnp.asarray((q * spectrum) @ q.T, dtype), q


def tridiagonal(result):
    return np.diag(result.alphas) + np.diag(result.betas, 1) + np.diag(result.betas, -1)


def orthonormality_error(basis):
    basis = np.asarray(basis)
    return np.linalg.norm(basis @ basis.T - np.eye(basis.shape[0]))


def nearest_distance(values, spectrum):
    """For each value, the distance to the nearest point of `spectrum`."""
    return np.min(np.abs(np.asarray(values)[:, None] - np.asarray(spectrum)[None, :]), axis=1)


def trapezoid(y, x):
    """The trapezoid rule (np.trapezoid is NumPy ≥ 2 only, and hessd supports 1.26)."""
    return np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0


# Tests share shapes where they can: every new shape compiles again (~0.5 s on CPU).
@functools.partial(jax.jit, static_argnums=2)
def run_lanczos(a, v0, num_steps):
    return spectral.lanczos(lambda v: a @ v, v0, num_steps)


# ---------------------------------------------------------------------------------- lanczos


def test_lanczos_basis_is_orthonormal_and_satisfies_the_lanczos_relation():
    n, m = 60, 25
    a, _ = symmetric(np.random.default_rng(1).uniform(-2.0, 5.0, n))
    v0 = jnp.asarray(np.random.default_rng(2).normal(size=n))
    result = run_lanczos(a, v0, m)
    assert result.alphas.shape == (m,)
    assert result.betas.shape == (m - 1,)
    assert result.basis.shape == (m, n)
    assert orthonormality_error(result.basis) < 1e-10
    v = np.asarray(result.basis)
    np.testing.assert_allclose(v[0], v0 / np.linalg.norm(v0), atol=1e-12)
    # A Vᵀ = Vᵀ T + r e_mᵀ: every column but the last vanishes, and r is orthogonal to V.
    remainder = np.asarray(a) @ v.T - v.T @ tridiagonal(result)
    assert np.max(np.abs(remainder[:, :-1])) < 1e-10
    assert np.max(np.abs(v @ remainder[:, -1])) < 1e-10
    assert np.linalg.norm(remainder[:, -1]) > 1e-3


def test_lanczos_with_n_steps_recovers_every_eigenvalue():
    spectrum = np.random.default_rng(3).normal(size=30)
    a, _ = symmetric(spectrum)
    result = run_lanczos(a, jnp.ones(30, jnp.float64), 30)
    assert orthonormality_error(result.basis) < 1e-10
    np.testing.assert_allclose(
        np.linalg.eigvalsh(tridiagonal(result)), np.sort(spectrum), atol=1e-10
    )


@pytest.mark.parametrize(
    ("spectrum", "num_steps"),
    [
        (np.ones(30), 12),
        (np.repeat([-1.0, 0.5, 2.0], 10), 12),
        (np.repeat([-1.0, 0.5, 2.0], 10), 30),
    ],
    ids=["identity", "three_distinct", "three_distinct_all_steps"],
)
def test_lanczos_breakdown_restarts_without_nan(spectrum, num_steps):
    """The Krylov space of v0 has dimension 1 or 3; the remaining steps restart from vectors
    orthogonal to it (β ≈ 0), so T is block tridiagonal and every Ritz value is exact."""
    a, _ = symmetric(spectrum, seed=4)
    v0 = jnp.asarray(np.random.default_rng(5).normal(size=spectrum.size))
    result = run_lanczos(a, v0, num_steps)
    for part in result:
        assert np.all(np.isfinite(part))
    assert orthonormality_error(result.basis) < 1e-10
    # v0's Krylov space is exhausted after one step per distinct eigenvalue. β there is 0, or
    # at rounding level (A's computed eigenvalues are split by rounding); either way the next
    # vector is orthogonal to the space and starts a new block.
    assert np.asarray(result.betas)[np.unique(spectrum).size - 1] < 1e-12
    ritz = np.linalg.eigvalsh(tridiagonal(result))
    assert np.max(nearest_distance(ritz, spectrum)) < 1e-10
    assert np.max(nearest_distance(np.unique(spectrum), ritz)) < 1e-10
    if num_steps == spectrum.size:
        np.testing.assert_allclose(ritz, np.sort(spectrum), atol=1e-10)


def test_lanczos_from_a_zero_vector_starts_fresh():
    a, _ = symmetric(np.arange(1.0, 31.0))
    result = run_lanczos(a, jnp.zeros(30, jnp.float64), 30)
    assert orthonormality_error(result.basis) < 1e-10
    np.testing.assert_allclose(np.linalg.eigvalsh(tridiagonal(result)), np.arange(1.0, 31.0))


def test_lanczos_rejects_more_steps_than_dimensions():
    with pytest.raises(ValueError, match="num_steps=11 exceeds n=10"):
        spectral.lanczos(lambda v: v, jnp.ones(10), 11)


def test_lanczos_rejects_a_start_that_is_not_a_vector():
    with pytest.raises(
        ValueError, match=r"v0 must be a vector of shape \(n,\), got shape \(2, 5\)"
    ):
        spectral.lanczos(lambda v: v, jnp.ones((2, 5)), 3)


def test_estimators_reject_a_non_floating_dtype():
    key = jax.random.key(0)
    match = "dtype must be a real floating dtype such as float32 or float64, got int32"
    with pytest.raises(ValueError, match=match):
        spectral.lanczos(lambda v: v, jnp.ones(10, jnp.int32), 3)
    for estimator in (spectral.hutchpp, spectral.hutchinson):
        with pytest.raises(ValueError, match=match):
            estimator(lambda v: v, 10, 6, key, dtype=jnp.int32)
    with pytest.raises(ValueError, match=match):
        spectral.extreme_eigenvalues(lambda v: v, 10, 2, key, dtype=jnp.int32)
    with pytest.raises(ValueError, match=match):
        spectral.slq(lambda v: v, 10, 2, 3, key, dtype=jnp.int32)


def test_lanczos_rejects_a_matvec_that_changes_shape_or_dtype():
    with pytest.raises(ValueError, match=r"returned shape \(9,\)"):
        spectral.lanczos(lambda v: v[1:], jnp.ones(10), 3)
    with pytest.raises(ValueError, match=r"returned shape .* dtype float32"):
        spectral.lanczos(lambda v: v.astype(jnp.float32), jnp.ones(10, jnp.float64), 3)


# ----------------------------------------------------------------------- extreme eigenvalues


@functools.partial(jax.jit, static_argnames=("k", "num_steps", "dtype"))
def run_extreme(a, key, k=3, num_steps=None, dtype=jnp.float64):
    return spectral.extreme_eigenvalues(
        lambda v: a @ v, a.shape[0], k, key, num_steps=num_steps, eigenvectors=True, dtype=dtype
    )


def test_extreme_eigenvalues_and_vectors():
    a, q = symmetric(OUTLIERS)
    result = run_extreme(a, jax.random.key(0))
    np.testing.assert_allclose(result.smallest, SMALLEST, atol=1e-8)
    np.testing.assert_allclose(result.largest, LARGEST, atol=1e-8)
    assert result.smallest_vectors.shape == result.largest_vectors.shape == (200, 3)
    values = np.concatenate([result.smallest, result.largest])
    vectors = np.concatenate([result.smallest_vectors, result.largest_vectors], axis=1)
    true_residuals = np.linalg.norm(np.asarray(a) @ vectors - vectors * values, axis=0)
    assert np.max(true_residuals) < 1e-6
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0), 1.0, atol=1e-12)
    # Up to sign, each Ritz vector is the eigenvector of its (simple) eigenvalue.
    order = np.argsort(OUTLIERS)
    true_vectors = q[:, np.concatenate([order[:3], order[-3:]])]
    np.testing.assert_allclose(np.abs(np.sum(vectors * true_vectors, axis=0)), 1.0, atol=1e-6)
    assert result.residuals.shape == (6,)
    assert np.max(result.residuals) < 1e-8


def test_extreme_eigenvalues_residuals_bound_the_error_at_a_cluster_edge():
    """-1 is the edge of 195 eigenvalues spaced 0.01 apart and converges slowly: 40 steps
    leave it visibly wrong, but some eigenvalue lies within its residual (the
    residual is an honest accuracy estimate); 120 steps converge it."""
    spectrum = np.concatenate([np.linspace(-1.0, 1.0, 195), [-5.0, -3.0, 3.0, 4.0, 10.0]])
    a, _ = symmetric(spectrum, seed=6)
    coarse = run_extreme(a, jax.random.key(1), num_steps=40)
    values = np.concatenate([coarse.smallest, coarse.largest])
    error = nearest_distance(values, spectrum)
    assert error[2] > 1e-6
    assert np.all(error <= np.asarray(coarse.residuals) + 1e-12)
    fine = run_extreme(a, jax.random.key(1), num_steps=120)
    np.testing.assert_allclose(fine.smallest, [-5.0, -3.0, -1.0], atol=1e-8)
    np.testing.assert_allclose(fine.largest, [3.0, 4.0, 10.0], atol=1e-8)


def test_extreme_eigenvalues_in_float32():
    a, _ = symmetric(OUTLIERS, dtype=np.float32)
    result = run_extreme(a, jax.random.key(0), dtype=jnp.float32)
    assert result.smallest.dtype == result.largest.dtype == jnp.float32
    assert result.largest_vectors.dtype == result.residuals.dtype == jnp.float32
    np.testing.assert_allclose(result.smallest, SMALLEST, rtol=1e-4)
    np.testing.assert_allclose(result.largest, LARGEST, rtol=1e-4)


def test_extreme_eigenvalues_batched_match_unbatched():
    spectra = [OUTLIERS, 2.0 * OUTLIERS, OUTLIERS - 1.0]
    matrices = jnp.stack([symmetric(s, seed=i)[0] for i, s in enumerate(spectra)])
    keys = jax.random.split(jax.random.key(2), 3)
    batched = jax.jit(
        jax.vmap(
            lambda a, key: spectral.extreme_eigenvalues(
                lambda v: a @ v, 200, 3, key, eigenvectors=True, dtype=jnp.float64
            )
        )
    )(matrices, keys)
    assert batched.smallest.shape == (3, 3)
    assert batched.largest_vectors.shape == (3, 200, 3)
    for i, spectrum in enumerate(spectra):
        single = run_extreme(matrices[i], keys[i])
        np.testing.assert_allclose(batched.smallest[i], single.smallest, atol=1e-10)
        np.testing.assert_allclose(batched.largest[i], single.largest, atol=1e-10)
        np.testing.assert_allclose(batched.largest[i], np.sort(spectrum)[-3:], atol=1e-8)
        overlap = np.sum(batched.largest_vectors[i] * single.largest_vectors, axis=0)
        np.testing.assert_allclose(np.abs(overlap), 1.0, atol=1e-8)


def test_extreme_eigenvalues_rejects_bad_sizes():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="k=5 extreme eigenvalues need at least k Lanczos steps"):
        spectral.extreme_eigenvalues(lambda v: v, 10, 5, key, num_steps=4)
    with pytest.raises(ValueError, match="num_steps=11 exceeds n=10"):
        spectral.extreme_eigenvalues(lambda v: v, 10, 2, key, num_steps=11)
    with pytest.raises(ValueError, match="k must be a positive static int, got 0"):
        spectral.extreme_eigenvalues(lambda v: v, 10, 0, key)


# -------------------------------------------------------------------------- trace estimators


def trace_errors(estimator, a, num_matvecs, num_keys=20):
    """(|estimate - tr A|, std_error) over `num_keys` keys, in one jit(vmap(...)) call."""
    keys = jax.random.split(jax.random.key(7), num_keys)
    n = a.shape[0]
    result = jax.jit(
        jax.vmap(lambda key: estimator(lambda v: a @ v, n, num_matvecs, key, dtype=jnp.float64))
    )(keys)
    return np.abs(np.asarray(result.trace) - np.trace(np.asarray(a))), np.asarray(result.std_error)


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    """λ_i = 10 i⁻² (n=300): Hutch++ spends a third of 60 matvecs on the top eigenvectors and
    the rest on a tail of small variance; measured mean error ratio ≈ 20."""
    a, _ = symmetric(10.0 * np.arange(1.0, 301.0) ** -2.0, seed=8)
    errors_pp, std_pp = trace_errors(spectral.hutchpp, a, 60)
    errors_h, std_h = trace_errors(spectral.hutchinson, a, 60)
    assert np.mean(errors_pp) * 3.0 < np.mean(errors_h)
    # Unbiased with honest error bars: within 4 standard errors in nearly every key.
    assert np.sum(errors_pp <= 4.0 * std_pp) >= 18
    assert np.sum(errors_h <= 4.0 * std_h) >= 18
    # The error bars have the right size: mean std_error vs the root-mean-square error.
    assert 0.5 < np.mean(std_h) / np.sqrt(np.mean(errors_h**2)) < 2.0
    assert 0.5 < np.mean(std_pp) / np.sqrt(np.mean(errors_pp**2)) < 2.0


@pytest.mark.parametrize("num_matvecs", [30, 31])
def test_hutchpp_is_exact_on_a_low_rank_matrix(num_matvecs):
    """Rank 10 ≤ num_matvecs // 3: the sketch spans the range of A and nothing is left."""
    spectrum = np.concatenate([np.random.default_rng(11).uniform(1.0, 5.0, 10), np.zeros(90)])
    a, _ = symmetric(spectrum, seed=11)
    result = jax.jit(
        lambda a, key: spectral.hutchpp(lambda v: a @ v, 100, num_matvecs, key, jnp.float64)
    )(a, jax.random.key(12))
    assert result.num_matvecs == num_matvecs
    np.testing.assert_allclose(result.trace, np.sum(spectrum), rtol=1e-8)
    assert result.std_error < 1e-8


def test_trace_estimators_in_float32():
    spectrum = np.linspace(1.0, 2.0, 40)
    a, _ = symmetric(spectrum, dtype=np.float32)
    for estimator in (spectral.hutchpp, spectral.hutchinson):
        result = jax.jit(lambda a, key, f=estimator: f(lambda v: a @ v, 40, 120, key))(
            a, jax.random.key(13)
        )
        assert result.trace.dtype == result.std_error.dtype == jnp.float32
        assert abs(float(result.trace) - 60.0) < 4.0 * float(result.std_error) + 1e-3


def test_trace_estimators_reject_too_few_matvecs():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="hutchpp needs num_matvecs >= 4"):
        spectral.hutchpp(lambda v: v, 10, 3, key)
    with pytest.raises(ValueError, match="hutchinson needs num_matvecs >= 2"):
        spectral.hutchinson(lambda v: v, 10, 1, key)


# -------------------------------------------------------------------------------------- SLQ


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def run_slq(a, n, num_probes, num_steps, key):
    return spectral.slq(lambda v: a @ v, n, num_probes, num_steps, key, dtype=jnp.float64)


def test_slq_is_gauss_quadrature_for_each_probe():
    """With m steps the rule integrates polynomials of degree ≤ 2m - 1 exactly: Σ_j w_j θ_jᵖ
    = v̂ᵀ Aᵖ v̂, v̂ the probe, rebuilt from the key as slq's docstring says it is drawn."""
    n, num_probes, num_steps = 40, 3, 4
    a, _ = symmetric(np.random.default_rng(16).uniform(-1.0, 2.0, n), seed=16)
    key = jax.random.key(17)
    rule = run_slq(a, n, num_probes, num_steps, key)
    probes = jax.vmap(lambda k: jax.random.rademacher(k, (n,), jnp.int8))(
        jax.random.split(key, num_probes)
    )
    probes = np.asarray(probes, np.float64) / np.sqrt(n)
    a = np.asarray(a)
    for p in range(2 * num_steps):
        quadrature = np.sum(np.asarray(rule.weights) * np.asarray(rule.nodes) ** p, axis=1)
        exact = np.einsum("pi,ij,pj->p", probes, np.linalg.matrix_power(a, p), probes)
        np.testing.assert_allclose(quadrature, exact, rtol=1e-10, atol=1e-12)


def test_slq_rules_are_probability_measures_whose_moments_estimate_traces():
    """Each probe's rule is a probability measure on [λmin, λmax]; averaged over 64 probes
    its moments estimate tr(Aᵖ)/n (Hutchinson error here ≈ 1%, checked to 3%)."""
    n = 100
    spectrum = np.random.default_rng(18).uniform(1.0, 3.0, n)
    a, _ = symmetric(spectrum, seed=18)
    rule = run_slq(a, n, 64, 10, jax.random.key(19))
    nodes, weights = np.asarray(rule.nodes), np.asarray(rule.weights)
    assert nodes.shape == weights.shape == (64, 10)
    np.testing.assert_allclose(np.sum(weights, axis=1), 1.0, atol=1e-12)
    assert np.all(weights >= 0.0)
    assert spectrum.min() - 1e-10 <= np.min(nodes)
    assert np.max(nodes) <= spectrum.max() + 1e-10
    for p in (1, 2, 3):
        moment = np.mean(np.sum(weights * nodes**p, axis=1))
        np.testing.assert_allclose(moment, np.mean(spectrum**p), rtol=0.03)


def test_spectral_density_of_two_clusters():
    rng = np.random.default_rng(20)
    spectrum = np.concatenate(
        [-1.0 + 0.05 * rng.normal(size=100), 2.0 + 0.05 * rng.normal(size=100)]
    )
    a, _ = symmetric(spectrum, seed=20)
    rule = run_slq(a, 200, 16, 40, jax.random.key(21))
    grid = jnp.linspace(-4.0, 5.0, 3001)
    density = np.asarray(spectral.spectral_density(rule.nodes, rule.weights, grid, 0.1))
    grid = np.asarray(grid)
    assert density.shape == grid.shape
    assert np.all(density >= 0.0)
    np.testing.assert_allclose(trapezoid(density, grid), 1.0, atol=1e-3)
    left = grid <= 0.5
    np.testing.assert_allclose(trapezoid(density[left], grid[left]), 0.5, atol=0.05)
    np.testing.assert_allclose(trapezoid(density[~left], grid[~left]), 0.5, atol=0.05)


def test_spectral_density_in_float32_casts_the_grid():
    nodes = jnp.asarray([[0.0, 1.0]], jnp.float32)
    weights = jnp.asarray([[0.25, 0.75]], jnp.float32)
    density = spectral.spectral_density(nodes, weights, np.linspace(-1.0, 2.0, 7), 0.5)
    assert density.dtype == jnp.float32
    expected = sum(
        w * np.exp(-0.5 * ((np.linspace(-1.0, 2.0, 7) - t) / 0.5) ** 2) / (0.5 * np.sqrt(2 * np.pi))
        for t, w in [(0.0, 0.25), (1.0, 0.75)]
    )
    np.testing.assert_allclose(density, expected, rtol=1e-5)


def test_spectral_density_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"must both have shape .* got \(2, 3\) and \(2, 4\)"):
        spectral.spectral_density(jnp.zeros((2, 3)), jnp.ones((2, 4)), jnp.zeros(5), 0.1)
    with pytest.raises(ValueError, match=r"grid must have shape \(g,\), got \(5, 1\)"):
        spectral.spectral_density(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros((5, 1)), 0.1)


def test_spectral_density_rejects_a_non_positive_width():
    with pytest.raises(ValueError, match=r"sigma must be a positive width, got 0\.0"):
        spectral.spectral_density(jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.zeros(3), 0.0)


# ---------------------------------------------------------------------- batching and tracing


def test_every_estimator_jits_and_vmaps_over_points_without_leaking_tracers():
    """The way hessd calls them: jit(vmap) over points whose operator depends on the point
    (here A(x) = diag(x) + B, the Hessian of ½ xᵀBx + Σ x_i³/6 at x)."""
    n = 12
    b, _ = symmetric(np.linspace(-1.0, 1.0, n), seed=22)
    points = jnp.asarray(np.random.default_rng(23).normal(size=(4, n)))
    keys = jax.random.split(jax.random.key(24), 4)

    def hvp_at(x, v):
        return jax.jvp(jax.grad(lambda y: 0.5 * y @ b @ y + jnp.sum(y**3) / 6.0), (x,), (v,))[1]

    def all_estimates(x, key):
        matvec = functools.partial(hvp_at, x)
        f64 = jnp.float64
        return (
            spectral.extreme_eigenvalues(matvec, n, 2, key, dtype=f64),
            spectral.hutchpp(matvec, n, 3 * n, key, dtype=f64),
            spectral.hutchinson(matvec, n, 12, key, dtype=f64),
            spectral.slq(matvec, n, 2, n, key, dtype=f64),
            spectral.lanczos(matvec, jnp.ones(n, f64), 5),
        )

    with jax.checking_leaks():
        extreme, pp, _, rule, _ = jax.jit(jax.vmap(all_estimates))(points, keys)
    assert extreme.smallest_vectors is None
    assert extreme.largest_vectors is None
    for i, x in enumerate(np.asarray(points)):
        hessian = np.diag(x) + np.asarray(b)
        eigenvalues = np.linalg.eigvalsh(hessian)
        np.testing.assert_allclose(extreme.smallest[i], eigenvalues[:2], atol=1e-10)
        np.testing.assert_allclose(extreme.largest[i], eigenvalues[-2:], atol=1e-10)
        # A sketch of n columns spans everything, so Hutch++ is exact; n SLQ steps likewise.
        np.testing.assert_allclose(pp.trace[i], np.trace(hessian), rtol=1e-10)
        np.testing.assert_allclose(np.sort(rule.nodes[i], axis=1)[0], eigenvalues, atol=1e-10)
        np.testing.assert_allclose(np.sort(rule.nodes[i], axis=1)[1], eigenvalues, atol=1e-10)
    np.testing.assert_array_equal(pp.num_matvecs, 3 * n)
