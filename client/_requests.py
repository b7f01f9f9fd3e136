"""Requests and replies of the client, shared by Client and AsyncClient: everything but the
call itself. Points and vectors are checked here, before anything is sent."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from hessd.client import _sparse
from hessd.client._data import Handle, describe, encode_objective
from hessd.client._errors import InvalidArgument
from hessd.proto import codec, stream
from hessd.proto.kinds import (
    DiagonalEstimator,
    JacobianMode,
    Kind,
    Layout,
    Method,
    PointClass,
    TraceEstimator,
    result_shapes,
    unpack_triangles,
    variable_shape,
)
from hessd.proto.v1 import hessd_pb2

__all__ = ["Function", "Spectrum"]


def _wire(member: Any) -> int:
    return member.wire


E = TypeVar("E", Kind, JacobianMode, Layout, Method, TraceEstimator, DiagonalEstimator)

Points = Any  # an array-like (batch, *shape), or a mapping of input name to one
Wrt = str | Sequence[str] | None

# Index i holds the name of PointClass wire value i.
_CLASS_NAMES = np.array(["unspecified", *(c.value for c in sorted(PointClass, key=_wire))])


@dataclasses.dataclass(frozen=True)
class Function:
    """A registered function: its id, its inputs (name → shape of one point, in order),
    the shape of its output at one point, and its dtype."""

    id: str
    inputs: dict[str, tuple[int, ...]]
    output_shape: tuple[int, ...]
    dtype: np.dtype
    spec: hessd_pb2.FunctionSpec = dataclasses.field(repr=False, compare=False)
    # The plans of calls already answered, by call key (compute_call); per object, so a
    # Function made anew (dataclasses.replace) starts with none.
    _plans: dict[tuple, ComputePlan] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """What Client.spectrum found, per point; a field a method does not produce is None.

    eigenvalues      exact (batch, n) ascending; lanczos (batch, 2k): k smallest, k largest
    eigenvectors     (batch, n, n) or (batch, n, 2k); column j belongs to eigenvalue j
    gradient_norm    (batch,) ‖∇f(x)‖₂
    point_class      (batch,) "minimum", "maximum", "saddle" or "degenerate"
    stationary       (batch,) bool, ‖∇f‖ ≤ gtol
    tol, gtol        (batch,) the tolerances used
    residuals        lanczos (batch, 2k): ‖H y - θ y‖ per Ritz pair
    trace            trace (batch,) and trace_std_error (batch,)
    nodes, weights   density (batch, probes, steps): the SLQ quadrature
    grid, density    density (batch, grid_size): the smoothed spectral density
    """

    gradient_norm: np.ndarray
    eigenvalues: np.ndarray | None = None
    eigenvectors: np.ndarray | None = None
    point_class: np.ndarray | None = None
    stationary: np.ndarray | None = None
    tol: np.ndarray | None = None
    gtol: np.ndarray | None = None
    residuals: np.ndarray | None = None
    trace: np.ndarray | None = None
    trace_std_error: np.ndarray | None = None
    nodes: np.ndarray | None = None
    weights: np.ndarray | None = None
    grid: np.ndarray | None = None
    density: np.ndarray | None = None


def register_request(
    function: str | Callable,
    inputs: Mapping[str, Sequence[int] | int],
    constants: Mapping[str, Any] | None,
    dtype: np.dtype,
    backend: Callable[[], str],
    warmup: Sequence[int] = (),
    warmup_kinds: Sequence[str] = ("value", "gradient"),
) -> hessd_pb2.RegisterRequest:
    """The RegisterRequest for an expression, or for a JAX callable (exported here; then
    `backend()` names the platform to export for)."""
    try:
        declared = [
            hessd_pb2.InputSpec(
                name=name, shape=_shape(shape, name), dtype=codec.dtype_to_proto(dtype)
            )
            for name, shape in inputs.items()
        ]
        if callable(function):
            if constants:
                raise InvalidArgument("a callable takes no constants: close over them in fn")
            from hessd.client._export import export_spec  # imports jax, only now

            spec = export_spec(function, declared, dtype, backend())
        else:
            spec = hessd_pb2.FunctionSpec(
                expression=hessd_pb2.Expression(source=function), inputs=declared
            )
            for name, value in (constants or {}).items():
                array = codec.coerce(value, dtype, f"constant {name!r}")
                codec.encode(array, out=spec.constants.add(name=name).tensor)
    except codec.TensorError as e:
        raise InvalidArgument(str(e)) from None
    kinds = [_option(Kind, k, "warmup_kinds").wire for k in warmup_kinds] if warmup else []
    return hessd_pb2.RegisterRequest(spec=spec, warmup_batch_sizes=list(warmup), warmup_kinds=kinds)


def function_of(
    request: hessd_pb2.RegisterRequest, reply: hessd_pb2.RegisterResponse, dtype: np.dtype
) -> Function:
    return Function(
        id=reply.function_id,
        inputs={s.name: tuple(s.shape) for s in request.spec.inputs},
        output_shape=tuple(reply.output_shape),
        dtype=dtype,
        spec=request.spec,
    )


@dataclasses.dataclass
class ComputeCall:
    """A checked Compute request: the header (tensors described, not filled), the arrays
    in stream order (inputs, then vector), and what the reply will need."""

    request: hessd_pb2.ComputeRequest
    arrays: list[np.ndarray]
    output_bytes: int  # what the result will weigh, from shapes alone
    unpack: int | None = None  # n, to unpack a packed Hessian into (n, n)
    sparse_format: str | None = None  # sparse: "scipy" or "arrays" (client/_sparse.py)
    handles: list[Handle] = dataclasses.field(default_factory=list)  # resident tensors named
    # Set by compute_call when a plan of this call may be kept once it is answered: its key,
    # the arrays as the caller gave them (compute_call's order), and where plans are kept.
    plan_key: tuple | None = None
    given: list[np.ndarray] = dataclasses.field(default_factory=list)
    plans: dict[tuple, ComputePlan] | None = None

    @property
    def input_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def filled(self) -> hessd_pb2.ComputeRequest:
        """The request with every tensor's bytes in it, for a unary call."""
        for array, (_, tensor) in zip(self.arrays, stream.tensors(self.request), strict=True):
            tensor.data = codec.little_endian(array).tobytes()
        return self.request

    def result(
        self, reply: hessd_pb2.ComputeResponse, buffers: Sequence[memoryview] | None = None
    ) -> Any:
        """The reply's arrays (a sparse one's matrices); `buffers` holds the bytes of a
        streamed reply."""
        if self.sparse_format is not None:
            named = stream.tensors(reply)
            data: Sequence[memoryview | None] = (
                buffers if buffers is not None else [None] * len(named)
            )
            arrays = {
                what: codec.decode(tensor, what, buffer)
                for (what, tensor), buffer in zip(named, data, strict=True)
            }
            rows, cols = arrays.get("sparsity rows"), arrays.get("sparsity cols")
            sparsity = _sparse.sparsity_of(reply.sparsity, rows, cols)
            _sparse.remember(self.request, sparsity.nnz)
            return _sparse.sparse_result(sparsity, arrays["output"], self.sparse_format)
        result = _decoded(reply, self.unpack, buffers)
        if buffers is None and self.plans is not None and self.plan_key is not None:
            plan = _plan_of(self, reply)
            if plan is not None:
                if len(self.plans) >= MAX_PLANS:
                    self.plans.clear()  # bounded, and safe beside other threads' lookups
                self.plans[self.plan_key] = plan
        return result


