"""Function specs → Programs: validated, content-addressed, traced once for their shape."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2
from hessd.service.errors import InvalidArgument
from hessd.service.expression import ExpressionLimits, compile_expression

__all__ = ["InputSignature", "Program", "Wrt", "build_program", "check_inputs", "function_id"]

# The dtypes an input may be declared with: the ones JAX differentiates.
_INPUT_DTYPES = (np.dtype("float32"), np.dtype("float64"))


@dataclasses.dataclass(frozen=True)
class InputSignature:
    """One input of a function: the shape of one point (no batch axis) and its dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """A registered function, ready for the derivative kinds.

    An expression program has `fn(*inputs)`, f at one point: input i has shape
    `inputs[i].shape`, the result `output_shape` and `output_dtype`; every JAX transform
    applies. A JAX-export program has only `batched_fn(*inputs)`, f at a batch of points
    (each input with a leading batch axis, shared ones broadcast), which supports reverse
    mode alone and does not vmap.
    """

    function_id: str
    inputs: tuple[InputSignature, ...]
    output_shape: tuple[int, ...]
    output_dtype: np.dtype
    fn: Callable[..., jax.Array] | None = None
    batched_fn: Callable[..., jax.Array] | None = None

    def indices(self, names: Sequence[str], what: str) -> tuple[int, ...]:
        """Positions of the inputs called `names`; InvalidArgument for unknown or repeated."""
        indices = []
        for name in names:
            matches = [i for i, s in enumerate(self.inputs) if s.name == name]
            if not matches:
                raise InvalidArgument(
                    f"{what}={name!r} is not an input of this function; its inputs are "
                    + ", ".join(repr(s.name) for s in self.inputs)
                )
            if matches[0] in indices:
                raise InvalidArgument(f"{what} names {name!r} twice")
            indices.append(matches[0])
        return tuple(indices)

    def wrt(self, names: Sequence[str] = (), flatten: bool = False) -> Wrt:
        """The inputs called `names` (the first input if none) as a Wrt."""
        return Wrt(self.indices(names or [self.inputs[0].name], "wrt"), flatten)


@dataclasses.dataclass(frozen=True)
class Wrt:
    """The inputs derivatives are taken with respect to.

    One input, not flattened: the variable is that input, shape as declared. Several inputs,
    or `flatten`: the variable is the concatenation of the raveled inputs, shape (p,), and
    results for several inputs without `flatten` are split back into per-input blocks.
    """

    indices: tuple[int, ...]
    flatten: bool = False

    @property
    def flat(self) -> bool:
        return self.flatten or len(self.indices) > 1

    @property
    def split(self) -> bool:
        """Whether results come back per input (several inputs, not flattened)."""
        return len(self.indices) > 1 and not self.flatten

    def shape(self, program: Program) -> tuple[int, ...]:
        """Shape of the variable at one point."""
        shapes = [program.inputs[i].shape for i in self.indices]
        return (sum(math.prod(s) for s in shapes),) if self.flat else shapes[0]

    def view(self, program: Program, f: Callable, inputs: Sequence) -> tuple[Callable, jax.Array]:
        """(f_x, x): f as a function of the variable alone, the other inputs fixed, and the
        variable's value at `inputs`. Works per point and on batches alike: axes of the
        inputs in front of their declared shapes are kept in front of the variable's."""
        if not self.flat:
            (i,) = self.indices
            return _replacing(f, inputs, {i: lambda x: x}), inputs[i]
        first = self.indices[0]
        leading = inputs[first].shape[: inputs[first].ndim - len(program.inputs[first].shape)]
        parts = [inputs[i].reshape(*leading, -1) for i in self.indices]
        offsets = np.cumsum([0] + [math.prod(program.inputs[i].shape) for i in self.indices])
        unflatten = {
            i: functools.partial(_unflatten, start=a, stop=b, shape=program.inputs[i].shape)
            for i, a, b in zip(self.indices, offsets[:-1], offsets[1:], strict=True)
        }
        return _replacing(f, inputs, unflatten), jnp.concatenate(parts, axis=-1)

    def blocks(self, program: Program, result: jax.Array, axes: Sequence[int]) -> dict:
        """Split a result whose `axes` run over the flat variable into per-input blocks:
        one axis gives {name: block}, two give {"a,b": block} for every pair."""
        names = [program.inputs[i].name for i in self.indices]
        shapes = [program.inputs[i].shape for i in self.indices]
        offsets = np.cumsum([0] + [math.prod(s) for s in shapes])
        pieces = list(zip(names, shapes, offsets[:-1], offsets[1:], strict=True))
        out = {}
        for combo in itertools.product(pieces, repeat=len(axes)):
            block = result
            # Later axes first, so that earlier axis numbers stay valid as shapes grow.
            for axis, (_, shape, a, b) in sorted(zip(axes, combo, strict=True), reverse=True):
                block = lax.slice_in_dim(block, int(a), int(b), axis=axis)
                block = block.reshape(*block.shape[:axis], *shape, *block.shape[axis + 1 :])
            out[",".join(name for name, *_ in combo)] = block
        return out


def _unflatten(z, start: int, stop: int, shape: tuple[int, ...]):
    return z[..., start:stop].reshape(*z.shape[:-1], *shape)


