"""Hessian analysis: spectra and stationary-point classification, as engine requests.

For a scalar f and its `wrt` input x with n elements, at every point:

    method    H formed?  result per point
    exact     yes        eigenvalues (n,) ascending [, eigenvectors (n, n)]
    lanczos   no (HVPs)  k smallest and k largest eigenvalues (2k,) [, vectors (n, 2k)],
                         Ritz residuals (2k,)
    trace     no (HVPs)  trace and its standard error (Hutch++ or Hutchinson)
    density   no (HVPs)  SLQ nodes and weights (probes, steps), smoothed density on a grid

Every method also returns ‖∇f(x)‖₂; exact, lanczos and density classify the point
(PointClass, from the extreme eigenvalues found: density uses the extreme Ritz values of its
SLQ runs) and say whether it is stationary. Defaults of the tolerances, with ε the dtype's
machine epsilon and ‖H‖ = max |λ| over the eigenvalues found:

    tol  = sqrt(ε) · ‖H‖             eigenvalues within ±tol count as zero
    gtol = sqrt(ε) · max(1, ‖H‖)     stationary when ‖∇f‖ ≤ gtol

sqrt(ε) sits far above the rounding of an AD Hessian (~ε‖H‖) and of Lanczos Ritz values
with full reorthogonalisation, and far below any curvature that matters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from hessd.proto.kinds import Method, PointClass, TraceEstimator, spectrum_shapes
from hessd.service import spectral
from hessd.service.curvature import (
    NO_DATA,
    POINTS_PER_RUN,
    Objective,
    PointOperator,
    batched_transform,
)
from hessd.service.engine import EngineRequest
from hessd.service.errors import InvalidArgument
from hessd.service.kinds import shared_indices
from hessd.service.variable import Wrt

if TYPE_CHECKING:
    from hessd.service.program import Program

__all__ = [
    "Method",
    "PointClass",
    "SpectrumRequest",
    "TraceEstimator",
    "make_spectrum_request",
]

DEFAULT_K = 6
DEFAULT_DENSITY_STEPS = 90
DEFAULT_PROBES = 4
DEFAULT_MATVECS = 90
DEFAULT_GRID = 256
# Bounds on the work one request may ask for (each HVP costs a few gradients).
MAX_COUNT = {"k": 1000, "num_steps": 4000, "num_probes": 1000, "num_matvecs": 10_000,
             "grid_size": 100_000}  # fmt: skip
# Per-point state an exact or iterative run may hold on the device, which sets how many
# points run at once (the engine rounds it down to a power of two).
STATE_BYTES_PER_CHUNK = 1 << 30


# The options each method takes.
_OPTIONS = {
    Method.EXACT: {"eigenvectors", "tol", "gtol"},
    Method.LANCZOS: {"eigenvectors", "k", "num_steps", "tol", "gtol"},
    Method.TRACE: {"num_matvecs", "trace_estimator"},
    Method.DENSITY: {"num_steps", "num_probes", "grid_size", "sigma", "tol", "gtol"},
}


@dataclasses.dataclass(frozen=True)
class SpectrumRequest(EngineRequest):
    """A spectrum of the Hessian of a Program at every point; hashable, an engine request."""

    method: Method
    wrt: Wrt = Wrt((0,))
    shared: tuple[int, ...] = ()
    eigenvectors: bool = False
    k: int = 0
    num_steps: int = 0
    num_probes: int = 0
    num_matvecs: int = 0
    estimator: TraceEstimator = TraceEstimator.HUTCHPP
    seed: int = 0
    grid_size: int = 0
    tol: float | None = None
    gtol: float | None = None
    sigma: float | None = None
    objective: Objective = NO_DATA

    @property
    def label(self) -> str:
        return self.method.value

    def output_shapes(self, program: Program) -> dict[str, tuple[int, ...]]:
        return spectrum_shapes(
            self.method,
            math.prod(self.wrt.shape(program)),
            k=self.k,
            eigenvectors=self.eigenvectors,
            num_steps=self.num_steps,
            num_probes=self.num_probes,
            grid_size=self.grid_size,
        )

    def result_dtype(self, program: Program) -> np.dtype:
        return program.output_dtype

    def max_chunk(self, program: Program) -> int:
        n = math.prod(self.wrt.shape(program))
        itemsize = program.output_dtype.itemsize
        match self.method:
            case Method.EXACT:
                per_point = 3 * n * n  # H, its eigenvectors, eigh's workspace
            case Method.LANCZOS | Method.DENSITY:
                per_point = (self.num_steps + 4) * n * max(1, self.num_probes)
            case Method.TRACE:
                per_point = (self.num_matvecs + 4) * n
        fit = max(1, STATE_BYTES_PER_CHUNK // (per_point * itemsize))
        return min(fit, POINTS_PER_RUN) if self.objective.present else fit

    def transform(self, program: Program) -> Callable[..., Any]:
        return batched_transform(program, self, lambda op, _: self.at_a_point(op))

    @property
    def coalesces(self) -> bool:
        return not self.objective.present

    def vector_signature(self, program: Program) -> list[tuple[tuple[int, ...], np.dtype]]:
        return []

    def at_a_point(self, op: PointOperator) -> dict[str, jax.Array]:
        """The results at one point, by name, from the point's operator (the Hessian of
        f, or an objective's curvature operator) and gradient."""
        n = op.theta.shape[0]
        x = op.theta
        hvp = op.matvec
        result = {"gradient_norm": jnp.linalg.norm(op.gradient())}
        # The wire's seed is a uint64; JAX's is an int64: the same 64 bits.
        key = jax.random.key(self.seed - (1 << 64) if self.seed >= 1 << 63 else self.seed)
        match self.method:
            case Method.EXACT:
                result |= self._exact(op)
            case Method.LANCZOS:
                result |= self._lanczos(hvp, n, key, x.dtype)
            case Method.TRACE:
                estimate = self._trace_estimator()(hvp, n, self.num_matvecs, key, dtype=x.dtype)
                result |= {"trace": estimate.trace, "trace_std_error": estimate.std_error}
            case Method.DENSITY:
                result |= self._density(hvp, n, key, x.dtype)
        match self.method:
            case Method.EXACT | Method.LANCZOS:
                values = result["eigenvalues"]
                result |= self._classify(values[0], values[-1], result["gradient_norm"])
            case Method.DENSITY:
                # The extreme Ritz values of the SLQ runs: Lanczos finds the ends of
                # the spectrum first, exactly once num_steps reaches n.
                nodes = result["nodes"]
                result |= self._classify(jnp.min(nodes), jnp.max(nodes), result["gradient_norm"])
        return result

    def _exact(self, op: PointOperator) -> dict[str, jax.Array]:
        hessian = op.dense()
        if self.eigenvectors:
            values, vectors = jnp.linalg.eigh(hessian)
            return {"eigenvalues": values, "eigenvectors": vectors}
        return {"eigenvalues": jnp.linalg.eigvalsh(hessian)}

    def _lanczos(
        self, hvp: spectral.Matvec, n: int, key: jax.Array, dtype: DTypeLike
    ) -> dict[str, jax.Array]:
        eigs = spectral.extreme_eigenvalues(
            hvp, n, self.k, key, self.num_steps, eigenvectors=self.eigenvectors, dtype=dtype
        )
        result = {
            "eigenvalues": jnp.concatenate([eigs.smallest, eigs.largest]),
            "residuals": eigs.residuals,
        }
        if eigs.smallest_vectors is not None and eigs.largest_vectors is not None:
            result["eigenvectors"] = jnp.concatenate(
                [eigs.smallest_vectors, eigs.largest_vectors], axis=1
            )
        return result

    def _trace_estimator(self) -> Callable[..., spectral.TraceEstimate]:
        if self.estimator is TraceEstimator.HUTCHPP:
            return spectral.hutchpp
        return spectral.hutchinson

    def _density(
        self, hvp: spectral.Matvec, n: int, key: jax.Array, dtype: DTypeLike
    ) -> dict[str, jax.Array]:
        quadrature = spectral.slq(hvp, n, self.num_probes, self.num_steps, key, dtype=dtype)
        lo, hi = jnp.min(quadrature.nodes), jnp.max(quadrature.nodes)
        if self.sigma is None:
            # A hundredth of the spectrum's width, and never zero (a multiple of I).
            floor = jnp.finfo(dtype).eps ** 0.5 * jnp.maximum(1, jnp.abs(hi))
            sigma = jnp.maximum((hi - lo) / 100, floor)
        else:
            sigma = jnp.asarray(self.sigma, dtype)
        grid = jnp.linspace(lo - 3 * sigma, hi + 3 * sigma, self.grid_size, dtype=dtype)
        density = spectral.spectral_density(quadrature.nodes, quadrature.weights, grid, sigma)
        return {
            "nodes": quadrature.nodes,
            "weights": quadrature.weights,
            "grid": grid,
            "density": density,
        }

    def _classify(
        self, lo: jax.Array, hi: jax.Array, gradient_norm: jax.Array
    ) -> dict[str, jax.Array]:
        """Class and stationarity from the smallest and largest eigenvalue found."""
        dtype = lo.dtype
        root_eps = jnp.sqrt(jnp.finfo(dtype).eps).astype(dtype)
        scale = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        tol = root_eps * scale if self.tol is None else jnp.asarray(self.tol, dtype)
        gtol = (
            root_eps * jnp.maximum(1, scale) if self.gtol is None else jnp.asarray(self.gtol, dtype)
        )
        finite = jnp.isfinite(lo) & jnp.isfinite(hi) & jnp.isfinite(gradient_norm)
        point_class = jnp.where(
            ~finite,
            PointClass.UNDEFINED.wire,
            jnp.where(
                lo > tol,
                PointClass.MINIMUM.wire,
                jnp.where(
                    hi < -tol,
                    PointClass.MAXIMUM.wire,
                    jnp.where(
                        (lo < -tol) & (hi > tol), PointClass.SADDLE.wire, PointClass.DEGENERATE.wire
                    ),
                ),
            ),
        ).astype(jnp.int32)
        return {
            "point_class": point_class,
            "stationary": gradient_norm <= gtol,
            "tol": tol,
            "gtol": gtol,
        }


