"""The derivative-kind contract, read by the client and the server alike (numpy-only).

For f with variable x of shape `in` (the `wrt` input, or the flat concatenation of several)
and output of shape `out`, per point:

    kind       needs               result, numerator layout
    value      -                   out
    gradient   out == ()           in
    jacobian   -                   out + in        (denominator: in + out)
    hessian    -                   out + in + in   (denominator: in + in + out)
                                   packed: (n(n+1)/2,), the upper triangle, row-major
    hvp        out == (), v: in    in
    jvp        t: in               out
    vjp        u: out              in
    taylor2    out == ()           value (), gradient in, hessian in + in
    taylor     d: in, order k      (k,) + out: d^j/dt^j f(x + t d) at t = 0, j = 1..k

The curvature kinds work on the flat variable (p,) and an operator C (the Hessian of a
scalar f, or of an objective over a data set, or its GGN or Fisher; see Objective):

    diagonal             -        diagonal (p,), std_error (p,)
    solve                b: (p,)  solution (p,), iterations (), residual (), converged ()
    gradient_statistics  data     gradient (p,), norms (N,), variance (p,), sum_of_squares (p,)

With several `wrt` inputs and no `flatten`, gradient, jacobian and vjp come per input (named
by input) and hessian per block ("a,b" for ∂²f/∂a∂b).

The enums here are the wire's: `Kind.from_wire(request.kind)` and `kind.wire` translate,
with the wire's UNSPECIFIED (0) meaning each option's default.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from typing import Any, Self

import numpy as np

from hessd.proto.v1 import hessd_pb2

__all__ = [
    "MAX_TAYLOR_ORDER",
    "BuiltinLoss",
    "DiagonalEstimator",
    "JacobianMode",
    "Kind",
    "Layout",
    "Method",
    "Operator",
    "PointClass",
    "Reduction",
    "TraceEstimator",
    "curvature_shapes",
    "pack_triangles",
    "result_shapes",
    "spectrum_shapes",
    "unpack_triangles",
    "variable_shape",
]

MAX_TAYLOR_ORDER = 8

Shape = tuple[int, ...]


class _WireEnum(enum.Enum):
    """An enum whose members are named as the wire enum's values (`Kind.HVP` ↔ `HVP`)."""

    @classmethod
    def from_wire(cls, value: int) -> Self:
        """The member of a wire value; UNSPECIFIED (0) is the default, if the option has one.

        ValueError for values this version does not know, naming the ones it does.
        """
        if value == 0 and cls in _DEFAULTS:
            return cls(_DEFAULTS[cls].value)
        try:
            return cls[_WIRE_TYPES[cls].Name(value)]
        except (ValueError, KeyError):
            raise ValueError(
                f"unknown {cls.__name__} value {value}; use one of "
                + ", ".join(m.value for m in cls)
            ) from None

    @classmethod
    def parse(cls, text: str) -> Self:
        """The member called `text` (its value: "hvp", "denominator"); ValueError naming the
        choices otherwise."""
        try:
            return cls(text)
        except ValueError:
            raise ValueError(
                f"unknown {cls.__name__} {text!r}; use one of " + ", ".join(m.value for m in cls)
            ) from None

    @property
    def wire(self) -> Any:
        """The wire enum's value: an int, typed by the generated stubs as their enum."""
        return _WIRE_TYPES[type(self)].Value(self.name)


class Kind(_WireEnum):
    VALUE = "value"
    GRADIENT = "gradient"
    JACOBIAN = "jacobian"
    HESSIAN = "hessian"
    HVP = "hvp"
    JVP = "jvp"
    VJP = "vjp"
    TAYLOR2 = "taylor2"
    TAYLOR = "taylor"
    DIAGONAL = "diagonal"
    SOLVE = "solve"
    GRADIENT_STATISTICS = "gradient_statistics"

    @property
    def needs_scalar(self) -> bool:
        """Whether f must have a scalar output (or, with a loss, the objective does)."""
        return self in (Kind.GRADIENT, Kind.HVP, Kind.TAYLOR2) or self.is_curvature

    @property
    def is_curvature(self) -> bool:
        """The kinds of an operator over the flat variable: always computed by the curvature
        module, with or without an objective."""
        return self in (Kind.DIAGONAL, Kind.SOLVE, Kind.GRADIENT_STATISTICS)

    @property
    def takes_vector(self) -> bool:
        """Whether a request sends one vector per point (`vector`)."""
        return self in (Kind.HVP, Kind.JVP, Kind.VJP, Kind.TAYLOR, Kind.SOLVE)

    @property
    def vector_is_output_shaped(self) -> bool:
        """vjp's cotangent is shaped like f's output; the others' vectors like the variable."""
        return self is Kind.VJP

    @property
    def vector_name(self) -> str:
        """What the vector is called in messages ("the hvp v")."""
        names = {
            Kind.HVP: "v",
            Kind.JVP: "tangent t",
            Kind.VJP: "cotangent u",
            Kind.SOLVE: "right-hand side b",
        }
        return f"the {self.value} " + names.get(self, "direction d")

    @property
    def has_layout(self) -> bool:
        return self in (Kind.GRADIENT, Kind.JACOBIAN, Kind.HESSIAN)

    @property
    def splits(self) -> bool:
        """Whether results with several wrt inputs (not flattened) come per input."""
        return self in (Kind.VALUE, Kind.GRADIENT, Kind.JACOBIAN, Kind.HESSIAN, Kind.VJP)

    @property
    def forward_only(self) -> bool:
        """Kinds that need forward-mode differentiation, whatever the Jacobian mode."""
        return self in (Kind.JVP, Kind.TAYLOR)


