"""Sparse Jacobians and Hessians: a pattern detected once for all inputs, coloured, and
the values computed with one JVP, VJP or HVP per colour instead of one per variable.

For f with variable x (raveled, n elements) and output of m elements, the Jacobian is the
(m, n) matrix J[i, j] = ∂f_i/∂x_j, and the Hessian of a scalar f is (n, n). A pattern is

    detected   by asdex's abstract interpretation of f's jaxpr: the structural nonzeros
               for every input, so `where`, `maximum`, `relu` and `clip` keep both
               branches (a pattern read off the values at one point would miss some);
    coloured   column colouring (JVPs) or row colouring (VJPs) for a Jacobian, whichever
               needs fewer colours unless the mode says; star colouring for a Hessian, whose
               symmetry lets one HVP recover entries two columns share;
    computed   per point: B = J S (or Sᵀ J, or H S) for the seed matrix S of the colours,
               vmapped over the points like every other kind, then one gather of the
               nonzeros out of B on the device: values (batch, nnz), row-major.

Patterns are cached per (function, kind, variable, mode). Where colouring saves little
(colours ≥ DENSE_FRACTION of the dense passes), or detection cannot finish (an operation
asdex has no rule for, or a pattern too dense to detect cheaply), the values are computed
by the dense kind and the result says why (dense_reason); the answer is the same.

JAX-export functions are refused: detection needs f's jaxpr, and a deserialized artifact is
one opaque call (`call_exported`) whose every output would depend on every input.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import warnings
from collections.abc import Callable
from typing import Any, Literal

import asdex
import jax
import jax.numpy as jnp
import numpy as np

from hessd.proto import codec
from hessd.proto.kinds import JacobianMode, Kind
from hessd.proto.v1 import hessd_pb2
from hessd.service.engine import EngineRequest
from hessd.service.errors import InvalidArgument
from hessd.service.kinds import shared_indices
from hessd.service.program import ExpressionProgram, Program
from hessd.service.variable import Wrt

__all__ = [
    "DENSE_FRACTION",
    "MAX_DETECTED_NONZEROS",
    "Pattern",
    "SparseRequest",
    "make_sparse_request",
    "pattern_for",
    "to_wire",
]

logger = logging.getLogger(__name__)

# Compute dense when the colours are at least this fraction of the dense passes: the
# saving is then under a quarter, and the dense kind needs no seeds and no pattern.
DENSE_FRACTION = 0.75
# asdex propagates index sets in Python, so its cost grows with the pattern's density (a
# dense 1000 x 1000 Hessian through a matmul: 8 s and 1 GB; 3000: 260 s and 7.5 GB).
# Above this many entries, a numerical probe estimates the nonzeros first, and a pattern
# estimated denser than this is not detected but computed dense.
MAX_DETECTED_NONZEROS = 1_000_000
# Columns the probe samples.
_PROBE_COLUMNS = 32
_CACHE_SIZE = 64

_COLORINGS = {
    "fwd": hessd_pb2.COLUMN,
    "rev": hessd_pb2.ROW,
    "fwd_over_rev": hessd_pb2.SYMMETRIC,
}


@dataclasses.dataclass(frozen=True, eq=False)
class Pattern:
    """The structural nonzeros of one function's Jacobian or Hessian, and how to compute them.

    shape (m, n); rows and cols (nnz,) in row-major order, or None with every_entry (the
    values are then the whole matrix). `coloring` is asdex's ColoredPattern when the values
    come from compressed products, None when they are computed dense (dense_reason says
    why). Compared by identity: one object per cached pattern, part of the engine's key.
    """

    kind: Kind
    shape: tuple[int, int]
    rows: np.ndarray | None
    cols: np.ndarray | None
    coloring: Any  # asdex.ColoredPattern | None
    colors: int
    mode: str  # asdex's: "fwd", "rev" or "fwd_over_rev"; "" when nothing was coloured
    dense_passes: int
    dense_reason: str = ""
    # Pattern order (row-major) from asdex's order; None when they agree.
    order: np.ndarray | None = None

    @property
    def every_entry(self) -> bool:
        return self.rows is None

    @property
    def nnz(self) -> int:
        return math.prod(self.shape) if self.rows is None else int(self.rows.size)

    @property
    def passes(self) -> int:
        return self.dense_passes if self.coloring is None else self.colors


@dataclasses.dataclass(frozen=True)
class SparseRequest(EngineRequest):
    """A sparse jacobian or hessian of a Program: values (batch, nnz) in the pattern's order."""

    pattern: Pattern
    wrt: Wrt
    shared: tuple[int, ...] = ()
    output_dtype: np.dtype | None = None

    @property
    def label(self) -> str:
        return f"sparse {self.pattern.kind.value}"

    def output_shapes(self, program: Program) -> dict[str, tuple[int, ...]]:
        return {"output": (self.pattern.nnz,)}

    def result_dtype(self, program: Program) -> np.dtype:
        return self.output_dtype or program.output_dtype

    def transform(self, program: Program) -> Callable[..., Any]:
        assert isinstance(program, ExpressionProgram)  # make_sparse_request refuses others
        values = _values(self.pattern, self.output_dtype)

        def per_point(*inputs: jax.Array) -> jax.Array:
            f_x, x = self.wrt.view(program, program.fn, inputs)
            return values(lambda z: f_x(z.reshape(x.shape)).reshape(-1), x.reshape(-1))

        in_axes = [None if i in self.shared else 0 for i in range(len(program.inputs))]
        return jax.vmap(per_point, in_axes=in_axes)