def _decoded(
    reply: hessd_pb2.ComputeResponse,
    unpack: int | None,
    buffers: Sequence[memoryview] | None = None,
) -> np.ndarray | dict[str, np.ndarray]:
    """The arrays of a dense reply: "output" alone as an array, several as a dict by name;
    a packed Hessian unpacked into (n, n) when `unpack` is n."""
    named = stream.tensors(reply)
    data: Sequence[memoryview | None] = buffers if buffers is not None else [None] * len(named)
    # A writable copy would double the memory of a large result; the view is read-only.
    arrays = {
        what: codec.decode(tensor, what, buffer)
        for (what, tensor), buffer in zip(named, data, strict=True)
    }
    result: np.ndarray | dict[str, np.ndarray] = (
        arrays["output"] if list(arrays) == ["output"] else arrays
    )
    if unpack is not None:
        assert isinstance(result, np.ndarray)  # packed: one Hessian of a scalar function
        result = unpack_triangles(result, unpack)
    return result


# Plans kept per Function; past this they are dropped together (a workload with ever new
# batch sizes pays a little for its misses, and memory stays bounded).
MAX_PLANS = 256


@dataclasses.dataclass(frozen=True)
class ComputePlan:
    """What a repeated unary Compute call needs besides its arrays' bytes: made once from a
    call that compute_request built and the server answered, for one key (function, kind,
    options, shapes; the dtype is the function's).

    The request is kept as wire bytes: `head` (every field but the tensors), then for each
    array the bytes of its NamedTensor or vector up to its data, so that a request is one
    join of those with the arrays' buffers (one copy of the data; protobuf's parser reads
    fields in any order). The reply's expected tensors decode as views of their bytes;
    a reply laid out otherwise is decoded in full, as compute_request's calls are.
    """

    head: bytes
    prefixes: tuple[bytes, ...]  # in stream order
    order: tuple[int, ...]  # for each prefix, the index of its array in compute_call's arrays
    input_bytes: int
    output_bytes: int
    # (name, wire dtype, shape, dtype, bytes) of each reply tensor; "output" alone is the
    # reply's `output` field (the result an array), else its `outputs` (a dict by name).
    outputs: tuple[tuple[str, int, list[int], np.dtype, int], ...]
    unpack: int | None

    def wire(self, arrays: Sequence[np.ndarray]) -> bytes:
        """The serialized ComputeRequest with these arrays' bytes."""
        parts: list[Any] = [self.head]
        for prefix, i in zip(self.prefixes, self.order, strict=True):
            array = arrays[i]
            parts += (prefix, array if array.flags.c_contiguous else np.ascontiguousarray(array))
        return b"".join(parts)

    def result(self, reply: hessd_pb2.ComputeResponse) -> np.ndarray | dict[str, np.ndarray]:
        if self.outputs[0][0] == "output" and len(self.outputs) == 1:
            if not reply.outputs and not reply.HasField("sparsity"):
                array = _view(reply.output, self.outputs[0])
                if array is not None:
                    return array if self.unpack is None else unpack_triangles(array, self.unpack)
        elif len(reply.outputs) == len(self.outputs) and not reply.HasField("output"):
            arrays = {}
            for named, expected in zip(reply.outputs, self.outputs, strict=True):
                if named.name != expected[0] or (array := _view(named.tensor, expected)) is None:
                    break
                arrays[named.name] = array
            else:
                if not reply.HasField("sparsity"):
                    return arrays
        return _decoded(reply, self.unpack)