def make_spectrum_request(
    program: Program,
    method: Method,
    wrt: tuple[str, ...] = (),
    *,
    shared: tuple[str, ...] = (),
    eigenvectors: bool = False,
    k: int = 0,
    num_steps: int = 0,
    num_probes: int = 0,
    num_matvecs: int = 0,
    estimator: TraceEstimator | None = None,
    seed: int = 0,
    grid_size: int = 0,
    tol: float | None = None,
    gtol: float | None = None,
    sigma: float | None = None,
    max_exact_n: int = 4096,
    objective: Objective = NO_DATA,
) -> SpectrumRequest:
    """Check the options against the method and the function; fill in the defaults.

    Every option belongs to some methods; one given to another method is refused rather
    than ignored, so that a request never means something other than it says.
    """
    variable = program.wrt(wrt, flatten=True)
    if program.output_shape != () and objective.loss is None:
        raise InvalidArgument(
            f"spectrum needs a scalar-output function; this function's output has shape "
            f"{program.output_shape}. Reduce it to a scalar (e.g. sum(...)) first"
        )
    n = math.prod(variable.shape(program))
    if n == 0:
        raise InvalidArgument("the Hessian with respect to an input of no elements is empty")
    given = {
        "eigenvectors": eigenvectors, "k": k, "num_steps": num_steps, "num_probes": num_probes,
        "num_matvecs": num_matvecs, "trace_estimator": estimator, "grid_size": grid_size,
        "tol": tol, "gtol": gtol, "sigma": sigma,
    }  # fmt: skip
    for name, value in given.items():
        if name not in _OPTIONS[method] and value not in (None, 0, False):
            raise InvalidArgument(
                f"{name} does not apply to method {method.value}; it applies to "
                + ", ".join(m.value for m, names in _OPTIONS.items() if name in names)
            )
    counts = {"k": k, "num_steps": num_steps, "num_probes": num_probes,
              "num_matvecs": num_matvecs, "grid_size": grid_size}  # fmt: skip
    for name, count in counts.items():
        if count < 0:
            raise InvalidArgument(f"{name} must be positive, got {count}")
        if count > MAX_COUNT[name]:
            raise InvalidArgument(
                f"{name}={count} is over this server's limit of {MAX_COUNT[name]}"
            )
    for name, value in (("tol", tol), ("gtol", gtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InvalidArgument(f"{name} must be a finite number ≥ 0, got {value}")
    if sigma is not None:
        # The Gaussians divide by σ²: it must be a positive number of the function's dtype.
        smallest = math.sqrt(np.finfo(program.output_dtype).tiny)
        if not (math.isfinite(sigma) and sigma >= smallest):
            raise InvalidArgument(
                f"sigma must be a finite number ≥ {smallest:.3g} (its square must not vanish "
                f"in {program.output_dtype.name}), got {sigma}; leave it unset for "
                "(λmax - λmin) / 100"
            )
    if method is Method.EXACT and n > max_exact_n:
        raise InvalidArgument(
            f"the exact spectrum forms the {n}x{n} Hessian; this server does that up to "
            f"n={max_exact_n}. Use method lanczos (extreme eigenvalues), trace or density, "
            "which need only Hessian-vector products"
        )
    if method is Method.LANCZOS:
        k = k or min(DEFAULT_K, n // 2)
        if not 1 <= 2 * k <= n:
            raise InvalidArgument(
                f"lanczos finds the k smallest and k largest of n={n} eigenvalues, so k must be "
                f"between 1 and {n // 2}; got k={k}. For every eigenvalue use method exact"
            )
        num_steps = num_steps or min(n, max(2 * k + 40, 80))
        if not 2 * k <= num_steps <= n:
            raise InvalidArgument(
                f"num_steps must be between 2k={2 * k} and n={n} for lanczos, got {num_steps}"
            )
    if method is Method.DENSITY:
        num_steps = num_steps or min(n, DEFAULT_DENSITY_STEPS)
        if num_steps > n:
            raise InvalidArgument(f"num_steps must be at most n={n} for density, got {num_steps}")
        num_probes = num_probes or DEFAULT_PROBES
        grid_size = grid_size or DEFAULT_GRID
    if method is Method.TRACE:
        num_matvecs = num_matvecs or DEFAULT_MATVECS
        estimator = estimator or TraceEstimator.HUTCHPP
        least = 4 if estimator is TraceEstimator.HUTCHPP else 2
        if num_matvecs < least:
            raise InvalidArgument(
                f"{estimator.value} needs num_matvecs ≥ {least}, got {num_matvecs}"
            )
    return SpectrumRequest(
        method=method,
        wrt=variable,
        shared=shared_indices(program, shared),
        eigenvectors=eigenvectors,
        k=k,
        num_steps=num_steps,
        num_probes=num_probes,
        num_matvecs=num_matvecs,
        estimator=estimator or TraceEstimator.HUTCHPP,
        seed=seed,
        grid_size=grid_size,
        tol=tol,
        gtol=gtol,
        sigma=sigma,
        objective=objective,
    )