def make_sparse_request(
    program: Program,
    kind: Kind,
    wrt: tuple[str, ...] = (),
    mode: JacobianMode = JacobianMode.AUTO,
    flatten: bool = False,
    shared: tuple[str, ...] = (),
    output_dtype: np.dtype | None = None,
) -> SparseRequest:
    """Check that `program` can have a sparse `kind`, and find (or reuse) its pattern.

    InvalidArgument for a kind other than jacobian and hessian, the hessian of a
    non-scalar function, several wrt inputs without flatten, a jax_export function.
    """
    variable = _check(program, kind, wrt, mode, flatten)
    return SparseRequest(
        pattern=pattern_for(program, kind, variable, mode),
        wrt=variable,
        shared=shared_indices(program, shared),
        output_dtype=output_dtype,
    )


def _check(
    program: Program, kind: Kind, wrt: tuple[str, ...], mode: JacobianMode, flatten: bool
) -> Wrt:
    if kind not in (Kind.JACOBIAN, Kind.HESSIAN):
        raise InvalidArgument(
            f"sparse applies to kinds jacobian and hessian, not {kind.value}: the other "
            "kinds never form a matrix"
        )
    if not isinstance(program, ExpressionProgram):
        raise InvalidArgument(
            "sparse needs an expression function: pattern detection reads f's jaxpr, and a "
            "jax_export artifact is one opaque call whose outputs would all depend on all "
            "inputs. Register the function as an expression, or ask for the dense kind"
        )
    if kind is Kind.HESSIAN and program.output_shape != ():
        raise InvalidArgument(
            "a sparse hessian is for a scalar function; this function's output has shape "
            f"{program.output_shape}. Use the sparse jacobian of its gradient, or reduce the "
            "output to a scalar (e.g. sum(...))"
        )
    if kind is Kind.HESSIAN and mode is not JacobianMode.AUTO:
        raise InvalidArgument("jacobian_mode applies only to kind jacobian, not hessian")
    variable = program.wrt(wrt, flatten)
    if variable.split:
        raise InvalidArgument(
            "sparse takes one variable: with several wrt inputs set flatten=True (the matrix "
            "is then over their concatenation, raveled)"
        )
    return variable


_cache: collections.OrderedDict[tuple, Pattern] = collections.OrderedDict()
_cache_lock = threading.Lock()