def _view(
    tensor: hessd_pb2.Tensor, expected: tuple[str, int, list[int], np.dtype, int]
) -> np.ndarray | None:
    """A read-only view of the tensor's bytes if it is laid out as expected, else None."""
    _, wire_dtype, shape, dtype, nbytes = expected
    if tensor.dtype != wire_dtype or tensor.shape != shape:
        return None
    data = tensor.data
    if len(data) != nbytes:
        return None
    return np.frombuffer(data, dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class PlannedCall:
    """A unary Compute call from a plan: its request's wire bytes, and the plan that
    decodes its reply."""

    wire: bytes
    plan: ComputePlan

    def result(self, reply: hessd_pb2.ComputeResponse) -> np.ndarray | dict[str, np.ndarray]:
        return self.plan.result(reply)


def compute_call(
    f: Function, kind: str, points: Points, options: Mapping[str, Any], stream_threshold: int
) -> PlannedCall | ComputeCall:
    """The call behind Client.compute and AsyncClient.compute: planned when a call of the
    same key was answered before, its arrays need no conversion and it travels in one
    message; else compute_request's, which keeps a plan once answered, where it may."""
    key, given = _plan_key(f, kind, points, options)
    if key is None:
        return compute_request(f, kind, points, **options)
    try:
        plan = f._plans.get(key)
    except TypeError:  # an option's value is unhashable: such calls are not planned
        plan = None
        key = None
    if plan is not None and max(plan.input_bytes, plan.output_bytes) <= stream_threshold:
        return PlannedCall(plan.wire(given), plan)
    # The arrays as _plan_key made them, so that none is converted twice (np.asarray of a
    # JAX array on a GPU is a transfer); compute_request would make the same of them.
    names = _names_given(points)
    points = given[0] if names is None else dict(zip(names, given, strict=False))
    if options.get("vector") is not None:
        options = {**options, "vector": given[-1]}
    call = compute_request(f, kind, points, **options)
    if key is not None and not call.handles and call.sparse_format is None:
        call.plan_key, call.given, call.plans = key, given, f._plans
    return call


def _names_given(points: Points) -> tuple[str, ...] | None:
    """The input names of points given as a dict, in its order; None for one array."""
    return tuple(points) if type(points) is dict else None


def _plan_key(
    f: Function, kind: str, points: Points, options: Mapping[str, Any]
) -> tuple[tuple | None, list[np.ndarray]]:
    """The key of a call that a plan may serve (its kind, options as passed, input names
    given and arrays' shapes) and its arrays: the points (in the order given), then the
    vector, each as np.asarray makes it. (None, []) where no plan may serve it: anything
    but arrays of f's dtype (lists, handles and other dtypes are converted or checked by
    compute_request), a data set."""
    if options.get("data") is not None:
        return None, []
    names = _names_given(points)
    values = [points] if names is None else list(points.values())
    vector = options.get("vector")
    if vector is not None:
        values.append(vector)
    arrays = []
    for value in values:
        if type(value) is not np.ndarray:
            # What compute_request's np.asarray makes of an array of another library.
            if isinstance(value, Handle) or getattr(value, "dtype", None) != f.dtype:
                return None, []
            value = np.asarray(value)
        if value.dtype != f.dtype:
            return None, []
        arrays.append(value)
    settings = tuple(
        (name, tuple(value) if type(value) is list else value)
        for name, value in options.items()
        if name != "vector"
    )
    return (kind, names, tuple(a.shape for a in arrays), settings), arrays


def _plan_of(call: ComputeCall, reply: hessd_pb2.ComputeResponse) -> ComputePlan | None:
    """The plan of an answered unary call, or None if its request is not the caller's
    arrays' bytes as they are (converted, or another byte order) or it has an objective."""
    request = call.request
    if request.HasField("objective") or call.plan_key is None:
        return None
    given = call.given
    names = call.plan_key[1] or [t.name for t in request.inputs]
    order = [names.index(t.name) for t in request.inputs]
    tensors = [t.tensor for t in request.inputs]
    if request.HasField("vector"):
        order.append(len(given) - 1)
        tensors.append(request.vector)
    if len(order) != len(given) or any(
        given[i].tobytes() != tensor.data for i, tensor in zip(order, tensors, strict=True)
    ):
        return None
    head = hessd_pb2.ComputeRequest()
    head.CopyFrom(request)
    head.ClearField("inputs")
    head.ClearField("vector")
    prefixes = []
    for named in request.inputs:
        rest = hessd_pb2.NamedTensor()
        rest.CopyFrom(named)
        rest.ClearField("tensor")
        tensor, length = _tensor_prefix(named.tensor)
        body = rest.SerializeToString() + _TENSOR + _varint(length) + tensor
        prefixes.append(_INPUTS + _varint(len(body) + len(named.tensor.data)) + body)
    if request.HasField("vector"):
        tensor, length = _tensor_prefix(request.vector)
        prefixes.append(_VECTOR + _varint(length) + tensor)
    outputs = tuple(
        (
            what,
            tensor.dtype,
            list(tensor.shape),
            codec.dtype_from_proto(tensor.dtype),
            len(tensor.data),
        )
        for what, tensor in stream.tensors(reply)
    )
    if not outputs or any(what.startswith("sparsity") for what, *_ in outputs):
        return None
    return ComputePlan(
        head=head.SerializeToString(),
        prefixes=tuple(prefixes),
        order=tuple(order),
        input_bytes=call.input_bytes,
        output_bytes=call.output_bytes,
        outputs=outputs,
        unpack=call.unpack,
    )


def _tag(message: Any, field: str) -> bytes:
    """The wire key of a length-delimited field of a message type (wire type 2)."""
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)