def _replacing(f: Callable, inputs: Sequence, replace: dict[int, Callable]) -> Callable:
    """x -> f(*inputs) with input i replaced by replace[i](x)."""

    def f_x(x):
        return f(*(replace[i](x) if i in replace else v for i, v in enumerate(inputs)))

    return f_x


def function_id(spec: hessd_pb2.FunctionSpec) -> str:
    """sha256 (hex) of the spec's canonical form: constants sorted by name, unknown fields
    dropped, deterministic serialisation. Equal specs get equal ids on every replica."""
    canonical = hessd_pb2.FunctionSpec()
    canonical.CopyFrom(spec)
    canonical.DiscardUnknownFields()
    ordered = sorted(canonical.constants, key=lambda c: c.name)
    del canonical.constants[:]
    canonical.constants.extend(ordered)
    return hashlib.sha256(canonical.SerializeToString(deterministic=True)).hexdigest()


def build_program(
    spec: hessd_pb2.FunctionSpec, limits: ExpressionLimits = ExpressionLimits()
) -> Program:
    """Validate an expression `spec`, compile it and trace it once for the output shape.

    Raises InvalidArgument saying what in the spec is wrong.
    """
    if spec.WhichOneof("body") != "expression":
        raise InvalidArgument("the spec has no body: set expression.source")
    inputs = check_inputs(spec.inputs)
    constants = _check_constants(spec.constants, {s.name for s in inputs})
    fn = compile_expression(spec.expression.source, [s.name for s in inputs], constants, limits)
    avals = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in inputs]
    out = _trace(fn, avals)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise InvalidArgument("the expression must produce one array")
    if not np.issubdtype(out.dtype, np.floating):
        raise InvalidArgument(
            f"the expression's output has dtype {out.dtype}; derivatives need a floating-point "
            "output (are all inputs and constants integers?)"
        )
    return Program(
        function_id=function_id(spec),
        inputs=inputs,
        output_shape=tuple(out.shape),
        output_dtype=np.dtype(out.dtype),
        fn=fn,
    )


# Bounds on what one point may hold, so that no spec can ask XLA for an array it cannot
# even describe (an extent past int64 aborts the process) or JAX for more than 64 axes.
MAX_INPUT_AXES = 16
MAX_POINT_ELEMENTS = 1 << 31


def _trace(fn, avals) -> jax.ShapeDtypeStruct:
    """The output of fn at avals, with every intermediate of one point checked against
    MAX_POINT_ELEMENTS; InvalidArgument for anything that cannot be traced."""
    with warnings.catch_warnings():
        # Constant folding may overflow (3.5e38 + x in float32 is inf): that is the value,
        # not a reason to warn at every compile.
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            jaxpr = jax.make_jaxpr(fn)(*avals)
        except (OverflowError, ValueError, TypeError, IndexError) as e:
            raise InvalidArgument(f"the expression cannot be evaluated: {e}") from None
    for eqn in jaxpr.jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            if math.prod(shape) > MAX_POINT_ELEMENTS:
                raise InvalidArgument(
                    f"the expression builds an array of shape {tuple(shape)} at one point "
                    f"({eqn.primitive.name}), over the limit of {MAX_POINT_ELEMENTS} elements"
                )
    (out,) = jaxpr.out_avals
    return jax.ShapeDtypeStruct(out.shape, out.dtype)


def check_inputs(specs) -> tuple[InputSignature, ...]:
    if not specs:
        raise InvalidArgument("the spec declares no inputs; add at least one (name, shape)")
    inputs = []
    seen = set()
    for spec in specs:
        _check_name(spec.name, "input")
        if spec.name in seen:
            raise InvalidArgument(f"input {spec.name!r} is declared twice")
        seen.add(spec.name)
        shape = tuple(spec.shape)
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"input {spec.name!r} has a negative dimension: {shape}")
        if len(shape) > MAX_INPUT_AXES or math.prod(shape) > MAX_POINT_ELEMENTS:
            raise InvalidArgument(
                f"input {spec.name!r} has shape {shape}; one point may have at most "
                f"{MAX_INPUT_AXES} axes and {MAX_POINT_ELEMENTS} elements"
            )
        try:
            dtype = codec.dtype_from_proto(spec.dtype)
        except codec.TensorError as e:
            raise InvalidArgument(f"input {spec.name!r}: {e}") from None
        if dtype not in _INPUT_DTYPES:
            raise InvalidArgument(
                f"input {spec.name!r} has dtype {dtype.name}; inputs must be float32 or float64"
            )
        inputs.append(InputSignature(spec.name, shape, dtype))
    return tuple(inputs)


def _check_constants(specs, input_names: set[str]) -> dict[str, np.ndarray]:
    constants = {}
    for named in specs:
        _check_name(named.name, "constant")
        if named.name in input_names:
            raise InvalidArgument(f"{named.name!r} is both an input and a constant")
        if named.name in constants:
            raise InvalidArgument(f"constant {named.name!r} is given twice")
        try:
            constants[named.name] = codec.decode(named.tensor, f"constant {named.name!r}")
        except codec.TensorError as e:
            raise InvalidArgument(str(e)) from None
    return constants


def _check_name(name: str, what: str) -> None:
    if not name.isidentifier() or name.startswith("_"):
        raise InvalidArgument(
            f"{what} name {name!r} is not allowed: use a Python identifier that does not "
            "start with an underscore"
        )
