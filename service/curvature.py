"""Curvature of objectives over data sets: reductions, operators, diagonals, solves.

An objective reduces a function over the N examples of a data set,

    L(θ) = Σᵢ wᵢ ℓᵢ(θ),   wᵢ = 1/N (mean) or 1 (sum),

where ℓᵢ(θ) = f(θ, xᵢ) for a scalar f, or ℓ(f(θ, xᵢ), yᵢ) when f is a model and ℓ its loss
(built-in `mse` ½‖o - y‖² or `softmax_cross_entropy` -log softmax(o)[y], or an expression
in `output` and `target`). θ is the flat variable (p,) of `wrt`, one value per point
(checkpoints). The curvature operators, with Jᵢ the model's Jacobian at example i, gᵢ =
∇θ ℓᵢ and Hℓ the loss's Hessian in the output:

    hessian            Σᵢ wᵢ ∇²ℓᵢ  =  Σᵢ wᵢ (Jᵢᵀ Hℓ Jᵢ + Σₖ ∂ℓ/∂oₖ ∇²oₖ)
    ggn                Σᵢ wᵢ Jᵢᵀ Hℓ Jᵢ                          (positive semi-definite)
    fisher             Σᵢ wᵢ (1/S) Σₛ Jᵢᵀ ∇ℓ(ŷₛ) ∇ℓ(ŷₛ)ᵀ Jᵢ, ŷₛ ~ p(y | oᵢ)  (E = ggn)
    empirical_fisher   Σᵢ wᵢ gᵢ gᵢᵀ

Everything runs on the device, per point, by a `lax.scan` over chunks of examples with the
examples of a chunk vmapped: memory is bounded by the chunk, not by N. Padding examples
(N rounded up to whole chunks) have weight 0. Each matvec is one pass over the data; a
dense operator (the hessian kind, the exact diagonal) is p matvecs in one pass.

Built on the four primitives of primitives.py, so expression and JAX-export programs get
every operator, diagonal, solve and spectral method alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from jax import lax

from hessd.proto.kinds import (
    BuiltinLoss,
    DiagonalEstimator,
    Kind,
    Operator,
    Reduction,
    curvature_shapes,
)
from hessd.service import spectral
from hessd.service.config import machine_memory
from hessd.service.engine import EngineRequest
from hessd.service.errors import InvalidArgument, ResourceExhausted
from hessd.service.primitives import Primitives
from hessd.service.variable import Wrt

if TYPE_CHECKING:
    from hessd.service.program import Program

__all__ = [
    "NO_DATA",
    "CurvatureRequest",
    "Objective",
    "PointOperator",
    "batched_transform",
    "chunk_for",
    "conjugate_gradients",
    "device_budget",
    "device_memory_bytes",
    "point_operator",
]

DEFAULT_MATVECS = 90
MAX_MATVECS = 10_000
MAX_ITERATIONS = 10_000
# Points computed at once by a request over a data set: each holds a chunk's intermediates.
POINTS_PER_RUN = 4


@dataclasses.dataclass(frozen=True)
class Objective:
    """A data set a request reduces over; hashable, part of the executable's key.

    data: the program's inputs that come per example (their indices), in the order their
        arrays follow the point arguments; then the target, if `loss` is set.
    examples: N. chunk: examples per scan step; N mod chunk more make one last step.
    loss: None (f is the per-example term), a BuiltinLoss, or an expression's source.
    """

    data: tuple[int, ...]
    examples: int
    chunk: int
    reduction: Reduction = Reduction.MEAN
    operator: Operator = Operator.HESSIAN_OPERATOR
    loss: BuiltinLoss | str | None = None
    seed: int = 0
    mc_samples: int = 1
    # False only for NO_DATA: the function itself at the point, no data arguments.
    present: bool = True

    @property
    def num_chunks(self) -> int:
        return -(-self.examples // self.chunk)

    @property
    def num_data_args(self) -> int:
        """Arrays that follow the point arguments: data, the target, the weights."""
        return len(self.data) + (self.loss is not None) + 1

    def weights(self, dtype: np.dtype) -> np.ndarray:
        """(N,) wᵢ: 1/N for the mean, 1 for the sum."""
        return np.full(
            self.examples, 1 / self.examples if self.reduction is Reduction.MEAN else 1, dtype
        )


# The plain Hessian of f at a point: one "example", no data.
NO_DATA = Objective(data=(), examples=1, chunk=1, present=False)


class PointOperator:
    """The objective and its operator C at one point θ: value, gradient, C v, C V.

    Built inside a trace (per point, under vmap over points); `data` are the data
    arrays, the target and the weights, each with the example axis first.
    """

    def __init__(
        self,
        prims: Primitives,
        program: Program,
        objective: Objective,
        point_inputs: Sequence[jax.Array | None],
        theta: jax.Array,
        data: Sequence[jax.Array],
        loss: Callable[[jax.Array, Any], jax.Array] | None,
    ):
        self.prims = prims
        self.objective = objective
        self.point_inputs = list(point_inputs)
        self.theta = theta
        self.dtype = theta.dtype
        self.loss = loss
        n_data = len(objective.data)
        if objective.present:
            self._xs = list(data[:n_data])
            self._target = data[n_data] if loss is not None else None
            self._weights = data[-1]
        else:
            self._xs, self._target = [], None
            self._weights = jnp.ones((1,), theta.dtype)
        self._index = jnp.arange(objective.examples)

    # One example ------------------------------------------------------------------------

    def _inputs(self, xs: Sequence[jax.Array]) -> list[jax.Array]:
        inputs = list(self.point_inputs)
        for i, x in zip(self.objective.data, xs, strict=True):
            inputs[i] = x
        return inputs  # type: ignore[return-value]  # every slot is filled now

    def _output_cotangent(self, out: jax.Array, y: jax.Array | None) -> jax.Array:
        """∂ℓ/∂o at the model's output (1 for a scalar f without a loss)."""
        if self.loss is None:
            return jnp.ones_like(out)
        return jax.grad(self.loss)(out, y)

    def _loss_hvp(self, out: jax.Array, y: jax.Array | None, u: jax.Array) -> jax.Array:
        """Hℓ u, the loss's Hessian in the output applied to u."""
        assert self.loss is not None
        loss = self.loss
        return jax.jvp(lambda o: jax.grad(loss)(o, y), (out,), (u,))[1]

    def _term(self, xs: Sequence[jax.Array], y: jax.Array | None) -> jax.Array:
        out = self.prims.value(self.theta, self._inputs(xs))
        return out if self.loss is None else self.loss(out, y)

    def _example_gradient(self, xs: Sequence[jax.Array], y: jax.Array | None) -> jax.Array:
        inputs = self._inputs(xs)
        out = self.prims.value(self.theta, inputs)
        return self.prims.vjp(self.theta, inputs, self._output_cotangent(out, y))

    def _example_matvec(
        self, xs: Sequence[jax.Array], y: jax.Array | None, index: jax.Array, v: jax.Array
    ) -> jax.Array:
        p, theta, inputs = self.prims, self.theta, self._inputs(xs)
        match self.objective.operator:
            case Operator.HESSIAN_OPERATOR if self.loss is None:
                return p.hvp(theta, inputs, jnp.ones((), self.dtype), v)
            case Operator.HESSIAN_OPERATOR:
                out = p.value(theta, inputs)
                ggn = p.vjp(theta, inputs, self._loss_hvp(out, y, p.jvp(theta, inputs, v)))
                return ggn + p.hvp(theta, inputs, self._output_cotangent(out, y), v)
            case Operator.GGN:
                out = p.value(theta, inputs)
                return p.vjp(theta, inputs, self._loss_hvp(out, y, p.jvp(theta, inputs, v)))
            case Operator.FISHER:
                out = p.value(theta, inputs)
                g = self._sampled_cotangents(out, index)  # (S, *out)
                jv = p.jvp(theta, inputs, v)
                coefficients = jnp.tensordot(g, jv, axes=jv.ndim)  # (S,)
                u = jnp.tensordot(coefficients, g, axes=1) / g.shape[0]
                return p.vjp(theta, inputs, u)
            case Operator.EMPIRICAL_FISHER:
                g = self._example_gradient(xs, y)
                return g * jnp.dot(g, v)
        raise AssertionError(self.objective.operator)

    def _sampled_cotangents(self, out: jax.Array, index: jax.Array) -> jax.Array:
        """∇ℓ(o, ŷₛ) for S labels ŷₛ drawn from the model's predictive distribution at o,
        from (seed, example index): the same for every matvec, so C is one fixed matrix."""
        seed = self.objective.seed
        key = jax.random.fold_in(jax.random.key(seed - (1 << 64) if seed >= 1 << 63 else seed),
                                 index)  # fmt: skip
        s = self.objective.mc_samples
        match self.objective.loss:
            case BuiltinLoss.MSE:
                # ½‖o - y‖² is the NLL of N(o, I): ŷ = o + ε, ∇ℓ = o - ŷ = -ε.
                return -jax.random.normal(key, (s, *out.shape), out.dtype)
            case BuiltinLoss.SOFTMAX_CROSS_ENTROPY:
                probabilities = jax.nn.softmax(out)
                labels = jax.random.categorical(key, out, shape=(s,))
                return probabilities - jax.nn.one_hot(labels, out.shape[-1], dtype=out.dtype)
        raise AssertionError("fisher needs a built-in loss (checked at the request)")

    # Reductions over the data set -------------------------------------------------------

    def _parts(self, weights: jax.Array) -> tuple[Any, Any]:
        """The data, target, weights and example indices as (whole chunks, remainder): the
        first (num_chunks, chunk(j) → the j-th chunk) for the scan, the rest (N mod chunk,
        ...) for one more step, or None where there is none. No padding, no copy."""
        o = self.objective
        k = o.examples // o.chunk
        whole = k * o.chunk
        data = (self._xs, self._target, weights, self._index)
        chunks = None
        if k:
            # Dynamic slices of the arrays as they are, chunk by chunk: a static slice of
            # the whole part (when N is no multiple of the chunk) would copy the data set.
            def chunk(j: jax.Array) -> Any:
                return jax.tree.map(
                    lambda a: lax.dynamic_slice_in_dim(a, j * o.chunk, o.chunk), data
                )

            chunks = (k, chunk)
        rest = jax.tree.map(lambda a: a[whole:], data) if whole < o.examples else None
        return chunks, rest

    def _scan(self, term: Callable[..., Any], weighted: bool = True) -> tuple[Any, Any]:
        """(Σᵢ wᵢ term(...)["sum"], the per-example term(...)["each"] stacked (N,)): a scan
        over chunks, the chunk's examples vmapped. Without weights, wᵢ is 1 on every
        example."""
        if not self.objective.present:
            single = term([], None, jnp.zeros((), jnp.int32))
            return single["sum"], jax.tree.map(lambda a: a[None], single["each"])
        weights = self._weights if weighted else jnp.ones_like(self._weights)

        def chunk_terms(xs_c: Any, y_c: Any, w_c: jax.Array, i_c: jax.Array) -> tuple:
            values = jax.vmap(term)(xs_c, y_c, i_c)
            total = jax.tree.map(lambda v: jnp.tensordot(w_c, v, axes=1), values["sum"])
            return total, values["each"]

        chunks, rest = self._parts(weights)
        totals, eaches = [], []
        if chunks is not None:
            k, chunk = chunks
            zero = jax.eval_shape(lambda: chunk_terms(*chunk(jnp.zeros((), jnp.int32))))[0]
            init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zero)

            def body(total: Any, j: jax.Array) -> tuple[Any, Any]:
                part, each = chunk_terms(*chunk(j))
                return jax.tree.map(jnp.add, total, part), each

            total, each = lax.scan(body, init, jnp.arange(k))
            totals.append(total)
            eaches.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), each))
        if rest is not None:
            total, each = chunk_terms(*rest)
            totals.append(total)
            eaches.append(each)
        return (
            jax.tree.map(lambda *parts: sum(parts[1:], parts[0]), *totals),
            jax.tree.map(lambda *parts: jnp.concatenate(parts), *eaches),
        )

    def _reduce(self, term: Callable[..., Any]) -> Any:
        """Σᵢ wᵢ term(xsᵢ, yᵢ, indexᵢ) over the data set."""
        total, _ = self._scan(lambda xs, y, i: {"sum": term(xs, y, i), "each": ()})
        return total

    # Whole chunks at once (programs whose value is plain JAX) --------------------------
    #
    # Per example, every product ends in a parameter cotangent of p numbers that is then
    # summed: a chunk of C examples holds C·p of them and runs matrix-vector products.
    # Differentiating the chunk's model outputs F(θ) = (f(θ, x₁), ..., f(θ, x_C)) as one
    # function instead gives Σᵢ Jᵢᵀuᵢ from one backward pass of matrix-matrix products,
    # and J V for the chunk from one forward pass, with nothing of size C·p.

    def _chunks(self, body: Callable[..., Any]) -> Any:
        """Σ over chunks of body(xs_c, y_c, w_c, i_c), each the weighted sum of a chunk."""
        if not self.objective.present:
            return body([], None, self._weights, jnp.zeros((1,), jnp.int32))
        chunks, rest = self._parts(self._weights)
        totals = []
        if chunks is not None:
            k, chunk = chunks
            zero = jax.eval_shape(lambda: body(*chunk(jnp.zeros((), jnp.int32))))
            init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zero)

            def step(total: Any, j: jax.Array) -> tuple[Any, None]:
                return jax.tree.map(jnp.add, total, body(*chunk(j))), None

            totals.append(lax.scan(step, init, jnp.arange(k))[0])
        if rest is not None:
            totals.append(body(*rest))
        return jax.tree.map(lambda *parts: sum(parts[1:], parts[0]), *totals)

    def _outputs(self, xs_c: Sequence[jax.Array]) -> Callable[[jax.Array], jax.Array]:
        """θ ↦ F(θ), the model's outputs at the chunk's examples, (C, *out)."""
        value = self.prims.value
        if not self.objective.present:
            return lambda theta: value(theta, self._inputs([]))[None]
        return lambda theta: jax.vmap(lambda *x: value(theta, self._inputs(x)))(*xs_c)

    def _terms(self, outputs: jax.Array, y_c: jax.Array | None) -> jax.Array:
        """ℓᵢ at the chunk's outputs, (C,)."""
        if self.loss is None:
            return outputs
        return jax.vmap(self.loss)(outputs, y_c)

    def _cotangents(self, outputs: jax.Array, y_c: jax.Array | None) -> jax.Array:
        if self.loss is None:
            return jnp.ones_like(outputs)
        return jax.vmap(jax.grad(self.loss))(outputs, y_c)

    def _weighted(self, w_c: jax.Array, u: jax.Array) -> jax.Array:
        return w_c.reshape(-1, *([1] * (u.ndim - 1))) * u

    def _chunk_gradient(self, xs_c: Any, y_c: Any, w_c: jax.Array, i_c: Any) -> jax.Array:
        outputs, pullback = jax.vjp(self._outputs(xs_c), self.theta)
        return pullback(self._weighted(w_c, self._cotangents(outputs, y_c)))[0]

    def _chunk_matvec(
        self, xs_c: Any, y_c: Any, w_c: jax.Array, i_c: jax.Array, v: jax.Array
    ) -> jax.Array:
        model = self._outputs(xs_c)
        match self.objective.operator:
            case Operator.HESSIAN_OPERATOR:

                def total(theta: jax.Array) -> jax.Array:
                    return jnp.dot(w_c, self._terms(model(theta), y_c))

                return jax.jvp(jax.grad(total), (self.theta,), (v,))[1]
            case Operator.GGN | Operator.FISHER:
                outputs, jv = jax.jvp(model, (self.theta,), (v,))
                if self.objective.operator is Operator.GGN:
                    u = jax.vmap(self._loss_hvp)(outputs, y_c, jv)
                else:
                    g = jax.vmap(self._sampled_cotangents)(outputs, i_c)  # (C, S, *out)
                    axes = tuple(range(2, g.ndim))
                    coefficients = jnp.sum(g * jv[:, None], axis=axes)  # (C, S)
                    u = jnp.einsum("cs,cs...->c...", coefficients, g) / g.shape[1]
                _, pullback = jax.vjp(model, self.theta)
                return pullback(self._weighted(w_c, u))[0]
            case Operator.EMPIRICAL_FISHER:
                # (gᵢ·v) for every example from one forward pass of the terms, then
                # Σᵢ wᵢ (gᵢ·v) gᵢ from one backward pass.
                def terms(theta: jax.Array) -> jax.Array:
                    return self._terms(model(theta), y_c)

                _, gv = jax.jvp(terms, (self.theta,), (v,))
                _, pullback = jax.vjp(terms, self.theta)
                return pullback(w_c * gv)[0]
        raise AssertionError(self.objective.operator)

    def value(self) -> jax.Array:
        return self._reduce(lambda xs, y, i: self._term(xs, y))

    def gradient(self) -> jax.Array:
        if self.prims.transformable:
            return self._chunks(self._chunk_gradient)
        return self._reduce(lambda xs, y, i: self._example_gradient(xs, y))

    def matvec(self, v: jax.Array) -> jax.Array:
        """C v: one pass over the data."""
        if self.prims.transformable:
            return self._chunks(lambda xs, y, w, i: self._chunk_matvec(xs, y, w, i, v))
        return self._reduce(lambda xs, y, i: self._example_matvec(xs, y, i, v))

    def matmat(self, vectors: jax.Array) -> jax.Array:
        """C V for V (p, k): k matvecs in one pass over the data, (p, k)."""
        if self.prims.transformable:
            return self._chunks(
                lambda xs, y, w, i: jax.vmap(
                    lambda v: self._chunk_matvec(xs, y, w, i, v), in_axes=1, out_axes=1
                )(vectors)
            )
        return self._reduce(
            lambda xs, y, i: jax.vmap(
                lambda v: self._example_matvec(xs, y, i, v), in_axes=1, out_axes=1
            )(vectors)
        )

    def dense(self) -> jax.Array:
        """C itself, (p, p): p matvecs."""
        return self.matmat(jnp.eye(self.theta.shape[0], dtype=self.dtype))

    def gradient_statistics(self) -> dict[str, jax.Array]:
        """Reductions of the per-example gradients gᵢ = ∇θ ℓᵢ (of the example's own term,
        unweighted): the objective's gradient Σᵢ wᵢ gᵢ, ‖gᵢ‖₂ (N,), the per-coordinate
        variance (1/N) Σᵢ (gᵢ - ḡ)², and Σᵢ gᵢ²; the (N, p) gradients never leave the
        device, and one pass over the data computes all four."""
        o = self.objective

        def term(xs: list[jax.Array], y: jax.Array | None, i: jax.Array) -> dict:
            g = self._example_gradient(xs, y)
            return {"sum": {"g": g, "g2": g * g}, "each": jnp.linalg.norm(g)}

        sums, norms = self._scan(term, weighted=False)
        count = jnp.asarray(o.examples, self.dtype)
        mean = sums["g"] / count
        scale = 1 / count if o.reduction is Reduction.MEAN else jnp.ones((), self.dtype)
        return {
            "gradient": sums["g"] * scale,
            "norms": norms,
            "variance": jnp.maximum(sums["g2"] / count - mean * mean, 0),
            "sum_of_squares": sums["g2"],
        }


