"""JAX-export programs: checked, rebuilt from their artifact, and differentiated batched.

A client exports jax.vmap(fn) with a symbolic batch dimension and vjp_order >= 2. Measured
facts that shape this module: a deserialized artifact supports reverse mode only and does
not vmap, so every kind here works on the whole batch at once. Points are independent, so
a VJP of the batched function with a cotangent of ones gives every per-point gradient in
one pass; HVPs are reverse-over-reverse; Jacobian and Hessian rows are lax.map over basis
vectors.

Trust: an artifact is compiled and run by the server, and its custom calls reach native
code, so it is accepted only when the operator allows it (--allow-jax-export), and even
then only if the module and its VJP modules call nothing outside a short allowlist, move
nothing to or from the host, and kept every safety check.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# JAX's own MLIR context and bindings: the ones jax.export itself parses artifacts with.
from jax._src.interpreters import mlir as jax_mlir
from jax._src.lib.mlir import ir

from hessd.proto.kinds import JacobianMode, Kind
from hessd.proto.v1 import hessd_pb2
from hessd.service import primitives
from hessd.service.errors import InvalidArgument, PermissionDenied
from hessd.service.primitives import Primitives
from hessd.service.program import InputSignature, Program, check_inputs, function_id
from hessd.service.variable import FunctionOfVariable, Wrt

if TYPE_CHECKING:
    from hessd.service.kinds import Request

__all__ = ["ALLOWED_CUSTOM_CALLS", "ExportProgram", "build_program", "check_module"]

# The LAPACK and cuSOLVER targets jnp.linalg lowers to, and jax.export's shape checks.
ALLOWED_CUSTOM_CALLS = frozenset(
    {"shape_assertion", "cu_lu_pivots_to_permutation"}
    | {
        f"lapack_{t}{op}_ffi"
        for t in "sd"
        for op in ("getrf", "geqrf", "orgqr", "potrf", "syevd", "gesdd", "trsm", "sytrd")
    }
    | {
        f"cusolver_{op}_ffi"
        for op in ("getrf", "geqrf", "orgqr", "potrf", "syevd", "gesvd", "gesvdj", "sytrd")
    }
)
# Ops that move data between the device and the host or other processes.
FORBIDDEN_OPS = frozenset(
    f"{dialect}.{op}"
    for dialect in ("stablehlo", "mhlo")
    for op in ("send", "recv", "infeed", "outfeed")
)
_VJP_ORDER = 2


@dataclasses.dataclass(frozen=True, eq=False)
class ExportProgram(Program):
    """A program from a jax.export artifact: `batched_fn(*inputs)` is f at a batch of points
    (each input with a leading batch axis, shared ones broadcast). It has reverse mode only
    and does not vmap, so every kind is built on the whole batch."""

    batched_fn: Callable[..., jax.Array] = dataclasses.field(kw_only=True)
    from_client_module: ClassVar[bool] = True

    def jacobian_mode(self, kind: Kind, mode: JacobianMode, n_in: int, n_out: int) -> JacobianMode:
        if kind.forward_only:
            raise InvalidArgument(
                f"{kind.value} needs forward mode, which a jax_export function does not support "
                "(a deserialized artifact has reverse mode only). Use vjp, or register the "
                "function as an expression"
            )
        if mode is JacobianMode.FORWARD:
            raise InvalidArgument(
                "jacobian mode forward needs forward mode, which a jax_export function does not "
                "support; use mode='reverse' (or 'auto')"
            )
        return JacobianMode.REVERSE

    def kind_transform(self, request: Request) -> Callable[..., Any]:
        return _batched_transform(request, self)

    def primitives(self, wrt: Wrt) -> Primitives:
        # The artifact runs reverse mode at a batch of rows only: primitives.from_batched.
        return primitives.from_batched(self, wrt, self.batched_fn)


def build_program(spec: hessd_pb2.FunctionSpec, allow: bool) -> ExportProgram:
    """The Program of a jax_export spec.

    PermissionDenied unless `allow`; InvalidArgument for an artifact that is malformed,
    newer than this server's JAX, unsafe, or disagrees with the declared inputs.
    """
    if not allow:
        raise PermissionDenied(
            "this server does not accept jax_export specs: they run native code the client "
            "chose. Start the server with --allow-jax-export to accept them, or send an "
            "expression instead"
        )
    body = spec.jax_export
    inputs = check_inputs(spec.inputs)
    if spec.constants:
        raise InvalidArgument("a jax_export spec takes no constants: close over them in fn")
    _check_version(body.jax_version)
    try:
        artifact = jax.export.deserialize(bytearray(body.serialized))
    except Exception as e:  # any malformed bytes: the message is all we can offer
        raise InvalidArgument(f"the jax_export artifact could not be deserialized: {e}") from None
    modules = [("the function", artifact)]
    try:
        for order in range(1, _VJP_ORDER + 1):
            modules.append((f"its order-{order} VJP", modules[-1][1].vjp()))
    except Exception:
        raise InvalidArgument(
            f"the artifact carries VJPs up to order {len(modules) - 1}; hessd needs "
            f"{_VJP_ORDER} (hvp, hessian): serialize with exported.serialize(vjp_order=2)"
        ) from None
    for what, module in modules:
        check_module(module, what)
    _check_signature(artifact, inputs)
    out = artifact.out_avals[0]
    return ExportProgram(
        function_id=function_id(spec),
        inputs=inputs,
        output_shape=tuple(int(d) for d in out.shape[1:]),
        output_dtype=np.dtype(out.dtype),
        batched_fn=artifact.call,
        spec=spec.SerializeToString(),
    )


def check_module(artifact: jax.export.Exported, what: str = "the function") -> None:
    """InvalidArgument unless the artifact kept its safety checks, targets this backend,
    and its module calls only allowed custom-call targets and moves nothing to the host."""
    if artifact.disabled_safety_checks:
        raise InvalidArgument(
            f"{what} was exported with safety checks disabled "
            f"({', '.join(map(str, artifact.disabled_safety_checks))}); hessd accepts only "
            "artifacts exported with every safety check"
        )
    backend = jax.default_backend()
    if backend not in artifact.platforms:
        raise InvalidArgument(
            f"{what} was exported for {artifact.platforms}, and this server runs on "
            f"{backend}: export with platforms=[{backend!r}]"
        )
    if artifact.nr_devices != 1:
        raise InvalidArgument(f"{what} was exported for {artifact.nr_devices} devices, not 1")
    try:
        text = artifact.mlir_module()
    except Exception as e:  # corrupted module bytes inside a well-formed artifact
        message = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InvalidArgument(f"{what}'s StableHLO module could not be read: {message}") from None
    ops, targets = _scan(text)
    if bad := sorted(targets - ALLOWED_CUSTOM_CALLS):
        raise InvalidArgument(
            f"{what} calls custom-call target {', '.join(map(repr, bad))}, which hessd does "
            f"not allow; allowed are the linear-algebra targets of jnp.linalg and "
            "shape_assertion"
        )
    if bad := sorted(ops & FORBIDDEN_OPS):
        raise InvalidArgument(f"{what} holds {', '.join(bad)}: host transfers are not allowed")


def _scan(text: str) -> tuple[set[str], set[str]]:
    """(operation names, custom-call targets) of a module, from MLIR's own parse of it.

    A structural walk, not a text search: names, locations and string attributes (which an
    artifact's author controls) cannot hide an op or fake one. The context is JAX's, so
    every dialect an artifact may hold is registered.
    """
    ops: set[str] = set()
    targets: set[str] = set()

    def visit(op: ir.Operation | ir.OpView) -> ir.WalkResult:
        op = getattr(op, "operation", op)
        ops.add(op.name)
        if op.name == "stablehlo.custom_call":
            targets.add(ir.StringAttr(op.attributes["call_target_name"]).value)
        return ir.WalkResult.ADVANCE

    with jax_mlir.make_ir_context():
        try:
            module = ir.Module.parse(text)
        except ir.MLIRError as e:
            raise InvalidArgument(f"the artifact's module could not be parsed: {e}") from None
        module.operation.walk(visit)
    return ops, targets


def _check_version(exporter: str) -> None:
    def parse(version: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", version)[:3])

    if not exporter:
        raise InvalidArgument("the jax_export spec does not say which JAX made it (jax_version)")
    if not re.fullmatch(r"\d+\.\d+\.\d+[0-9A-Za-z.+-]{0,40}", exporter):
        raise InvalidArgument(
            f"jax_version {exporter[:60]!r} is not a JAX version (like 0.10.2): send "
            "jax.__version__ of the exporter"
        )
    if parse(exporter) > parse(jax.__version__):
        raise InvalidArgument(
            f"the artifact was made by JAX {exporter}, newer than this server's JAX "
            f"{jax.__version__}; export with JAX <= {jax.__version__} or upgrade the server"
        )


def _check_signature(artifact: jax.export.Exported, inputs: Sequence[InputSignature]) -> None:
    if len(artifact.in_avals) != len(inputs) or len(artifact.out_avals) != 1:
        raise InvalidArgument(
            f"the artifact takes {len(artifact.in_avals)} inputs and returns "
            f"{len(artifact.out_avals)} outputs; the spec declares {len(inputs)} inputs and "
            "hessd needs one output"
        )
    batch_dims = set()
    for aval, signature in zip(artifact.in_avals, inputs, strict=True):
        expected = f"(batch, {', '.join(map(str, signature.shape))})"
        if not aval.shape or isinstance(aval.shape[0], int):
            raise InvalidArgument(
                f"input {signature.name!r} of the artifact has shape {aval.shape}; export "
                f"jax.vmap(fn) with a symbolic batch dimension: {expected}"
            )
        batch_dims.add(str(aval.shape[0]))
        if tuple(aval.shape[1:]) != signature.shape or np.dtype(aval.dtype) != signature.dtype:
            raise InvalidArgument(
                f"input {signature.name!r}: the artifact takes {aval.shape} {aval.dtype}, the "
                f"spec declares {signature.shape} {signature.dtype.name} per point"
            )
    out = artifact.out_avals[0]
    if len(batch_dims) != 1 or not out.shape or str(out.shape[0]) not in batch_dims:
        raise InvalidArgument(
            "every input and the output of the artifact must share one symbolic batch "
            "dimension: export jax.vmap(fn)"
        )


def _batched_transform(request: Request, program: ExportProgram) -> Callable[..., Any]:
    """g(*inputs[, vector]) over a batch for a JAX-export program, reverse mode only."""
    n_inputs = len(program.inputs)
    kind = request.kind

    def g(*args: jax.Array) -> Any:
        batched = next(a for i, a in enumerate(args[:n_inputs]) if i not in request.shared)
        b = batched.shape[0]
        # The artifact is vmap(fn) over every input: give shared ones a batch axis. A
        # derivative with respect to a shared input is then per example, as asked.
        inputs = [
            jnp.broadcast_to(a, (b, *a.shape)) if i in request.shared else a
            for i, a in enumerate(args[:n_inputs])
        ]
        if kind is Kind.VALUE:
            return program.batched_fn(*inputs)
        f_x, x = request.wrt.view(program, program.batched_fn, inputs)
        vector = args[n_inputs] if request.takes_vector else None
        match kind:
            case Kind.GRADIENT:
                result = _gradient(f_x, x)
            case Kind.VJP:
                result = jax.vjp(f_x, x)[1](vector)[0]
            case Kind.HVP:
                assert vector is not None  # hvp takes a vector (takes_vector)
                result = _hvp(f_x, x, vector)
            case Kind.JACOBIAN:
                result = _jacobian(f_x, x, program.output_shape)
            case Kind.HESSIAN:
                result = _hessian(f_x, x, program.output_shape)
            case Kind.TAYLOR2:
                return {
                    "value": f_x(x),
                    "gradient": _gradient(f_x, x),
                    "hessian": _hessian(f_x, x, ()),
                }
            case Kind.JVP | Kind.TAYLOR:
                raise AssertionError(f"{kind} needs forward mode; jacobian_mode refuses it")
        return request.finish(program, result, lead=1)

    return g


def _gradient(f_x: FunctionOfVariable, x: jax.Array) -> jax.Array:
    """Per-point gradients of a scalar f: (b, *x). The points are independent, so the VJP
    with a cotangent of ones holds each point's own gradient."""
    out, vjp = jax.vjp(f_x, x)
    return vjp(jnp.ones_like(out))[0]


def _hvp(f_x: FunctionOfVariable, x: jax.Array, v: jax.Array) -> jax.Array:
    """Per-point H v, reverse over reverse: the gradient of Σ_b ⟨∇f(x_b), v_b⟩."""

    def directional(x: jax.Array) -> jax.Array:
        return jnp.sum(_gradient(f_x, x) * v)

    return jax.grad(directional)(x)


def _jacobian(f_x: FunctionOfVariable, x: jax.Array, out_shape: tuple[int, ...]) -> jax.Array:
    """(b, *out, *x): one VJP per output element, lax.map over the output basis."""
    m = math.prod(out_shape)
    b = x.shape[0]
    _, vjp = jax.vjp(f_x, x)

    def row(e: jax.Array) -> jax.Array:
        return vjp(jnp.broadcast_to(e.reshape(out_shape), (b, *out_shape)))[0]

    rows = lax.map(row, jnp.eye(m, dtype=x.dtype))  # (m, b, *x)
    return jnp.moveaxis(rows, 0, 1).reshape(b, *out_shape, *x.shape[1:])


def _hessian(f_x: FunctionOfVariable, x: jax.Array, out_shape: tuple[int, ...]) -> jax.Array:
    """(b, *out, *x, *x): for each output element, the Jacobian of its per-point gradient,
    one reverse pass per element of x, lax.map over both bases."""
    m, n = math.prod(out_shape), math.prod(x.shape[1:])
    b = x.shape[0]

    def gradient_of_component(e: jax.Array) -> jax.Array:
        def g(x: jax.Array) -> jax.Array:
            out, vjp = jax.vjp(f_x, x)
            return vjp(jnp.broadcast_to(e.reshape(out_shape), out.shape))[0].reshape(b, n)

        def row(i: jax.Array) -> jax.Array:
            return jax.grad(lambda x: jnp.sum(g(x)[:, i]))(x)  # (b, *x)

        return lax.map(row, jnp.arange(n))  # (n, b, *x)

    blocks = lax.map(gradient_of_component, jnp.eye(m, dtype=x.dtype))  # (m, n, b, *x)
    return jnp.moveaxis(blocks, 2, 0).reshape(b, *out_shape, *x.shape[1:], *x.shape[1:])
