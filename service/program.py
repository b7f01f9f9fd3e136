"""Function specs → Programs: validated, content-addressed, traced once for their shape."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable

import jax
import numpy as np

from hessd.proto import codec
from hessd.proto.v1 import hessd_pb2
from hessd.service.errors import InvalidArgument
from hessd.service.expression import ExpressionLimits, compile_expression

__all__ = ["InputSignature", "Program", "build_program", "function_id"]

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

    `fn(*inputs)` evaluates f at one point: input i has shape `inputs[i].shape`, the result
    has shape `output_shape` and dtype `output_dtype`.
    """

    function_id: str
    inputs: tuple[InputSignature, ...]
    output_shape: tuple[int, ...]
    output_dtype: np.dtype
    fn: Callable[..., jax.Array]

    def input_index(self, name: str) -> int:
        """Position of the input called `name` (the first input if `name` is empty)."""
        if not name:
            return 0
        for i, signature in enumerate(self.inputs):
            if signature.name == name:
                return i
        raise InvalidArgument(
            f"wrt={name!r} is not an input of this function; its inputs are "
            + ", ".join(repr(s.name) for s in self.inputs)
        )


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
    """Validate `spec`, compile its expression and trace it once for the output shape.

    Raises InvalidArgument saying what in the spec is wrong.
    """
    if spec.WhichOneof("body") != "expression":
        raise InvalidArgument("the spec has no body: set expression.source")
    inputs = _check_inputs(spec.inputs)
    constants = _check_constants(spec.constants, {s.name for s in inputs})
    fn = compile_expression(spec.expression.source, [s.name for s in inputs], constants, limits)
    avals = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in inputs]
    out = jax.eval_shape(fn, *avals)
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


def _check_inputs(specs) -> tuple[InputSignature, ...]:
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
