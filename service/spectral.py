"""Matrix-free spectral estimators for a symmetric operator known only through its matvec.

In hessd the operator is the Hessian H of a scalar function at one point and the matvec is a
Hessian-vector product, so a spectrum is reachable without ever materialising H (n may be in
the millions). Every estimator here:

- runs entirely on the device inside `lax` loops (no Python loop per matvec), with shapes that
  depend only on static ints, so it jits once and vmaps over a batch of points:
  ``jax.jit(jax.vmap(lambda x, key: slq(partial(hvp_at, x), n, 8, 80, key)))``;
- takes its randomness from an explicit `jax.random` key;
- computes in the dtype it is given (the start vector's or `dtype`), and requires the matvec
  to map a vector of shape (n,) and that dtype to the same shape and dtype.

Cost is counted in matvecs, each costing a few gradients when it is an HVP. Lanczos also keeps
its whole basis, (num_steps, n) numbers, and spends O(num_steps * n) flops per step on
reorthogonalisation.

    estimator             matvecs                   memory (numbers)
    lanczos               num_steps                 num_steps * n
    extreme_eigenvalues   num_steps                 num_steps * n
    hutchinson            num_matvecs (one block)   num_matvecs * n
    hutchpp               num_matvecs (3 blocks)    num_matvecs * n
    slq                   num_probes * num_steps    num_steps * n (probes run in sequence)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

__all__ = [
    "ExtremeEigs",
    "LanczosResult",
    "Matvec",
    "Quadrature",
    "TraceEstimate",
    "extreme_eigenvalues",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "slq",
    "spectral_density",
]

Matvec = Callable[[jax.Array], jax.Array]
"""v (n,) -> A v (n,) for a symmetric n x n operator A, in v's dtype."""

# Products with the Lanczos basis and with orthonormal sketches decide how orthogonal the
# vectors stay; on GPUs the default float32 matmul precision (TF32) would cap that at ~1e-3.
_HIGHEST = lax.Precision.HIGHEST

# Start vectors that replace an exhausted Krylov space come from this fixed key, so `lanczos`
# stays a deterministic function of (matvec, v0, num_steps) and needs no key of its own.
_FRESH_SEED = 0


class LanczosResult(NamedTuple):
    """The tridiagonal T = V A Vᵀ of m Lanczos steps and the basis V.

    alphas: (m,) diagonal of T.
    betas: (m-1,) off-diagonal of T; a zero (or rounding-level) entry marks a breakdown: an
        invariant subspace was exhausted and the next row of V restarts orthogonal to it.
    basis: (m, n) the orthonormal Lanczos vectors V, as rows.
    """

    alphas: jax.Array
    betas: jax.Array
    basis: jax.Array


class ExtremeEigs(NamedTuple):
    """The k smallest and k largest Ritz pairs of a Lanczos run.

    smallest: (k,) ascending.
    largest: (k,) ascending.
    smallest_vectors: (n, k) unit Ritz vectors as columns, matching `smallest`, or None.
    largest_vectors: (n, k) likewise for `largest`, or None.
    residuals: (2k,) ‖A y - θ y‖ of each pair, smallest then largest, as Lanczos estimates it
        (|β_m s_mi|, no matvec): exact up to rounding with full reorthogonalisation, but it
        does not include the rounding floor of the matvec itself (~eps ‖A‖).
    """

    smallest: jax.Array
    largest: jax.Array
    smallest_vectors: jax.Array | None
    largest_vectors: jax.Array | None
    residuals: jax.Array


class TraceEstimate(NamedTuple):
    """A stochastic trace estimate.

    trace: () the estimate.
    std_error: () estimated standard error, from the sample variance of the random probes.
    num_matvecs: static count of matvecs spent (a Python int; under `jax.jit(jax.vmap(...))`
        it comes back as an integer array of shape (batch,)).
    """

    trace: jax.Array
    std_error: jax.Array
    num_matvecs: int


class Quadrature(NamedTuple):
    """Stochastic Lanczos quadrature: one Gauss quadrature rule per probe.

    nodes: (num_probes, num_steps) Ritz values θ_pj.
    weights: (num_probes, num_steps) w_pj ≥ 0, squared first components of the eigenvectors
        of T; each row sums to 1. The spectral density (eigenvalue counts divided by n) is
        estimated by (1/num_probes) Σ_p Σ_j w_pj δ(λ - θ_pj).
    """

    nodes: jax.Array
    weights: jax.Array


