"""Derivative kinds on the server: requests checked against a Program, and the per-point
JAX transform of each kind. The contract itself (which kinds take a vector, the result
shapes under each layout, the wire's enums) is hessd.proto.kinds, shared with the client.

Expression programs are transformed at one point and vmapped (shared inputs with in_axes
None); JAX-export programs only run batched and in reverse mode (exported.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from hessd.proto.kinds import (
    MAX_TAYLOR_ORDER,
    JacobianMode,
    Kind,
    Layout,
    pack_triangles,
    result_shapes,
)
from hessd.service.engine import EngineRequest, Output
from hessd.service.errors import InvalidArgument
from hessd.service.variable import FunctionOfVariable, Wrt

if TYPE_CHECKING:
    from hessd.service.program import Program

__all__ = [
    "MAX_TAYLOR_ORDER",
    "JacobianMode",
    "Kind",
    "Layout",
    "Request",
    "in_layout",
    "make_request",
    "per_point_transform",
    "shared_indices",
]

_OUTPUT_DTYPES = tuple(np.dtype(d) for d in ("float16", ml_dtypes.bfloat16, "float32", "float64"))


@dataclasses.dataclass(frozen=True)
class Request(EngineRequest):
    """What to compute of a Program; hashable, part of the engine's cache key.

    `mode` is resolved (never AUTO) so that auto and its choice share one executable.
    `shared` holds the indices of inputs sent once for all points.
    """

    kind: Kind
    wrt: Wrt = Wrt((0,))
    mode: JacobianMode = JacobianMode.REVERSE
    layout: Layout = Layout.NUMERATOR
    order: int = 0
    shared: tuple[int, ...] = ()
    output_dtype: np.dtype | None = None
    packed: bool = False

    @property
    def label(self) -> str:
        return self.kind.value

    @property
    def takes_vector(self) -> bool:
        return self.kind.takes_vector

    def vector_shape(self, program: Program) -> tuple[int, ...]:
        """Shape of the per-point vector an hvp/jvp/taylor (in) or vjp (out) takes."""
        if self.kind.vector_is_output_shaped:
            return program.output_shape
        return self.wrt.shape(program)

    def vector_dtype(self, program: Program) -> np.dtype:
        """The dtype of the per-point vector: the output's for vjp, else the variable's."""
        if self.kind.vector_is_output_shaped:
            return program.output_dtype
        return np.result_type(*(program.inputs[i].dtype for i in self.wrt.indices))

    def vector_signature(self, program: Program) -> list[tuple[tuple[int, ...], np.dtype]]:
        if not self.takes_vector:
            return []
        return [(self.vector_shape(program), self.vector_dtype(program))]

    def result_dtype(self, program: Program) -> np.dtype:
        return self.output_dtype or program.output_dtype

    def output_shapes(self, program: Program) -> dict[str, tuple[int, ...]]:
        """Shape of each result at one point, by name; one-result kinds name it "output"."""
        variable: tuple[int, ...] | dict[str, tuple[int, ...]] = self.wrt.shape(program)
        if self.wrt.split and self.kind is not Kind.VALUE:
            variable = {program.inputs[i].name: program.inputs[i].shape for i in self.wrt.indices}
        return result_shapes(
            self.kind,
            variable,
            program.output_shape,
            layout=self.layout,
            packed=self.packed,
            order=self.order,
        )

    def transform(self, program: Program) -> Callable[..., Any]:
        """g(*inputs[, vector]) at a batch of points: batched inputs and vector have a
        leading batch axis, shared inputs none. Returns an array or a dict of arrays."""
        g = program.kind_transform(self)
        if not self.packs_on_device and self.output_dtype is None:
            return g

        def on_device(*args: jax.Array) -> Any:
            # Packing and casting happen before the transfer: that is the point of them.
            return jax.tree.map(self._pack_and_cast, g(*args))

        return on_device

    @property
    def packs_on_device(self) -> bool:
        """Whether the transform packs. On the CPU there is no transfer to save and XLA's
        gather of the triangle is ~5x slower than numpy's row copies (n=256, batch 512:
        50 ms against 10), so the engine packs on the host there instead (on_host)."""
        return self.packed and jax.default_backend() != "cpu"

    def on_host(self, result: Output) -> Output:
        """The upper triangles of (batch, *x, *x) Hessians, row-major: (batch, n(n+1)/2)."""
        if not self.packed or self.packs_on_device:
            return result
        assert isinstance(result, np.ndarray)  # packed: one scalar function, one result
        return pack_triangles(result)

    def _pack_and_cast(self, result: jax.Array) -> jax.Array:
        if self.packs_on_device:
            b = result.shape[0]
            n = math.isqrt(math.prod(result.shape[1:]))
            rows, cols = np.triu_indices(n)
            result = result.reshape(b, n, n)[:, rows, cols]
        if self.output_dtype is not None:
            result = result.astype(self.output_dtype)
        return result

    def finish(self, program: Program, result: Any, lead: int) -> Any:
        """Layout and per-input split of a raw numerator-layout result on the flat or
        single variable; `lead` leading axes (the batch) are left in front."""
        n_out = len(program.output_shape)
        match self.kind:
            case Kind.JACOBIAN:
                result = in_layout(result, self.layout, n_out, lead)
                axes = [lead] if self.layout is Layout.DENOMINATOR else [lead + n_out]
            case Kind.HESSIAN:
                result = in_layout(result, self.layout, n_out, lead)
                first = lead if self.layout is Layout.DENOMINATOR else lead + n_out
                axes = [first, first + 1]
            case Kind.GRADIENT | Kind.VJP:
                axes = [lead]
            case _:
                return result
        return self.wrt.blocks(program, result, axes) if self.wrt.split else result


def shared_indices(program: Program, names: Sequence[str]) -> tuple[int, ...]:
    """Sorted positions of the shared inputs; at least one input must stay per point."""
    shared = tuple(sorted(program.indices(names, "shared")))
    if len(shared) == len(program.inputs):
        raise InvalidArgument(
            "every input is shared, so there are no points: send at least one input "
            "per point, with a leading batch axis"
        )
    return shared


def make_request(
    program: Program,
    kind: Kind,
    wrt: tuple[str, ...] = (),
    mode: JacobianMode = JacobianMode.AUTO,
    layout: Layout = Layout.NUMERATOR,
    order: int = 0,
    flatten: bool = False,
    shared: tuple[str, ...] = (),
    output_dtype: np.dtype | None = None,
    packed: bool = False,
) -> Request:
    """Check that `program` can have `kind` with these options; resolve the auto mode.

    Raises InvalidArgument in the manner of jax.grad's checks: what the function is, what
    the kind needs, and which kind to use instead.
    """
    variable = program.wrt(wrt, flatten)
    out = program.output_shape
    if kind.needs_scalar and out != ():
        alternative = {
            Kind.GRADIENT: "jacobian",
            Kind.HVP: "jvp of the gradient or jacobian",
            Kind.TAYLOR2: "value, jacobian and hessian",
        }[kind]
        raise InvalidArgument(
            f"{kind.value} is only defined for scalar-output functions; this function's "
            f"output has shape {out}. Use {alternative}, or reduce the output to a scalar "
            "(e.g. sum(...))"
        )
    if mode is not JacobianMode.AUTO and kind is not Kind.JACOBIAN:
        raise InvalidArgument(f"jacobian_mode applies only to kind jacobian, not {kind.value}")
    if layout is Layout.DENOMINATOR and not kind.has_layout:
        raise InvalidArgument(
            f"layout applies only to gradient, jacobian and hessian, not {kind.value}"
        )
    if kind is Kind.TAYLOR and not 1 <= order <= MAX_TAYLOR_ORDER:
        raise InvalidArgument(f"taylor needs order between 1 and {MAX_TAYLOR_ORDER}, got {order}")
    if kind is not Kind.TAYLOR and order:
        raise InvalidArgument(f"order applies only to kind taylor, not {kind.value}")
    if variable.split and not kind.splits:
        raise InvalidArgument(
            f"{kind.value} with several wrt inputs takes one vector per point over all of "
            "them: set flatten=True and send vectors over the concatenated raveled inputs"
        )
    if packed and (kind is not Kind.HESSIAN or out != () or variable.split):
        raise InvalidArgument(
            "packed applies to the hessian of a scalar function with respect to one input "
            "(or flatten=True): the upper triangle of a symmetric matrix"
        )
    if output_dtype is not None and output_dtype not in _OUTPUT_DTYPES:
        raise InvalidArgument(
            f"output_dtype {output_dtype.name} is not a floating dtype; use one of "
            + ", ".join(d.name for d in _OUTPUT_DTYPES)
        )
    mode = program.jacobian_mode(kind, mode, math.prod(variable.shape(program)), math.prod(out))
    request = Request(
        kind=kind,
        wrt=variable,
        mode=mode,
        layout=layout,
        order=order,
        shared=shared_indices(program, shared),
        output_dtype=output_dtype,
        packed=packed,
    )
    for name, shape in request.output_shapes(program).items():
        if len(shape) + 1 > 64:
            raise InvalidArgument(
                f"the {kind.value} {name} would have {len(shape) + 1} axes (batch included); "
                "JAX allows 64: flatten=True gives one axis per variable"
            )
    return request


def in_layout(result: jax.Array, layout: Layout, n_out: int, lead: int = 0) -> jax.Array:
    """Move the n_out output axes (after `lead` leading ones) of a numerator-layout result
    behind the rest: denominator layout."""
    if layout is Layout.NUMERATOR or n_out == 0:
        return result
    source = tuple(range(lead, lead + n_out))
    return jnp.moveaxis(result, source, tuple(range(-n_out, 0)))


def per_point_transform(
    request: Request, program: Program, fn: Callable[..., jax.Array]
) -> Callable[..., Any]:
    """g(*inputs[, vector]): the request's kind at one point of f = fn(*inputs)."""
    if request.kind is Kind.VALUE:
        return fn
    compute = _AT_A_POINT[request.kind]

    def g(*args: jax.Array) -> Any:
        inputs = args[: len(program.inputs)]
        f_x, x = request.wrt.view(program, fn, inputs)
        result = compute(request, f_x, x, *args[len(program.inputs) :])
        return request.finish(program, result, lead=0)

    return g