def _varint(value: int) -> bytes:
    """`value` as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_INPUTS = _tag(hessd_pb2.ComputeRequest, "inputs")
_VECTOR = _tag(hessd_pb2.ComputeRequest, "vector")
_TENSOR = _tag(hessd_pb2.NamedTensor, "tensor")
_DATA = _tag(hessd_pb2.Tensor, "data")


def _tensor_prefix(tensor: hessd_pb2.Tensor) -> tuple[bytes, int]:
    """The wire bytes of `tensor` up to its data (its other fields, then the data's key
    and length), and the length of the whole tensor with its data."""
    rest = hessd_pb2.Tensor()
    rest.CopyFrom(tensor)
    rest.ClearField("data")
    prefix = rest.SerializeToString() + _DATA + _varint(len(tensor.data))
    return prefix, len(prefix) + len(tensor.data)


def compute_request(
    f: Function,
    kind: str,
    points: Points,
    *,
    vector: Any = None,
    wrt: Wrt = None,
    mode: str = "auto",
    layout: str = "numerator",
    order: int = 0,
    flatten: bool = False,
    shared: Sequence[str] = (),
    output_dtype: str | None = None,
    packed: bool = False,
    unpack: bool = True,
    sparse: bool = False,
    sparse_format: str | None = None,
    data: Mapping[str, Any] | None = None,
    loss: str | None = None,
    operator: str = "hessian",
    reduction: str = "mean",
    chunk_size: int = 0,
    target: str = "y",
    mc_samples: int = 0,
    seed: int = 0,
    diagonal_estimator: str | None = None,
    num_matvecs: int = 0,
    damping: float = 0.0,
    tolerance: float = 0.0,
    max_iterations: int = 0,
) -> ComputeCall:
    try:
        the_kind = Kind.parse(kind)
    except ValueError:
        raise InvalidArgument(
            f"unknown kind {kind!r}; use one of " + ", ".join(k.value for k in Kind)
        ) from None
    wrt = _names(wrt)
    try:
        out_dtype = np.dtype(output_dtype) if output_dtype else f.dtype
        wire_dtype = codec.dtype_to_proto(out_dtype) if output_dtype else None
    except (TypeError, codec.TensorError) as e:
        raise InvalidArgument(f"output_dtype={output_dtype!r}: {e}") from None
    the_layout = _option(Layout, layout, "layout")
    request = hessd_pb2.ComputeRequest(
        function_id=f.id,
        kind=the_kind.wire,
        wrt=wrt,
        jacobian_mode=_option(JacobianMode, mode, "mode").wire,
        layout=the_layout.wire,
        order=order,
        flatten=flatten,
        shared=shared,
        output_dtype=wire_dtype,
        packed=packed,
        sparse=sparse,
        diagonal_estimator=None
        if diagonal_estimator is None
        else _option(DiagonalEstimator, diagonal_estimator, "diagonal_estimator").wire,
        num_matvecs=num_matvecs,
        seed=seed if the_kind is Kind.DIAGONAL else 0,
        damping=damping,
        tolerance=tolerance,
        max_iterations=max_iterations,
    )
    over_data = data is not None
    arrays, batch, handles = _encode_points(f, points, shared, request, exclude=set(data or ()))
    variable = _variable_shape(f, wrt, flatten or over_data or the_kind.is_curvature)
    if over_data or the_kind.is_curvature:
        variable = (math.prod(variable),)
    if vector is not None:
        if not the_kind.takes_vector:
            raise InvalidArgument(
                f"kind {kind} takes no vector; only "
                + ", ".join(k.value for k in Kind if k.takes_vector)
                + " do"
            )
        shape = f.output_shape if the_kind.vector_is_output_shaped else variable
        if isinstance(vector, Handle):
            _check_handle(vector, shape, f.dtype, the_kind.vector_name)
            describe(vector, request.vector)
            handles.append(vector)
        else:
            arrays.append(_checked(vector, shape, f.dtype, the_kind.vector_name))
            codec.encode(arrays[-1], out=request.vector, data=False)
    if data is not None:
        data_arrays, data_handles = encode_objective(
            request.objective, f.inputs, f.dtype, data, loss=loss, operator=operator,
            reduction=reduction, chunk_size=chunk_size, target=target, seed=seed,
            mc_samples=mc_samples,
        )  # fmt: skip
        arrays += data_arrays
        handles += data_handles
    shapes = result_shapes(
        the_kind, variable, () if over_data else f.output_shape, layout=the_layout,
        packed=packed, order=order,
    )  # fmt: skip
    elements = sum(math.prod(s) for s in shapes.values())
    call = ComputeCall(
        request, arrays, (batch or 0) * elements * out_dtype.itemsize, handles=handles
    )
    if packed and unpack:
        call.unpack = math.prod(variable)
    if sparse:
        call.sparse_format = _sparse.check_format(sparse_format)
        call.output_bytes = _sparse.expected_bytes(
            request, batch or 0, out_dtype.itemsize, call.output_bytes
        )
    elif sparse_format is not None:
        raise InvalidArgument("sparse_format applies only with sparse=True")
    return call


def spectrum_request(
    f: Function,
    points: Points,
    method: str = "exact",
    *,
    wrt: Wrt = None,
    shared: Sequence[str] = (),
    eigenvectors: bool = False,
    k: int = 0,
    num_steps: int = 0,
    num_probes: int = 0,
    num_matvecs: int = 0,
    trace_estimator: str | None = None,
    seed: int = 0,
    grid_size: int = 0,
    tol: float | None = None,
    gtol: float | None = None,
    sigma: float | None = None,
    data: Mapping[str, Any] | None = None,
    loss: str | None = None,
    operator: str = "hessian",
    reduction: str = "mean",
    chunk_size: int = 0,
    target: str = "y",
    mc_samples: int = 0,
) -> tuple[hessd_pb2.SpectrumRequest, list[Handle]]:
    """The SpectrumRequest, its tensors' bytes in it, and the handles it names."""
    request = hessd_pb2.SpectrumRequest(
        function_id=f.id,
        wrt=_names(wrt),
        shared=shared,
        method=_option(Method, method, "method").wire,
        eigenvectors=eigenvectors,
        k=k,
        num_steps=num_steps,
        num_probes=num_probes,
        num_matvecs=num_matvecs,
        trace_estimator=(
            None
            if trace_estimator is None
            else _option(TraceEstimator, trace_estimator, "trace_estimator").wire
        ),
        seed=seed,
        grid_size=grid_size,
    )
    for name, value in (("tol", tol), ("gtol", gtol), ("sigma", sigma)):
        if value is not None:
            setattr(request, name, value)
    _, _, handles = _encode_points(f, points, shared, request, data=True, exclude=set(data or ()))
    if data is not None:
        arrays, data_handles = encode_objective(
            request.objective, f.inputs, f.dtype, data, loss=loss, operator=operator,
            reduction=reduction, chunk_size=chunk_size, target=target, seed=seed,
            mc_samples=mc_samples,
        )  # fmt: skip
        named = [t for t in request.objective.data if not t.tensor.handle]
        for item, array in zip(named, arrays, strict=True):
            item.tensor.data = codec.little_endian(array).tobytes()
        handles += data_handles
    return request, handles