def lanczos(matvec: Matvec, v0: jax.Array, num_steps: int) -> LanczosResult:
    """Run m = num_steps Lanczos steps from v0 (n,) with full reorthogonalisation.

    Each new vector is orthogonalised twice against the whole basis by classical Gram-Schmidt.
    Once is not enough: in floating point the Lanczos vectors lose orthogonality as soon as a
    Ritz value converges, and spurious copies of converged eigenvalues appear; a second pass
    restores orthogonality to working precision ("twice is enough", Parlett). When the Krylov
    space is exhausted (A has fewer distinct eigenvalues than m, or v0 = 0) the new residual
    is rounding noise. Below √n·eps of the vector it came from (exactly zero included) the
    step records β = 0 and continues from a fresh random vector orthogonalised against the
    basis; above that, the noise itself, orthogonalised twice, is such a vector and β is at
    rounding level. Either way T is block tridiagonal up to rounding, every Ritz value is one
    of A restricted to span(V), and no NaN appears.

    Returns alphas (m,), betas (m-1,), basis (m, n) in v0's dtype, with A Vᵀ = Vᵀ T + r e_mᵀ
    and r orthogonal to V. Cost: m matvecs and O(m² n) flops for the reorthogonalisation.
    """
    n = _check_vector("v0", v0)
    _check_dtype(v0.dtype)
    num_steps = _check_steps(num_steps, n)
    alphas, betas, basis, _ = _lanczos(matvec, v0, num_steps)
    return LanczosResult(alphas=alphas, betas=betas, basis=basis)


def extreme_eigenvalues(
    matvec: Matvec,
    n: int,
    k: int,
    key: jax.Array,
    num_steps: int | None = None,
    eigenvectors: bool = False,
    dtype: DTypeLike = jnp.float32,
) -> ExtremeEigs:
    """The k smallest and k largest eigenvalues of A (n x n), by Lanczos Ritz values.

    A Gaussian start vector drawn from `key` and num_steps Lanczos steps with full
    reorthogonalisation give T; the eigenvalues of T (ascending) at both ends are returned.
    The default num_steps = min(n, max(2k + 40, 80)): 40 steps converge an eigenvalue whose
    gap to the rest is a few percent of the spectrum's width to rounding, but one at the edge
    of a dense cluster (gap 0.07% of the width) still has error ~1e-5 after 40 steps and needs
    about 80, and so did the top 10 of a freshly initialised MLP's Hessian (8% off after 40,
    exact to 5e-7 after 80; benchmarks/spectrum_vs_torch.py); each extra pair of wanted
    eigenvalues adds two steps. The residuals flag slow convergence, since an eigenvalue of A
    lies within each residual of its Ritz value. num_steps = n is exact to rounding. A single
    Krylov space sees each distinct eigenvalue once, so a repeated eigenvalue shows its
    multiplicity only through restarts after breakdown. Ritz vectors have unit norm and an
    arbitrary sign.

    Returns ExtremeEigs with (k,) values, (n, k) vectors if `eigenvectors` else None, and (2k,)
    residual estimates. Cost: num_steps matvecs; memory (num_steps, n).
    """
    n = _check_size("n", n)
    k = _check_size("k", k)
    _check_dtype(dtype)
    if num_steps is None:
        num_steps = min(n, max(2 * k + 40, 80))
    num_steps = _check_steps(num_steps, n)
    if k > num_steps:
        raise ValueError(
            f"k={k} extreme eigenvalues need at least k Lanczos steps, got num_steps={num_steps}"
            f" (n={n}). Lower k or raise num_steps (at most n)."
        )
    v0 = jax.random.normal(key, (n,), dtype)
    alphas, betas, basis, residual = _lanczos(matvec, v0, num_steps)
    theta, s = jnp.linalg.eigh(_tridiagonal(alphas, betas))
    ends = jnp.concatenate([jnp.arange(k), jnp.arange(num_steps - k, num_steps)])
    residuals = jnp.abs(residual * s[num_steps - 1, ends])
    smallest_vectors: jax.Array | None = None
    largest_vectors: jax.Array | None = None
    if eigenvectors:
        vectors = jnp.matmul(basis.T, s[:, ends], precision=_HIGHEST)
        smallest_vectors, largest_vectors = vectors[:, :k], vectors[:, k:]
    return ExtremeEigs(
        smallest=theta[:k],
        largest=theta[num_steps - k :],
        smallest_vectors=smallest_vectors,
        largest_vectors=largest_vectors,
        residuals=residuals,
    )


