"""Programs: the one interface both kinds of function spec implement, the expression
implementation, and the checks every spec shares (inputs, content-addressed ids)."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import math
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import jax
import numpy as np

from hessd.proto import codec
from hessd.proto.kinds import JacobianMode, Kind
from hessd.proto.v1 import hessd_pb2
from hessd.service import kinds, primitives
from hessd.service.errors import InvalidArgument
from hessd.service.expression import ExpressionLimits, compile_expression
from hessd.service.primitives import Primitives
from hessd.service.variable import Wrt

__all__ = [
    "ExpressionProgram",
    "InputSignature",
    "Program",
    "build_program",
    "check_inputs",
    "function_id",
]

# The dtypes an input may be declared with: the ones JAX differentiates.
_INPUT_DTYPES = (np.dtype("float32"), np.dtype("float64"))


@dataclasses.dataclass(frozen=True)
class InputSignature:
    """One input of a function: the shape of one point (no batch axis) and its dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass(frozen=True, eq=False)
class Program(abc.ABC):
    """A registered function, ready for the derivative kinds and the spectral methods.

    Input i has shape `inputs[i].shape` at one point, and f's value there has shape
    `output_shape` and dtype `output_dtype`. Each implementation says which kinds it can
    compute and builds their JAX transforms: ExpressionProgram (here) has f at one point
    and every JAX transform; ExportProgram (exported.py) has f only at a batch of points,
    in reverse mode.
    """

    function_id: str
    inputs: tuple[InputSignature, ...]
    output_shape: tuple[int, ...]
    output_dtype: np.dtype
    # The serialised spec, so that a supervised compile (compile_guard.py) can rebuild it.
    spec: bytes = dataclasses.field(default=b"", kw_only=True, repr=False)
    # Whether its computation is a module the client serialised (jax.export): one that
    # fails to lower or compile is the client's error, not hessd's.
    from_client_module: ClassVar[bool] = False

    def indices(self, names: Sequence[str], what: str) -> tuple[int, ...]:
        """Positions of the inputs called `names`; InvalidArgument for unknown or repeated."""
        indices: list[int] = []
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

    @abc.abstractmethod
    def jacobian_mode(self, kind: Kind, mode: JacobianMode, n_in: int, n_out: int) -> JacobianMode:
        """The mode `kind` runs in here, resolved (never AUTO), for a variable of n_in and an
        output of n_out elements; InvalidArgument if this program cannot compute `kind`."""

    @abc.abstractmethod
    def kind_transform(self, request: kinds.Request) -> Callable[..., Any]:
        """g(*inputs[, vector]) at a batch of points: batched inputs and the vector have a
        leading batch axis, shared inputs none. Returns an array or a dict of arrays, in
        the request's layout and per-input split."""

    @abc.abstractmethod
    def primitives(self, wrt: Wrt) -> Primitives:
        """value, vjp, jvp and hvp at one point over the flat variable of `wrt`, vmappable
        at any depth: what curvature operators and the spectral methods are built from."""


@dataclasses.dataclass(frozen=True, eq=False)
class ExpressionProgram(Program):
    """A program from an expression: `fn(*inputs)` is f at one point, and every JAX
    transform applies to it, so kinds are built per point and vmapped over the batch."""

    fn: Callable[..., jax.Array] = dataclasses.field(kw_only=True)

    def jacobian_mode(self, kind: Kind, mode: JacobianMode, n_in: int, n_out: int) -> JacobianMode:
        if mode is JacobianMode.AUTO:
            # jacfwd costs one pass per input element, jacrev one per output element.
            return JacobianMode.FORWARD if n_in < n_out else JacobianMode.REVERSE
        return mode

    def kind_transform(self, request: kinds.Request) -> Callable[..., Any]:
        per_point = kinds.per_point_transform(request, self, self.fn)
        return jax.vmap(
            per_point, in_axes=(*self._in_axes(request.shared), *[0] * request.takes_vector)
        )

    def primitives(self, wrt: Wrt) -> Primitives:
        return primitives.from_point(self, wrt, self.fn)

    def _in_axes(self, shared: tuple[int, ...]) -> list[int | None]:
        return [None if i in shared else 0 for i in range(len(self.inputs))]


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
) -> ExpressionProgram:
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
    return ExpressionProgram(
        function_id=function_id(spec),
        inputs=inputs,
        output_shape=tuple(out.shape),
        output_dtype=np.dtype(out.dtype),
        fn=fn,
        spec=spec.SerializeToString(),
    )


# Bounds on what one point may hold, so that no spec can ask XLA for an array it cannot
# even describe (an extent past int64 aborts the process) or JAX for more than 64 axes.
MAX_INPUT_AXES = 16
MAX_POINT_ELEMENTS = 1 << 31


def _trace(
    fn: Callable[..., jax.Array], avals: Sequence[jax.ShapeDtypeStruct]
) -> jax.ShapeDtypeStruct:
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


def check_inputs(specs: Sequence[hessd_pb2.InputSpec]) -> tuple[InputSignature, ...]:
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


def _check_constants(
    specs: Iterable[hessd_pb2.NamedTensor], input_names: set[str]
) -> dict[str, np.ndarray]:
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
    if unicodedata.normalize("NFKC", name) != name:
        # Python (and so the expression parser) reads identifiers in NFKC form: fullwidth x is x,
        # so a name declared otherwise could never be referenced.
        raise InvalidArgument(
            f"{what} name {name[:60]!r} is not in Unicode NFKC form, which expressions read "
            f"names in; declare it as {unicodedata.normalize('NFKC', name)[:60]!r}"
        )
    if not name.isidentifier() or name.startswith("_"):
        raise InvalidArgument(
            f"{what} name {name!r} is not allowed: use a Python identifier that does not "
            "start with an underscore"
        )