def point_operator(
    program: Program,
    prims: Primitives,
    wrt: Wrt,
    objective: Objective,
    point_inputs: Sequence[jax.Array | None],
    data: Sequence[jax.Array],
) -> PointOperator:
    """The PointOperator at one point; `point_inputs` has None in the data inputs' slots."""
    theta = jnp.concatenate([point_inputs[i].reshape(-1) for i in wrt.indices])  # type: ignore[union-attr]
    return PointOperator(
        prims, program, objective, point_inputs, theta, data, _loss_function(program, objective)
    )


def _loss_function(
    program: Program, objective: Objective
) -> Callable[[jax.Array, Any], jax.Array] | None:
    match objective.loss:
        case None:
            return None
        case BuiltinLoss.MSE:
            return lambda o, y: 0.5 * jnp.sum((o - y.astype(o.dtype)) ** 2)
        case BuiltinLoss.SOFTMAX_CROSS_ENTROPY:
            return _softmax_cross_entropy
        case str(source):
            from hessd.service.expression import compile_expression

            fn = compile_expression(source, ["output", "target"], {})
            return lambda o, y: fn(o, y)
    raise AssertionError(objective.loss)


def _softmax_cross_entropy(o: jax.Array, y: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(o)
    if jnp.issubdtype(y.dtype, jnp.integer):
        return -jnp.take(log_p, y)
    return -jnp.sum(y.astype(o.dtype) * log_p)


# Engine requests ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CurvatureRequest(EngineRequest):
    """value, gradient, hvp or hessian of an objective, or a curvature kind (diagonal,
    solve, gradient_statistics) with or without one; hashable, an engine request.

    Args: the program's inputs that are not data, in order (each per point, or shared);
    then the vector (solve's b, hvp's v) per point; then the objective's data arrays, the
    target and the weights (shared).
    """

    kind: Kind
    wrt: Wrt
    shared: tuple[int, ...] = ()
    objective: Objective = NO_DATA
    estimator: DiagonalEstimator = DiagonalEstimator.EXACT_DIAGONAL
    num_matvecs: int = 0
    seed: int = 0
    damping: float = 0.0
    tolerance: float = 0.0
    max_iterations: int = 0

    @property
    def label(self) -> str:
        return self.kind.value

    def p(self, program: Program) -> int:
        return sum(math.prod(program.inputs[i].shape) for i in self.wrt.indices)

    def output_shapes(self, program: Program) -> dict[str, tuple[int, ...]]:
        p = self.p(program)
        match self.kind:
            case Kind.VALUE:
                return {"output": ()}
            case Kind.GRADIENT | Kind.HVP:
                return {"output": (p,)}
            case Kind.HESSIAN:
                return {"output": (p, p)}
        return curvature_shapes(self.kind, p, self.objective.examples)

    def result_dtype(self, program: Program) -> np.dtype:
        return program.output_dtype

    def vector_signature(self, program: Program) -> list[tuple[tuple[int, ...], np.dtype]]:
        if self.kind in (Kind.HVP, Kind.SOLVE):
            return [((self.p(program),), program.output_dtype)]
        return []

    def max_chunk(self, program: Program) -> int | None:
        return POINTS_PER_RUN if self.objective.present else None

    @property
    def coalesces(self) -> bool:
        return not self.objective.present

    def transform(self, program: Program) -> Callable[..., Any]:
        return batched_transform(program, self, self.at_a_point)

    def at_a_point(self, op: PointOperator, vector: jax.Array | None) -> Any:
        match self.kind:
            case Kind.VALUE:
                return op.value()
            case Kind.GRADIENT:
                return op.gradient()
            case Kind.HVP:
                assert vector is not None
                return op.matvec(vector)
            case Kind.HESSIAN:
                return op.dense()
            case Kind.DIAGONAL:
                return self._diagonal(op)
            case Kind.SOLVE:
                assert vector is not None
                return self._solve(op, vector)
            case Kind.GRADIENT_STATISTICS:
                return op.gradient_statistics()
        raise AssertionError(self.kind)

    def _key(self) -> jax.Array:
        return jax.random.key(self.seed - (1 << 64) if self.seed >= 1 << 63 else self.seed)

    def _diagonal(self, op: PointOperator) -> dict[str, jax.Array]:
        p = op.theta.shape[0]
        if self.estimator is DiagonalEstimator.EXACT_DIAGONAL:
            diagonal = jnp.diagonal(op.dense())
            return {"diagonal": diagonal, "std_error": jnp.zeros_like(diagonal)}
        m = self.num_matvecs
        key_sketch, key_probe = jax.random.split(self._key())
        if self.estimator is DiagonalEstimator.HUTCHINSON_DIAGONAL:
            z = _rademacher(key_probe, (p, m), op.dtype)
            samples = z * op.matmat(z)  # (p, m), each column unbiased for diag(C)
            return {"diagonal": samples.mean(axis=1), "std_error": _std_error(samples)}
        # Diag++ (Baston & Nakatsukasa 2022): Q spans C S; diag(QQᵀC) exactly, Hutchinson on
        # the remainder diag((I - QQᵀ) C), whose variance falls with the deflated spectrum.
        s = m // 3
        sketch = jax.random.normal(key_sketch, (p, s), op.dtype)
        q, _ = jnp.linalg.qr(op.matmat(sketch))
        cq = op.matmat(q)
        exact = jnp.sum(q * cq, axis=1)
        z = _rademacher(key_probe, (p, m - 2 * s), op.dtype)
        cz = op.matmat(z)
        remainder = cz - q @ (q.T @ cz)
        samples = z * remainder
        return {"diagonal": exact + samples.mean(axis=1), "std_error": _std_error(samples)}

    def _solve(self, op: PointOperator, b: jax.Array) -> dict[str, jax.Array]:
        return conjugate_gradients(
            lambda v: op.matvec(v) + self.damping * v, b, self.tolerance, self.max_iterations
        )


def conjugate_gradients(
    matvec: spectral.Matvec, b: jax.Array, tolerance: float, max_iterations: int
) -> dict[str, jax.Array]:
    """x with (A x ≈ b) by conjugate gradients from x = 0, for symmetric positive
    (semi-)definite A: stops when ‖b - A x‖ ≤ tolerance ‖b‖ or after max_iterations steps.
    Returns solution, iterations (int32), residual (‖b - A x‖ / ‖b‖, recomputed with one
    more matvec, not the recurrence's) and converged. A direction of non-positive
    curvature (A indefinite, a Hessian at a saddle) stops the iteration: not converged."""
    dtype = b.dtype
    b_norm = jnp.linalg.norm(b)
    target = tolerance * b_norm

    def cond(state: tuple) -> jax.Array:
        _, _, _, rr, k, broke = state
        return (jnp.sqrt(rr) > target) & (k < max_iterations) & ~broke

    def body(state: tuple) -> tuple:
        x, r, d, rr, k, broke = state
        ad = matvec(d)
        curvature = jnp.dot(d, ad)
        broke = curvature <= 0
        alpha = jnp.where(broke, 0, rr / jnp.where(broke, 1, curvature))
        x = x + alpha * d
        r = r - alpha * ad
        rr_new = jnp.dot(r, r)
        d = r + (rr_new / jnp.where(rr == 0, 1, rr)) * d
        return x, r, d, rr_new, k + 1, broke

    zero = jnp.zeros_like(b)
    state = (zero, b, b, jnp.dot(b, b), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
    x, _, _, _, k, broke = lax.while_loop(cond, body, state)
    residual = jnp.linalg.norm(b - matvec(x)) / jnp.where(b_norm == 0, 1, b_norm)
    converged = (residual <= jnp.maximum(tolerance, 10 * jnp.finfo(dtype).eps)) & ~broke
    return {"solution": x, "iterations": k, "residual": residual, "converged": converged}


def _rademacher(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jax.random.rademacher(key, shape, dtype=dtype)


def _std_error(samples: jax.Array) -> jax.Array:
    """Per entry: the sample standard deviation over the columns, / √columns."""
    m = samples.shape[1]
    return jnp.std(samples, axis=1, ddof=1) / jnp.sqrt(jnp.asarray(m, samples.dtype))


def batched_transform(
    program: Program,
    request: Any,
    at_a_point: Callable[[PointOperator, jax.Array | None], Any],
) -> Callable[..., Any]:
    """g(*args) over a batch of points for a request with `wrt`, `shared`, `objective`:
    the point operator is built per point and `at_a_point` applied to it, vmapped."""
    objective: Objective = request.objective
    point_slots = [i for i in range(len(program.inputs)) if i not in objective.data]
    takes_vector = bool(request.vector_signature(program))
    prims = program.primitives(request.wrt)
    n_point = len(point_slots) + takes_vector
    n_data = objective.num_data_args if objective.present else 0

    def g(*args: jax.Array) -> Any:
        point_args, data = args[:n_point], args[n_point:]
        inputs: list[jax.Array | None] = [None] * len(program.inputs)
        for slot, a in zip(point_slots, point_args, strict=False):
            inputs[slot] = a
        vector = point_args[-1] if takes_vector else None
        op = point_operator(program, prims, request.wrt, objective, inputs, data)
        return at_a_point(op, vector)

    in_axes = [None if i in request.shared else 0 for i in range(n_point + n_data)]
    return jax.vmap(g, in_axes=in_axes)


# Request building -----------------------------------------------------------------------


def chunk_for(
    program: Program,
    wrt: Wrt,
    objective: Objective,
    columns: int,
    budget: int,
    chunk_size: int,
    device_bytes: int,
) -> int:
    """The examples per scan step: `chunk_size` if given (refused if a run cannot fit in
    device memory), else the most that keep POINTS_PER_RUN points × `columns` vectors ×
    the chunk's intermediates within `budget` bytes."""
    per_example = _bytes_per_example(program, wrt, objective)
    per_chunk_example = POINTS_PER_RUN * max(columns, 1) * per_example
    if chunk_size:
        need = chunk_size * per_chunk_example
        if need > device_bytes:
            raise ResourceExhausted(
                f"chunk_size={chunk_size} needs about {need} bytes of intermediates per run "
                f"({per_example} per example, {POINTS_PER_RUN} points, {columns} vectors), "
                f"over the device's {device_bytes} bytes; use a smaller chunk_size, or 0 to "
                "let the server choose"
            )
        return min(chunk_size, objective.examples)
    return max(1, min(objective.examples, budget // max(per_chunk_example, 1)))


def _bytes_per_example(program: Program, wrt: Wrt, objective: Objective) -> int:
    """An estimate of what one example adds to a pass over a chunk: the values of the model
    at one example that depend on the example (weights and their slices are shared by the
    chunk and not counted), about three times over for the forward pass, its tangents and
    its cotangents. A program that runs per example (JAX export) also holds a parameter
    cotangent of p numbers per example."""
    prims = program.primitives(wrt)
    p = sum(math.prod(program.inputs[i].shape) for i in wrt.indices)
    dtype = program.output_dtype
    avals = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in program.inputs]

    def model(*xs: jax.Array) -> jax.Array:
        return prims.value(jnp.concatenate([xs[i].reshape(-1) for i in wrt.indices]), xs)

    try:
        closed = jax.make_jaxpr(model)(*avals)
    except Exception:  # an estimate only: the request's own trace reports the error
        return 8 * p
    jaxpr = closed.jaxpr
    tainted = {jaxpr.invars[i] for i in objective.data}
    total = 0
    for eqn in jaxpr.eqns:
        if any(v in tainted for v in eqn.invars if isinstance(v, jax.extend.core.Var)):
            for v in eqn.outvars:
                tainted.add(v)
                aval = v.aval
                size = math.prod(getattr(aval, "shape", ()))
                total += size * np.dtype(getattr(aval, "dtype", dtype)).itemsize
    per_example = 3 * max(total, dtype.itemsize)
    if not prims.transformable:
        per_example += 4 * p * dtype.itemsize
    return per_example


def device_memory_bytes() -> int:
    """The default device's memory: its allocator's limit, or the host's RAM on the CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return machine_memory()


def device_budget() -> int:
    """What one pass over a data set may hold by default: an eighth of an accelerator's
    memory; 256 MiB on the CPU, where caches, not capacity, set the best chunk."""
    if jax.default_backend() == "cpu":
        return 256 << 20
    return device_memory_bytes() // 8


def check_matvecs(name: str, value: int) -> None:
    if value < 0 or value > MAX_MATVECS:
        raise InvalidArgument(f"{name} must be between 0 and {MAX_MATVECS}, got {value}")