class JacobianMode(_WireEnum):
    AUTO = "auto"
    FORWARD = "forward"
    REVERSE = "reverse"


class Layout(_WireEnum):
    NUMERATOR = "numerator"
    DENOMINATOR = "denominator"


class Method(_WireEnum):
    """How a spectrum request looks at the Hessian (the wire's SpectrumMethod)."""

    EXACT = "exact"
    LANCZOS = "lanczos"
    TRACE = "trace"
    DENSITY = "density"


class TraceEstimator(_WireEnum):
    HUTCHPP = "hutch++"
    HUTCHINSON = "hutchinson"


class Operator(_WireEnum):
    """The curvature matrix of an objective (the wire's CurvatureOperator)."""

    HESSIAN_OPERATOR = "hessian"
    GGN = "ggn"
    FISHER = "fisher"
    EMPIRICAL_FISHER = "empirical_fisher"

    @property
    def needs_loss(self) -> bool:
        """GGN and Fisher need the model and its loss given apart."""
        return self in (Operator.GGN, Operator.FISHER)


class Reduction(_WireEnum):
    MEAN = "mean"
    SUM = "sum"


class BuiltinLoss(_WireEnum):
    MSE = "mse"
    SOFTMAX_CROSS_ENTROPY = "softmax_cross_entropy"


class DiagonalEstimator(_WireEnum):
    EXACT_DIAGONAL = "exact"
    HUTCHINSON_DIAGONAL = "hutchinson"
    DIAG_PP = "diag++"


class PointClass(_WireEnum):
    """What a point is, from the signs of the Hessian's extreme eigenvalues."""

    MINIMUM = "minimum"
    MAXIMUM = "maximum"
    SADDLE = "saddle"
    DEGENERATE = "degenerate"
    UNDEFINED = "undefined"


_WIRE_TYPES: dict[type[_WireEnum], Any] = {
    Kind: hessd_pb2.Kind,
    JacobianMode: hessd_pb2.JacobianMode,
    Layout: hessd_pb2.Layout,
    Method: hessd_pb2.SpectrumMethod,
    TraceEstimator: hessd_pb2.TraceEstimator,
    PointClass: hessd_pb2.PointClass,
    Operator: hessd_pb2.CurvatureOperator,
    Reduction: hessd_pb2.Reduction,
    BuiltinLoss: hessd_pb2.BuiltinLoss,
    DiagonalEstimator: hessd_pb2.DiagonalEstimator,
}
_DEFAULTS: dict[type[_WireEnum], _WireEnum] = {
    Operator: Operator.HESSIAN_OPERATOR,
    Reduction: Reduction.MEAN,
    JacobianMode: JacobianMode.AUTO,
    Layout: Layout.NUMERATOR,
    Method: Method.EXACT,
    TraceEstimator: TraceEstimator.HUTCHPP,
}


def variable_shape(input_shapes: Mapping[str, Shape], flat: bool) -> Shape:
    """The variable's shape at one point: the one input's, or (p,) over several raveled."""
    if flat or len(input_shapes) > 1:
        return (sum(math.prod(s) for s in input_shapes.values()),)
    (shape,) = input_shapes.values()
    return tuple(shape)