def spectrum_result(reply: hessd_pb2.SpectrumResponse) -> Spectrum:
    fields = {field.name: codec.decode(value, field.name) for field, value in reply.ListFields()}
    if "point_class" in fields:
        fields["point_class"] = _CLASS_NAMES[fields["point_class"]]
    return Spectrum(**fields)


def server_info_result(reply: hessd_pb2.ServerInfoResponse) -> dict[str, Any]:
    limits = reply.limits
    return {
        "server_id": reply.server_id,
        "version": reply.version,
        "jax_version": reply.jax_version,
        "backend": reply.backend,
        "devices": [{"id": d.id, "platform": d.platform, "kind": d.kind} for d in reply.devices],
        "limits": {f.name: getattr(limits, f.name) for f in limits.DESCRIPTOR.fields},
    }


def _names(wrt: Wrt) -> list[str]:
    if wrt is None:
        return []
    return [wrt] if isinstance(wrt, str) else list(wrt)


def _variable_shape(f: Function, wrt: list[str], flatten: bool) -> tuple[int, ...]:
    """Shape of the variable derivatives are taken with respect to, as the server has it."""
    names = wrt or [next(iter(f.inputs))]
    unknown = [n for n in names if n not in f.inputs]
    if unknown:
        raise InvalidArgument(f"wrt={unknown[0]!r} is not an input; inputs are {list(f.inputs)}")
    return variable_shape({n: f.inputs[n] for n in names}, flatten)