def _jacobian(request: Request, f_x: FunctionOfVariable, x: jax.Array) -> jax.Array:
    jac = jax.jacfwd if request.mode is JacobianMode.FORWARD else jax.jacrev
    return jac(f_x)(x)


def _taylor2(request: Request, f_x: FunctionOfVariable, x: jax.Array) -> dict[str, jax.Array]:
    # jacfwd of value_and_grad: the Hessian's forward passes carry the value and gradient
    # along as aux, so the three come from one traversal instead of three.
    def grad_with_aux(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        value, grad = jax.value_and_grad(f_x)(x)
        return grad, (value, grad)

    hessian, (value, grad) = jax.jacfwd(grad_with_aux, has_aux=True)(x)
    return {"value": value, "gradient": grad, "hessian": hessian}


def _taylor(request: Request, f_x: FunctionOfVariable, x: jax.Array, d: jax.Array) -> jax.Array:
    """d^j/dt^j f(x + t d) at t = 0 for j = 1..order, stacked: (order, *out).

    Nested JVPs of the scalar-parameter path t -> f(x + t d): each level differentiates
    the whole stack [g, g', …, g^(j-1)] of the level below once more, so one trace yields
    every order. jax.experimental.jet would cost O(order²) instead of O(2^order), but it
    lacks rules for primitives this service exposes (custom_linear_solve, reduce_prod) and
    mishandles others (where, relu's custom_jvp), so for orders up to MAX_TAYLOR_ORDER the
    nested form is the one that is right for every expression.
    """

    def level0(t: jax.Array) -> jax.Array:
        return f_x(x + t * d)[None]

    def differentiated(
        stack: Callable[[jax.Array], jax.Array],
    ) -> Callable[[jax.Array], jax.Array]:
        def next_stack(t: jax.Array) -> jax.Array:
            primal, tangent = jax.jvp(stack, (t,), (jnp.ones((), t.dtype),))
            return jnp.concatenate([primal[:1], tangent])

        return next_stack

    stack: Callable[[jax.Array], jax.Array] = level0
    for _ in range(request.order):
        stack = differentiated(stack)
    return stack(jnp.zeros((), x.dtype))[1:]


# compute(request, f_x, x[, vector]) at one point, f_x being f of the variable alone.
_AT_A_POINT: dict[Kind, Callable[..., Any]] = {
    Kind.GRADIENT: lambda request, f_x, x: jax.grad(f_x)(x),
    Kind.JACOBIAN: _jacobian,
    Kind.HESSIAN: lambda request, f_x, x: jax.hessian(f_x)(x),
    # Forward-over-reverse: one JVP of the gradient, H never materialised.
    Kind.HVP: lambda request, f_x, x, v: jax.jvp(jax.grad(f_x), (x,), (v,))[1],
    Kind.JVP: lambda request, f_x, x, t: jax.jvp(f_x, (x,), (t,))[1],
    Kind.VJP: lambda request, f_x, x, u: jax.vjp(f_x, x)[1](u)[0],
    Kind.TAYLOR2: _taylor2,
    Kind.TAYLOR: _taylor,
}
