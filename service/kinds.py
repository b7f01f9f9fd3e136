"""Derivative kinds: the JAX transform of a Program's one-point function for each kind.

For f with input x of shape `in` (the `wrt` input) and output of shape `out`:

    kind       needs               output per point, numerator layout
    value      -                   out
    gradient   out == ()           in
    jacobian   -                   out + in        (denominator: in + out)
    hessian    -                   out + in + in   (denominator: in + in + out)
    hvp        out == (), v: in    in
    jvp        t: in               out
    vjp        u: out              in

Every transform here maps one point to one result; the engine vmaps and jits it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from hessd.service.errors import InvalidArgument
from hessd.service.program import Program

__all__ = [
    "JacobianMode",
    "Kind",
    "Layout",
    "Request",
    "make_request",
    "make_transform",
    "output_shape",
    "vector_shape",
]


class Kind(enum.Enum):
    VALUE = "value"
    GRADIENT = "gradient"
    JACOBIAN = "jacobian"
    HESSIAN = "hessian"
    HVP = "hvp"
    JVP = "jvp"
    VJP = "vjp"


class JacobianMode(enum.Enum):
    AUTO = "auto"
    FORWARD = "forward"
    REVERSE = "reverse"


class Layout(enum.Enum):
    NUMERATOR = "numerator"
    DENOMINATOR = "denominator"


_NEEDS_SCALAR = (Kind.GRADIENT, Kind.HVP)
_TAKES_VECTOR = (Kind.HVP, Kind.JVP, Kind.VJP)
_HAS_LAYOUT = (Kind.GRADIENT, Kind.JACOBIAN, Kind.HESSIAN)


@dataclasses.dataclass(frozen=True)
class Request:
    """What to compute of a Program; hashable, part of the engine's cache key.

    `mode` is resolved (never AUTO) so that auto and its choice share one executable.
    """

    kind: Kind
    wrt: int = 0
    mode: JacobianMode = JacobianMode.REVERSE
    layout: Layout = Layout.NUMERATOR

    @property
    def takes_vector(self) -> bool:
        return self.kind in _TAKES_VECTOR


def make_request(
    program: Program,
    kind: Kind,
    wrt: str = "",
    mode: JacobianMode = JacobianMode.AUTO,
    layout: Layout = Layout.NUMERATOR,
) -> Request:
    """Check that `program` can have `kind` with these options; resolve the auto mode.

    Raises InvalidArgument in the manner of jax.grad's checks: what the function is, what
    the kind needs, and which kind to use instead.
    """
    index = program.input_index(wrt)
    out = program.output_shape
    if kind in _NEEDS_SCALAR and out != ():
        alternative = "jacobian" if kind is Kind.GRADIENT else "jvp of the gradient or jacobian"
        raise InvalidArgument(
            f"{kind.value} is only defined for scalar-output functions; this function's "
            f"output has shape {out}. Use {alternative}, or reduce the output to a scalar "
            "(e.g. sum(...))"
        )
    if mode is not JacobianMode.AUTO and kind is not Kind.JACOBIAN:
        raise InvalidArgument(f"jacobian_mode applies only to kind jacobian, not {kind.value}")
    if layout is Layout.DENOMINATOR and kind not in _HAS_LAYOUT:
        raise InvalidArgument(
            f"layout applies only to gradient, jacobian and hessian, not {kind.value}"
        )
    if mode is JacobianMode.AUTO:
        # jacfwd costs one pass per input element, jacrev one per output element.
        n_in = math.prod(program.inputs[index].shape)
        mode = JacobianMode.FORWARD if n_in < math.prod(out) else JacobianMode.REVERSE
    return Request(kind=kind, wrt=index, mode=mode, layout=layout)


def vector_shape(program: Program, request: Request) -> tuple[int, ...]:
    """Shape of the per-point vector an hvp/jvp (in) or vjp (out) takes."""
    if request.kind is Kind.VJP:
        return program.output_shape
    return program.inputs[request.wrt].shape


def output_shape(program: Program, request: Request) -> tuple[int, ...]:
    """Shape of the result at one point."""
    x = program.inputs[request.wrt].shape
    out = program.output_shape
    match request.kind:
        case Kind.VALUE | Kind.JVP:
            return out
        case Kind.GRADIENT | Kind.HVP | Kind.VJP:
            return x
        case Kind.JACOBIAN:
            return x + out if request.layout is Layout.DENOMINATOR else out + x
        case Kind.HESSIAN:
            return x + x + out if request.layout is Layout.DENOMINATOR else out + x + x


def make_transform(program: Program, request: Request) -> Callable[..., jax.Array]:
    """The one-point function `g(*inputs[, vector]) -> result` for `request`."""
    i = request.wrt
    f = program.fn

    def of_wrt(transform: Callable) -> Callable:
        # Apply a single-argument transform to f as a function of input i alone.
        def g(*args):
            def f_i(x):
                return f(*args[:i], x, *args[i + 1 :])

            return transform(f_i, args[i])

        return g

    n_out = len(program.output_shape)
    n_in = len(program.inputs[i].shape)
    match request.kind:
        case Kind.VALUE:
            return f
        case Kind.GRADIENT:
            return of_wrt(lambda f_i, x: jax.grad(f_i)(x))
        case Kind.JACOBIAN:
            jac = jax.jacfwd if request.mode is JacobianMode.FORWARD else jax.jacrev
            g = of_wrt(lambda f_i, x: jac(f_i)(x))
            return _to_layout(g, request.layout, n_out, n_in, n_in_blocks=1)
        case Kind.HESSIAN:
            g = of_wrt(lambda f_i, x: jax.hessian(f_i)(x))
            return _to_layout(g, request.layout, n_out, n_in, n_in_blocks=2)
        case Kind.HVP:
            # Forward-over-reverse: one JVP of the gradient, H never materialised.
            return _with_vector(i, f, lambda f_i, x, v: jax.jvp(jax.grad(f_i), (x,), (v,))[1])
        case Kind.JVP:
            return _with_vector(i, f, lambda f_i, x, t: jax.jvp(f_i, (x,), (t,))[1])
        case Kind.VJP:
            return _with_vector(i, f, lambda f_i, x, u: jax.vjp(f_i, x)[1](u)[0])


def _with_vector(i: int, f: Callable, transform: Callable) -> Callable:
    def g(*args):
        *inputs, vector = args

        def f_i(x):
            return f(*inputs[:i], x, *inputs[i + 1 :])

        return transform(f_i, inputs[i], vector)

    return g


def _to_layout(g: Callable, layout: Layout, n_out: int, n_in: int, n_in_blocks: int) -> Callable:
    """Move the output axes of g's numerator-layout result behind its input axes."""
    if layout is Layout.NUMERATOR or n_out == 0:
        return g
    perm = tuple(range(n_out, n_out + n_in * n_in_blocks)) + tuple(range(n_out))

    def transposed(*args):
        return jnp.transpose(g(*args), perm)

    return transposed