def pattern_for(program: Program, kind: Kind, wrt: Wrt, mode: JacobianMode) -> Pattern:
    """The pattern of `kind` of `program` over `wrt`, from the cache or detected now."""
    key = (program.function_id, kind, wrt, mode)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    # Outside the lock: a large detection takes seconds, and two concurrent first calls
    # at worst detect twice.
    pattern = _detect(program, kind, wrt, mode)
    with _cache_lock:
        pattern = _cache.setdefault(key, pattern)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return pattern


def _detect(program: Program, kind: Kind, wrt: Wrt, mode: JacobianMode) -> Pattern:
    assert isinstance(program, ExpressionProgram)
    n = math.prod(wrt.shape(program))
    m = n if kind is Kind.HESSIAN else math.prod(program.output_shape)
    dense_passes = n if kind is Kind.HESSIAN else min(m, n)
    flat = _flat_function(program, wrt)
    args = [np.zeros(n, _variable_dtype(program, wrt))]
    args += [np.zeros(s.shape, s.dtype) for s in program.inputs]

    def dense(reason: str) -> Pattern:
        """Every entry, computed dense: no pattern was found, so nothing was coloured."""
        logger.info("sparse %s of %s: %s", kind.value, program.function_id[:12], reason)
        return Pattern(kind, (m, n), None, None, None, 0, "", dense_passes, reason)

    if m * n > MAX_DETECTED_NONZEROS:
        estimate = _estimate_nonzeros(flat, kind, args)
        if estimate > MAX_DETECTED_NONZEROS:
            return dense(
                f"the pattern looks too dense to detect: about {estimate:.3g} of its "
                f"{m * n} entries are nonzero at a random point (over {MAX_DETECTED_NONZEROS}); "
                "computed dense"
            )
    try:
        with warnings.catch_warnings():
            # DenseColoringWarning: the answer below says so in dense_reason instead.
            warnings.simplefilter("ignore", asdex.DenseColoringWarning)
            if kind is Kind.HESSIAN:
                coloring = asdex.hessian_coloring(lambda z, *xs: flat(z, *xs)[0], *args)
            else:
                asdex_mode: dict[JacobianMode, Literal["fwd", "rev"]] = {
                    JacobianMode.FORWARD: "fwd",
                    JacobianMode.REVERSE: "rev",
                }
                coloring = asdex.jacobian_coloring(flat, *args, mode=asdex_mode.get(mode))
    except NotImplementedError as e:
        # asdex names the primitive it has no rule for ("No handler for primitive 'x'. ...").
        what = str(e).split(".")[0].removeprefix("No handler for ")
        return dense(
            f"pattern detection has no rule for {what} (asdex): every entry computed dense"
        )
    sparsity = coloring.sparsity
    rows, cols = np.asarray(sparsity.rows), np.asarray(sparsity.cols)
    index = np.int32 if max(m, n) < 2**31 else np.int64
    order = np.lexsort((cols, rows))
    ordered = bool(np.all(order == np.arange(order.size)))
    reason = ""
    if coloring.num_colors >= DENSE_FRACTION * dense_passes:
        reason = (
            f"the pattern needs {coloring.num_colors} colours against {dense_passes} dense "
            f"passes (at least {DENSE_FRACTION:.0%} of them): computed dense, nonzeros sent"
        )
        logger.info("sparse %s of %s: %s", kind.value, program.function_id[:12], reason)
    return Pattern(
        kind=kind,
        shape=(m, n),
        rows=rows[order].astype(index),
        cols=cols[order].astype(index),
        coloring=None if reason else coloring,
        colors=int(coloring.num_colors),
        mode=coloring.mode,
        dense_passes=dense_passes,
        dense_reason=reason,
        order=None if ordered else order,
    )


def _variable_dtype(program: Program, wrt: Wrt) -> np.dtype:
    return np.result_type(*(program.inputs[i].dtype for i in wrt.indices))


def _flat_function(program: ExpressionProgram, wrt: Wrt) -> Callable[..., jax.Array]:
    """g(z, *inputs): f's output raveled, of the raveled variable z, the inputs otherwise.
    Every input is an argument (none closed over), so detection holds for all of them."""

    def g(z: jax.Array, *inputs: jax.Array) -> jax.Array:
        f_x, x = wrt.view(program, program.fn, inputs)
        return f_x(z.reshape(x.shape)).reshape(-1)

    return g