def result_shapes(
    kind: Kind,
    variable: Shape | Mapping[str, Shape],
    output_shape: Shape,
    *,
    layout: Layout = Layout.NUMERATOR,
    packed: bool = False,
    order: int = 0,
) -> dict[str, Shape]:
    """Each result's shape at one point, by name; one-result kinds name it "output".

    `variable` is the variable's shape, or, for several wrt inputs not flattened, each
    input's shape by name: results of the kinds that split then come per input or block.
    """
    out = tuple(output_shape)
    denominator = layout is Layout.DENOMINATOR
    if isinstance(variable, Mapping):
        xs = {name: tuple(shape) for name, shape in variable.items()}
        match kind:
            case Kind.GRADIENT | Kind.VJP:
                return xs
            case Kind.JACOBIAN:
                return {n: x + out if denominator else out + x for n, x in xs.items()}
            case Kind.HESSIAN:
                return {
                    f"{a},{b}": xa + xb + out if denominator else out + xa + xb
                    for a, xa in xs.items()
                    for b, xb in xs.items()
                }
        x = variable_shape(xs, flat=True)
    else:
        x = tuple(variable)
    match kind:
        case Kind.VALUE | Kind.JVP:
            shape = out
        case Kind.GRADIENT | Kind.HVP | Kind.VJP:
            shape = x
        case Kind.JACOBIAN:
            shape = x + out if denominator else out + x
        case Kind.HESSIAN if packed:
            n = math.prod(x)
            shape = (n * (n + 1) // 2,)
        case Kind.HESSIAN:
            shape = x + x + out if denominator else out + x + x
        case Kind.TAYLOR:
            shape = (order, *out)
        case Kind.TAYLOR2:
            return {"value": (), "gradient": x, "hessian": x + x}
        case Kind.DIAGONAL | Kind.SOLVE | Kind.GRADIENT_STATISTICS:
            return curvature_shapes(kind, math.prod(x))
    return {"output": shape}


def curvature_shapes(kind: Kind, p: int, examples: int = 0) -> dict[str, Shape]:
    """Each result of a curvature kind at one point, for a flat variable of p elements and
    a data set of `examples` examples."""
    match kind:
        case Kind.DIAGONAL:
            return {"diagonal": (p,), "std_error": (p,)}
        case Kind.SOLVE:
            return {"solution": (p,), "iterations": (), "residual": (), "converged": ()}
        case Kind.GRADIENT_STATISTICS:
            shapes: dict[str, Shape] = {"gradient": (p,), "norms": (examples,), "variance": (p,)}
            return shapes | {"sum_of_squares": (p,)}
    raise ValueError(f"{kind.value} is not a curvature kind")


def spectrum_shapes(
    method: Method,
    n: int,
    *,
    k: int = 0,
    eigenvectors: bool = False,
    num_steps: int = 0,
    num_probes: int = 0,
    grid_size: int = 0,
) -> dict[str, Shape]:
    """Each field of a spectrum result at one point, for a variable of n elements."""
    shapes: dict[str, Shape] = {"gradient_norm": ()}
    match method:
        case Method.EXACT | Method.LANCZOS:
            m = n if method is Method.EXACT else 2 * k
            shapes |= {"eigenvalues": (m,), "point_class": (), "stationary": ()}
            shapes |= {"tol": (), "gtol": ()}
            if eigenvectors:
                shapes["eigenvectors"] = (n, m)
            if method is Method.LANCZOS:
                shapes["residuals"] = (m,)
        case Method.TRACE:
            shapes |= {"trace": (), "trace_std_error": ()}
        case Method.DENSITY:
            quadrature = (num_probes, num_steps)
            shapes |= {"nodes": quadrature, "weights": quadrature}
            shapes |= {"grid": (grid_size,), "density": (grid_size,)}
            shapes |= {"point_class": (), "stationary": (), "tol": (), "gtol": ()}
    return shapes


def pack_triangles(full: np.ndarray) -> np.ndarray:
    """The upper triangles of (batch, *x, *x) Hessians, row-major: (batch, n(n+1)/2), the
    layout of packed=True (row i holds columns i..n-1)."""
    b = full.shape[0]
    n = math.isqrt(math.prod(full.shape[1:]))
    square = full.reshape(b, n, n)
    packed = np.empty((b, n * (n + 1) // 2), full.dtype)
    start = 0
    for i in range(n):
        packed[:, start : start + n - i] = square[:, i, i:]
        start += n - i
    return packed


def unpack_triangles(packed: np.ndarray, n: int) -> np.ndarray:
    """(batch, n(n+1)/2) upper triangles, row-major, into (batch, n, n) symmetric.

    A block of rows at a time: one gather per block through that block's index, so memory
    is the result plus a block of about _BLOCK_BYTES. (One n² int64 index built with
    temporaries of its size took 15 s and 3.2 GB at n=8000; row-by-row copies were 20x
    slower than a gather at batch 512, n=256.)
    """
    b = packed.shape[0]
    out = np.empty((b, n, n), packed.dtype)
    r = np.arange(n)
    # Row r of the triangle starts at r*n - r(r-1)/2 and holds columns r..n-1.
    starts = r * n - r * (r - 1) // 2
    rows = max(1, _BLOCK_BYTES // max(1, b * n * packed.itemsize))
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        i, j = r[lo:hi, None], r[None, :]
        top, right = np.minimum(i, j), np.maximum(i, j)
        index = (starts[top] + right - top).reshape(-1)
        out[:, lo:hi] = np.take(packed, index, axis=1).reshape(b, hi - lo, n)
    return out


# What one block of rows may hold while it is gathered.
_BLOCK_BYTES = 16 << 20