def hutchpp(
    matvec: Matvec, n: int, num_matvecs: int, key: jax.Array, dtype: DTypeLike = jnp.float32
) -> TraceEstimate:
    """Hutch++ trace estimate of A (n x n) (Meyer, Musco, Musco, Woodruff 2021).

    The budget m = num_matvecs is split in thirds: s = min(m // 3, n) Rademacher sketch
    vectors S (n, s) give Q = qr(A S); tr(Qᵀ A Q) is computed exactly (s more matvecs); the
    remaining m - 2s matvecs run Hutchinson with Rademacher probes on the deflated operator
    (I - QQᵀ) A (I - QQᵀ). The sketch captures the top eigenspace, so the variance left is
    that of the small eigenvalues: for PSD A the relative error falls as O(1/m) where plain
    Hutchinson's falls as O(1/√m), and the estimate is exact (to rounding) when rank(A) ≤ s.
    On a flat spectrum (A near a multiple of I) the sketch removes little and the projected
    probes lose the Rademacher advantage on the diagonal; plain `hutchinson` is better there.
    The trace of the sketched part is exact given Q, so std_error, from the sample variance
    of the Hutchinson part, is the whole error's standard error.

    Cost: num_matvecs matvecs in three vmapped blocks (memory (n, num_matvecs)); needs
    num_matvecs ≥ 4 so the Hutchinson part has two probes.
    """
    n = _check_size("n", n)
    _check_dtype(dtype)
    num_matvecs = _check_size("num_matvecs", num_matvecs)
    if num_matvecs < 4:
        raise ValueError(
            f"hutchpp needs num_matvecs >= 4 (a sketch and two probes), got {num_matvecs}."
        )
    sketch_size = min(num_matvecs // 3, n)
    num_probes = num_matvecs - 2 * sketch_size
    sketch_key, probe_key = jax.random.split(key)
    q, _ = jnp.linalg.qr(_apply_block(matvec, _rademacher(sketch_key, (n, sketch_size), dtype)))
    sketch_trace = jnp.sum(q * _apply_block(matvec, q))
    probes = _rademacher(probe_key, (n, num_probes), dtype)
    probes = probes - jnp.matmul(q, jnp.matmul(q.T, probes, precision=_HIGHEST), precision=_HIGHEST)
    samples = jnp.sum(probes * _apply_block(matvec, probes), axis=0)
    return TraceEstimate(
        trace=sketch_trace + jnp.mean(samples),
        std_error=_standard_error(samples),
        num_matvecs=num_matvecs,
    )


def hutchinson(
    matvec: Matvec, n: int, num_matvecs: int, key: jax.Array, dtype: DTypeLike = jnp.float32
) -> TraceEstimate:
    """Hutchinson trace estimate of A (n x n): the mean of zᵀ A z over Rademacher probes z.

    Unbiased; its variance is 2 (‖A‖_F² - Σ A_ii²) / num_matvecs. std_error is the sample
    standard deviation over √num_matvecs. Cost: num_matvecs matvecs in one vmapped block
    (memory (n, num_matvecs)); needs num_matvecs ≥ 2 for a variance.
    """
    n = _check_size("n", n)
    _check_dtype(dtype)
    num_matvecs = _check_size("num_matvecs", num_matvecs)
    if num_matvecs < 2:
        raise ValueError(
            f"hutchinson needs num_matvecs >= 2 (for a standard error), got {num_matvecs}."
        )
    probes = _rademacher(key, (n, num_matvecs), dtype)
    samples = jnp.sum(probes * _apply_block(matvec, probes), axis=0)
    return TraceEstimate(
        trace=jnp.mean(samples), std_error=_standard_error(samples), num_matvecs=num_matvecs
    )


def slq(
    matvec: Matvec,
    n: int,
    num_probes: int,
    num_steps: int,
    key: jax.Array,
    dtype: DTypeLike = jnp.float32,
) -> Quadrature:
    """Stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017; Ghorbani et al. 2019).

    Probe p starts from v̂_p = z_p / √n with z_p = Rademacher draws from
    ``jax.random.split(key, num_probes)[p]``, runs num_steps Lanczos steps with full
    reorthogonalisation, and takes nodes θ_pj and weights w_pj = s_1j² from eigh(T). The rule
    is Gauss quadrature for the measure Σ_i (q_iᵀ v̂_p)² δ(λ - λ_i): for every polynomial f of
    degree ≤ 2 num_steps - 1, Σ_j w_pj f(θ_pj) = v̂_pᵀ f(A) v̂_p, whose mean over probes is
    tr f(A) / n. Callers typically use num_steps ≈ 80-90 and a handful of probes.

    Returns Quadrature with (num_probes, num_steps) nodes and weights. Cost:
    num_probes * num_steps matvecs; probes run one after another (`lax.map`), so memory is
    one (num_steps, n) basis.
    """
    n = _check_size("n", n)
    num_probes = _check_size("num_probes", num_probes)
    num_steps = _check_steps(num_steps, n)
    _check_dtype(dtype)
    scale = 1.0 / math.sqrt(n)

    def probe(probe_key: jax.Array) -> tuple[jax.Array, jax.Array]:
        alphas, betas, _, _ = _lanczos(
            matvec, scale * _rademacher(probe_key, (n,), dtype), num_steps
        )
        theta, s = jnp.linalg.eigh(_tridiagonal(alphas, betas))
        return theta, s[0] ** 2

    nodes, weights = lax.map(probe, jax.random.split(key, num_probes))
    return Quadrature(nodes=nodes, weights=weights)


def spectral_density(
    nodes: jax.Array, weights: jax.Array, grid: jax.Array, sigma: float | jax.Array
) -> jax.Array:
    """Gaussian-smoothed SLQ density on `grid` (g,): shape (g,), in the dtype of `nodes`.

    density(t) = (1/P) Σ_p Σ_j w_pj N(t; θ_pj, σ²) for P probes, so it integrates to 1 (up
    to the mass that falls outside the grid). `grid` is cast to the dtype of `nodes`. Memory
    (P, num_steps, g).
    """
    if jnp.ndim(nodes) != 2 or jnp.shape(weights) != jnp.shape(nodes):
        raise ValueError(
            "nodes and weights must both have shape (num_probes, num_steps), got "
            f"{jnp.shape(nodes)} and {jnp.shape(weights)}."
        )
    if jnp.ndim(grid) != 1:
        raise ValueError(f"grid must have shape (g,), got {jnp.shape(grid)}.")
    if isinstance(sigma, int | float) and not sigma > 0:
        raise ValueError(f"sigma must be a positive width, got {sigma!r}.")
    grid = jnp.asarray(grid, nodes.dtype)
    z = (grid[None, None, :] - nodes[:, :, None]) / sigma
    kernel = jnp.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
    return jnp.mean(jnp.sum(weights[:, :, None] * kernel, axis=1), axis=0)


def _lanczos(
    matvec: Matvec, v0: jax.Array, num_steps: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Lanczos core: alphas (m,), betas (m-1,), basis (m, n) and the residual norm β_m ()."""
    n = v0.shape[0]
    dtype = v0.dtype
    # A residual this small next to the vector it came from is rounding noise: the Krylov
    # space is exhausted. Treating it as zero perturbs T by at most this much.
    tol = math.sqrt(n) * float(jnp.finfo(dtype).eps)
    fresh_key = jax.random.key(_FRESH_SEED)

    def step(j: jax.Array, carry: _LanczosCarry) -> _LanczosCarry:
        basis, alphas, betas, r = carry
        # r is the unnormalised candidate for row j: v0 at j = 0, else A v_{j-1}. A fresh
        # random vector is orthogonalised alongside it (one pass over the basis serves both),
        # in case r turns out to lie in span(V).
        fresh = jax.random.normal(jax.random.fold_in(fresh_key, j), (n,), dtype)
        r_orth, fresh = _orthogonalise(basis, jnp.stack([r, fresh]))
        beta = jnp.linalg.norm(r_orth)
        breakdown = beta <= tol * jnp.linalg.norm(r)
        v = jnp.where(breakdown, fresh / _safe_norm(fresh), r_orth / _safe_norm(r_orth))
        basis = basis.at[j].set(v)
        w = _apply(matvec, v)
        alphas = alphas.at[j].set(jnp.dot(v, w, precision=_HIGHEST))
        # betas[j] couples rows j-1 and j; betas[0] (the norm of v0) is not part of T.
        betas = betas.at[j].set(jnp.where(breakdown, jnp.zeros((), dtype), beta))
        return basis, alphas, betas, w

    init = (
        jnp.zeros((num_steps, n), dtype),
        jnp.zeros((num_steps,), dtype),
        jnp.zeros((num_steps,), dtype),
        v0,
    )
    basis, alphas, betas, r = lax.fori_loop(0, num_steps, step, init)
    (r_orth,) = _orthogonalise(basis, r[None, :])
    residual = jnp.linalg.norm(r_orth)
    residual = jnp.where(residual <= tol * jnp.linalg.norm(r), jnp.zeros((), dtype), residual)
    return alphas, betas[1:], basis, residual


# The state of a Lanczos step: basis (m, n), alphas (m,), betas (m,), candidate r (n,).
_LanczosCarry = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _orthogonalise(basis: jax.Array, vectors: jax.Array) -> jax.Array:
    """Remove span(basis rows) from each row of `vectors` (k, n): classical Gram-Schmidt, twice.

    Rows of `basis` not yet filled are zero and drop out, which keeps the shapes static.
    """
    for _ in range(2):
        coefficients = jnp.matmul(vectors, basis.T, precision=_HIGHEST)
        vectors = vectors - jnp.matmul(coefficients, basis, precision=_HIGHEST)
    return vectors


def _safe_norm(v: jax.Array) -> jax.Array:
    """‖v‖, or 1 where it is 0, for dividing by without producing NaN."""
    norm = jnp.linalg.norm(v)
    return jnp.where(norm > 0, norm, jnp.ones((), v.dtype))


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """The symmetric tridiagonal (m, m) matrix with diagonal alphas and off-diagonal betas."""
    return jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)


def _apply(matvec: Matvec, v: jax.Array) -> jax.Array:
    """matvec(v), checking at trace time that it kept v's shape and dtype."""
    w = matvec(v)
    if jnp.shape(w) != v.shape or jnp.result_type(w) != v.dtype:
        raise ValueError(
            f"matvec must map a vector of shape {v.shape} and dtype {v.dtype} to the same; "
            f"it returned shape {jnp.shape(w)} and dtype {jnp.result_type(w)}. Check n and the "
            "dtype argument against the operator."
        )
    return w


def _apply_block(matvec: Matvec, vectors: jax.Array) -> jax.Array:
    """A applied to each column of `vectors` (n, b), vmapped: b matvecs, (n, b) out."""
    return jax.vmap(lambda v: _apply(matvec, v), in_axes=1, out_axes=1)(vectors)


def _rademacher(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike) -> jax.Array:
    """Independent ±1 entries of `shape` in `dtype`.

    Drawn as one flat vector: XLA on CPU compiles the random-bit generator for a 2-D shape
    about four times more slowly, and every estimator here compiles once per shape.
    """
    flat = jax.random.rademacher(key, (math.prod(shape),), jnp.int8)
    return flat.reshape(shape).astype(dtype)


def _standard_error(samples: jax.Array) -> jax.Array:
    """Standard error of the mean of `samples` (b,), b ≥ 2, from the sample variance."""
    return jnp.std(samples, ddof=1) / math.sqrt(samples.shape[0])


def _check_vector(name: str, v: jax.Array) -> int:
    """The length n of a vector of shape (n,)."""
    if jnp.ndim(v) != 1:
        raise ValueError(f"{name} must be a vector of shape (n,), got shape {jnp.shape(v)}.")
    return jnp.shape(v)[0]


def _check_dtype(dtype: DTypeLike) -> None:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            "dtype must be a real floating dtype such as float32 or float64, got "
            f"{jnp.dtype(dtype).name}."
        )


def _check_size(name: str, value: int) -> int:
    # A Python or NumPy integer: sizes fix array shapes, so a traced value cannot work.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive static int, got {value!r}.")
    return int(value)


def _check_steps(num_steps: int, n: int) -> int:
    num_steps = _check_size("num_steps", num_steps)
    if num_steps > n:
        raise ValueError(
            f"num_steps={num_steps} exceeds n={n}: Lanczos cannot build more than n "
            "orthonormal vectors. Use num_steps <= n (num_steps = n is exact)."
        )
    return num_steps