def _estimate_nonzeros(flat: Callable[..., jax.Array], kind: Kind, args: list[np.ndarray]) -> float:
    """nnz of the matrix, estimated from a few of its columns at a random point."""
    rng = np.random.default_rng(0)
    point = [rng.standard_normal(a.shape).astype(a.dtype) for a in args]
    n = point[0].size
    columns = rng.choice(n, size=min(n, _PROBE_COLUMNS), replace=False)
    seeds = np.zeros((columns.size, n), point[0].dtype)
    seeds[np.arange(columns.size), columns] = 1

    def column(s: jax.Array) -> jax.Array:
        def g(z: jax.Array) -> jax.Array:
            return flat(z, *point[1:])

        if kind is Kind.HESSIAN:
            return jax.jvp(jax.grad(lambda z: g(z)[0]), (point[0],), (s,))[1]
        return jax.jvp(g, (point[0],), (s,))[1]

    block = np.asarray(jax.jit(jax.vmap(column))(seeds))
    return float(np.count_nonzero(block)) * n / columns.size


def _values(
    pattern: Pattern, output_dtype: np.dtype | None
) -> Callable[[Callable[[jax.Array], jax.Array], jax.Array], jax.Array]:
    """values(g, z): the pattern's nonzeros at one point of g(z) (z raveled, g raveled)."""
    coloring = pattern.coloring

    def values(g: Callable[[jax.Array], jax.Array], z: jax.Array) -> jax.Array:
        if coloring is None:
            if pattern.kind is Kind.HESSIAN:
                matrix = jax.hessian(lambda z: g(z)[0])(z)
            else:
                m, n = pattern.shape
                matrix = (jax.jacfwd if n <= m else jax.jacrev)(g)(z)
            if pattern.every_entry:
                out = matrix.reshape(-1)
            else:
                out = matrix.reshape(pattern.shape)[pattern.rows, pattern.cols]
        else:
            seeds = jnp.asarray(coloring.colors == np.arange(coloring.num_colors)[:, None])
            seeds = seeds.astype(z.dtype)
            match pattern.mode:
                case "fwd":
                    compressed = jax.vmap(lambda s: jax.jvp(g, (z,), (s,))[1])(seeds)
                case "rev":
                    _, pullback = jax.vjp(g, z)
                    compressed = jax.vmap(lambda u: pullback(u)[0])(seeds)
                case _:
                    gradient = jax.grad(lambda z: g(z)[0])
                    compressed = jax.vmap(lambda s: jax.jvp(gradient, (z,), (s,))[1])(seeds)
            out = asdex.decompress_data(compressed, coloring)
            if pattern.order is not None:
                out = out[pattern.order]
        return out if output_dtype is None else out.astype(output_dtype)

    return values


def to_wire(
    pattern: Pattern, dtype: np.dtype, indices: bool = True, data: bool = True
) -> tuple[hessd_pb2.SparsityPattern, list[np.ndarray]]:
    """The SparsityPattern message (counts, costs, and the indices unless `indices` is
    False) and the index arrays it describes, in stream order; with data=False their
    Tensors hold no bytes (a streamed response sends them after the header)."""
    message = hessd_pb2.SparsityPattern(
        shape=pattern.shape,
        nnz=pattern.nnz,
        every_entry=pattern.every_entry,
        coloring=_COLORINGS.get(pattern.mode, hessd_pb2.SPARSE_COLORING_UNSPECIFIED),
        colors=pattern.colors,
        passes=pattern.passes,
        dense_passes=pattern.dense_passes,
        bytes_per_point=pattern.nnz * dtype.itemsize,
        dense_bytes_per_point=math.prod(pattern.shape) * dtype.itemsize,
        dense_reason=pattern.dense_reason,
    )
    if not indices or pattern.rows is None or pattern.cols is None:
        return message, []
    codec.encode(pattern.rows, out=message.rows, data=data)
    codec.encode(pattern.cols, out=message.cols, data=data)
    return message, [pattern.rows, pattern.cols]