def _shape(shape: Sequence[int] | int, name: str) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int | np.integer) and d >= 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: shape {shape} must be non-negative integers")
    return shape


def _option(enum_type: type[E], value: str, name: str) -> E:
    """The member of a contract enum called `value`; InvalidArgument naming the choices."""
    try:
        return enum_type.parse(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum_type)
        raise InvalidArgument(f"{name}={value!r}; use one of {choices}") from None


def _encode_points(
    f: Function,
    points: Points,
    shared: Sequence[str],
    request: hessd_pb2.ComputeRequest | hessd_pb2.SpectrumRequest,
    data: bool = False,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> tuple[list[np.ndarray], int | None, list[Handle]]:
    """Check `points` against f's inputs (those not in `exclude`, which come from a data
    set) and describe them in request.inputs (with their bytes if `data`); return the arrays
    whose bytes travel, in order, the batch size (None if all shared), and the handles."""
    names = [n for n in f.inputs if n not in exclude]
    if not isinstance(points, Mapping):
        if len(names) != 1:
            raise InvalidArgument(
                f"this function has inputs {names}"
                + (" besides its data" if exclude else "")
                + "; pass a dict of arrays, one per input"
            )
        points = {names[0]: points}
    if sorted(points) != sorted(names):
        raise InvalidArgument(
            f"the function takes inputs {names}"
            + (" besides its data" if exclude else "")
            + f"; got {sorted(points)}"
        )
    if unknown := [n for n in shared if n not in f.inputs]:
        raise InvalidArgument(f"shared={unknown[0]!r} is not an input; inputs are {list(f.inputs)}")
    batch = None
    arrays = []
    handles: list[Handle] = []
    for name, shape in f.inputs.items():
        if name in exclude:
            continue
        value = points[name]
        if isinstance(value, Handle):
            is_shared = name in shared
            _check_handle(value, shape, f.dtype, f"input {name!r}", batched=not is_shared)
            describe(value, request.inputs.add(name=name).tensor)
            handles.append(value)
            if not is_shared:
                if batch is not None and value.shape[0] != batch:
                    raise InvalidArgument(
                        f"input {name!r} has {value.shape[0]} points, others have {batch}"
                    )
                batch = value.shape[0]
            continue
        if name in shared:
            array = _checked(value, shape, f.dtype, f"shared input {name!r}", batched=False)
        else:
            array = _checked(value, shape, f.dtype, f"input {name!r}")
            if batch is not None and array.shape[0] != batch:
                raise InvalidArgument(
                    f"input {name!r} has {array.shape[0]} points, others have {batch}"
                )
            batch = array.shape[0]
        codec.encode(array, out=request.inputs.add(name=name).tensor, data=data)
        arrays.append(array)
    return arrays, batch, handles


def _check_handle(
    handle: Handle, shape: tuple[int, ...], dtype: np.dtype, what: str, batched: bool = True
) -> None:
    """A resident tensor must already be what the call needs: it is never converted."""
    want = f"(batch, *{shape})" if batched else str(shape)
    fits = handle.shape[1:] == shape if batched else handle.shape == shape
    if not fits or handle.dtype != dtype:
        raise InvalidArgument(
            f"{what} is a resident tensor of shape {handle.shape} {handle.dtype.name}; the call "
            f"needs {want} {dtype.name}: put it again with that shape and dtype"
        )


def _checked(
    value: Any, shape: tuple[int, ...], dtype: np.dtype, what: str, batched: bool = True
) -> np.ndarray:
    """`value` as an array of `dtype` and shape (batch, *shape), or (*shape) if not
    `batched`; InvalidArgument otherwise. Anything np.asarray takes is welcome."""
    try:
        array = codec.coerce(value, dtype, what)
        if batched:
            codec.check_points(array, shape, dtype, what)
        elif array.shape != shape:
            raise InvalidArgument(
                f"{what} has shape {array.shape}; a shared input is sent once, without a "
                f"batch axis: {shape}"
            )
    except codec.TensorError as e:
        raise InvalidArgument(str(e)) from None
    return array
