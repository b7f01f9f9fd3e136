"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) over hessd.

A model is a function registered under a name (RegisterRequest.name), and the derivative
is chosen per request: the request parameter `kind`, or the model version, which is a
kind's name ("hessian"). ModelInfer becomes a hessd.v1 ComputeRequest and runs through
hessd.v1's own path (HessdServicer), so batching, limits, tokens, metrics and every status
and message are hessd.v1's; only the translation at either end is here. README.md,
"Open Inference Protocol", has the table of how requests map.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc
import ml_dtypes
import numpy as np

from hessd.proto import codec
from hessd.proto.kinds import JacobianMode, Kind, Layout, result_shapes, variable_shape
from hessd.proto.oip import grpc_predict_v2_pb2 as oip_pb2
from hessd.proto.v1 import hessd_pb2
from hessd.service.errors import InvalidArgument, NotFound, ServiceError
from hessd.service.program import Program
from hessd.service.servicer import HessdServicer, abort, failure_status

__all__ = ["DATATYPES", "KINDS", "SERVICE_NAME", "OipServicer"]

logger = logging.getLogger(__name__)

# The protocol's service name, which is what travels on the wire; the messages live in
# package hessd.oip so as not to clash with tritonclient's (proto/oip/grpc_predict_v2.proto).
SERVICE_NAME = "inference.GRPCInferenceService"
_SERVICE = oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
# Full method names ("/inference.GRPCInferenceService/ModelInfer", ...).
METHODS = tuple(f"/{SERVICE_NAME}/{method.name}" for method in _SERVICE.methods)

# The protocol's tensor data types that hessd computes with (its table: FP32 is float32,
# BF16 bfloat16 and so on); the others (UINT8, INT8, ..., BYTES) are refused by name.
DATATYPES: dict[str, np.dtype] = {
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "FP16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}
_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}
# InferTensorContents has typed fields for these; FP16 and BF16 travel only as raw bytes.
_CONTENTS = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "BOOL": "bool_contents",
}
# The kinds a model serves: hessd.v1's per-point kinds. The curvature kinds need an
# objective over a data set, which this protocol has no place for.
KINDS = tuple(k for k in Kind if not k.is_curvature)
# The model's input that carries a kind's vector (hvp v, jvp t, vjp u, taylor d).
VECTOR = "vector"


def _parse_kind(text: str) -> Kind:
    kind = Kind.parse(text)
    if kind.is_curvature:
        raise ValueError(
            f"kind {text!r} needs an objective over a data set, which the Open Inference "
            "Protocol cannot send; use hessd.v1 (hessd's client) for it"
        )
    return kind


# Request parameters → ComputeRequest fields: (the parameter's protocol type, the parse).
_PARAMETERS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "kind": ("string_param", _parse_kind),
    "wrt": ("string_param", lambda s: [n.strip() for n in s.split(",") if n.strip()]),
    "shared": ("string_param", lambda s: [n.strip() for n in s.split(",") if n.strip()]),
    "layout": ("string_param", Layout.parse),
    "jacobian_mode": ("string_param", JacobianMode.parse),
    "order": ("int64_param", int),
    "flatten": ("bool_param", bool),
    "packed": ("bool_param", bool),
    "output_dtype": ("string_param", lambda s: _datatype(s, "output_dtype")),
}
# Parameters that OIP clients send for other servers' features: accepted, without effect.
_IGNORED = frozenset({"priority", "timeout", "sequence_id", "sequence_start", "sequence_end"})

_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")


def _datatype(name: str, what: str) -> np.dtype:
    try:
        return DATATYPES[name]
    except KeyError:
        raise InvalidArgument(
            f"{what}: datatype {name!r} is not one hessd computes with; use one of "
            + ", ".join(DATATYPES)
        ) from None


def _datatype_name(dtype: np.dtype) -> str:
    return _DATATYPE_OF[np.dtype(dtype)]


def _rpc(
    method: Callable[[OipServicer, _Request, grpc.ServicerContext], _Reply],
) -> Callable[[OipServicer, _Request, grpc.ServicerContext], _Reply]:
    """As hessd.v1's methods: ServiceError → its status and message, anything else logged
    and INTERNAL; one request log line and the metrics per call (method names as here)."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: OipServicer, request: _Request, context: grpc.ServicerContext) -> _Reply:
        start = time.perf_counter()
        status, message = grpc.StatusCode.OK, ""
        try:
            return method(self, request, context)
        except Exception as e:
            status, message = failure_status(name, e, context.is_active())
        finally:
            self.hessd.record(name, _summary(request), context, status, time.perf_counter() - start)
        abort(context, status, message)

    return wrapper


def _summary(request: Any) -> hessd_pb2.ComputeRequest:
    """What the request log and the metrics read of a call: function, kind, points."""
    summary = hessd_pb2.ComputeRequest()
    if isinstance(request, oip_pb2.ModelInferRequest):
        summary.function_id = f"model:{request.model_name}"
        with contextlib.suppress(ServiceError, ValueError):  # refused by the call itself
            summary.kind = _request_kind(request).wire
        if request.inputs:
            first = request.inputs[0]
            summary.inputs.add(name=first.name).tensor.shape[:] = first.shape[:1]
    return summary


def _parameter(parameters: Mapping[str, oip_pb2.InferParameter], name: str) -> Any:
    """The value of a request parameter, parsed, or None when absent."""
    if name not in parameters:
        return None
    field, parse = _PARAMETERS[name]
    given = parameters[name].WhichOneof("parameter_choice")
    if given != field:
        raise InvalidArgument(
            f"parameter {name!r} must be a {field.removesuffix('_param')}, got "
            f"{given.removesuffix('_param') if given else 'nothing'}"
        )
    try:
        return parse(getattr(parameters[name], field))
    except ValueError as e:
        raise InvalidArgument(f"parameter {name!r}: {e}") from None


def _request_kind(request: oip_pb2.ModelInferRequest) -> Kind:
    """The kind of a ModelInfer: parameter `kind`, else the model version, else value."""
    from_parameter = _parameter(request.parameters, "kind")
    from_version = None
    if request.model_version:
        try:
            from_version = _parse_kind(request.model_version)
        except ValueError as e:
            raise NotFound(
                f"model {request.model_name!r} has no version {request.model_version!r}: "
                f"its versions are the kinds ({e})"
            ) from None
    if from_parameter and from_version and from_parameter is not from_version:
        raise InvalidArgument(
            f"parameter kind {from_parameter.value!r} and model version "
            f"{from_version.value!r} disagree; give one of them"
        )
    return from_parameter or from_version or Kind.VALUE


def _kinds_of(program: Program) -> list[Kind]:
    """The kinds a function serves: the scalar-only ones only for a scalar f."""
    scalar = program.output_shape == ()
    return [k for k in KINDS if scalar or not k.needs_scalar]


def _tensor_metadata(
    name: str, dtype: np.dtype, shape: tuple[int, ...]
) -> oip_pb2.ModelMetadataResponse.TensorMetadata:
    return oip_pb2.ModelMetadataResponse.TensorMetadata(
        name=name, datatype=_datatype_name(dtype), shape=[-1, *shape]
    )


def _result_metadata(program: Program, kind: Kind) -> dict[str, tuple[int, ...]]:
    """Each output's shape at one point for `kind` with the default options (the first
    input, numerator layout); taylor's order is -1 (any)."""
    first = program.inputs[0]
    shapes = result_shapes(kind, first.shape, program.output_shape, order=-1)
    return {kind.value if n == "output" else n: s for n, s in shapes.items()}


def _vector_shape(program: Program, kind: Kind) -> tuple[int, ...]:
    if kind.vector_is_output_shaped:
        return program.output_shape
    return variable_shape({program.inputs[0].name: program.inputs[0].shape}, flat=False)


class OipServicer:
    """inference.GRPCInferenceService in front of a HessdServicer (same registry, engine,
    batcher, limits and metrics)."""

    def __init__(self, hessd: HessdServicer):
        self.hessd = hessd
        self.version = importlib.metadata.version("hessd")

    @_rpc
    def ServerLive(
        self, request: oip_pb2.ServerLiveRequest, context: grpc.ServicerContext
    ) -> oip_pb2.ServerLiveResponse:
        return oip_pb2.ServerLiveResponse(live=True)

    @_rpc
    def ServerReady(
        self, request: oip_pb2.ServerReadyRequest, context: grpc.ServicerContext
    ) -> oip_pb2.ServerReadyResponse:
        # A draining server never gets here: new calls are refused UNAVAILABLE before.
        return oip_pb2.ServerReadyResponse(ready=True)

    @_rpc
    def ServerMetadata(
        self, request: oip_pb2.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> oip_pb2.ServerMetadataResponse:
        return oip_pb2.ServerMetadataResponse(name="hessd", version=self.version)

    @_rpc
    def ModelReady(
        self, request: oip_pb2.ModelReadyRequest, context: grpc.ServicerContext
    ) -> oip_pb2.ModelReadyResponse:
        try:
            program = self.hessd.registry.named(request.name)
        except NotFound:
            return oip_pb2.ModelReadyResponse(ready=False)
        versions = {k.value for k in _kinds_of(program)}
        return oip_pb2.ModelReadyResponse(ready=not request.version or request.version in versions)

    @_rpc
    def ModelMetadata(
        self, request: oip_pb2.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> oip_pb2.ModelMetadataResponse:
        program = self.hessd.registry.named(request.name)
        kinds = _kinds_of(program)
        response = oip_pb2.ModelMetadataResponse(
            name=request.name, versions=[k.value for k in kinds], platform="hessd"
        )
        for signature in program.inputs:
            response.inputs.append(
                _tensor_metadata(signature.name, signature.dtype, signature.shape)
            )
        if not request.version:
            # No kind chosen: one output per one-result kind, named by the kind.
            outputs = {
                name: shape
                for kind in kinds
                if kind not in (Kind.TAYLOR, Kind.TAYLOR2)
                for name, shape in _result_metadata(program, kind).items()
            }
        else:
            kind = next((k for k in kinds if k.value == request.version), None)
            if kind is None:
                raise NotFound(
                    f"model {request.name!r} has no version {request.version!r}; its "
                    "versions are the kinds it serves: " + ", ".join(k.value for k in kinds)
                )
            if kind.takes_vector:
                response.inputs.append(
                    _tensor_metadata(VECTOR, program.output_dtype, _vector_shape(program, kind))
                )
            outputs = _result_metadata(program, kind)
        for name, shape in outputs.items():
            response.outputs.append(_tensor_metadata(name, program.output_dtype, shape))
        return response

    @_rpc
    def ModelInfer(
        self, request: oip_pb2.ModelInferRequest, context: grpc.ServicerContext
    ) -> oip_pb2.ModelInferResponse:
        program = self.hessd.registry.named(request.model_name)
        kind = _request_kind(request)
        compute, raw = self._compute_request(request, program, kind)
        result = self.hessd._compute(compute, context)
        arrays = result if isinstance(result, dict) else {kind.value: result}
        return _infer_response(request, kind, arrays, raw)

    def _compute_request(
        self, request: oip_pb2.ModelInferRequest, program: Program, kind: Kind
    ) -> tuple[hessd_pb2.ComputeRequest, bool]:
        """The hessd.v1 request of a ModelInfer, and whether its tensors came raw."""
        unknown = sorted(set(request.parameters) - set(_PARAMETERS) - _IGNORED)
        if unknown:
            raise InvalidArgument(
                f"unknown request parameters {unknown}; hessd reads " + ", ".join(_PARAMETERS)
            )
        compute = hessd_pb2.ComputeRequest(function_id=program.function_id, kind=kind.wire)
        for name in ("wrt", "shared"):
            value = _parameter(request.parameters, name)
            if value:
                getattr(compute, name).extend(value)
        for name in ("layout", "jacobian_mode"):
            value = _parameter(request.parameters, name)
            if value is not None:
                setattr(compute, name, value.wire)
        for name in ("order", "flatten", "packed"):
            value = _parameter(request.parameters, name)
            if value is not None:
                setattr(compute, name, value)
        output_dtype = _parameter(request.parameters, "output_dtype")
        if output_dtype is not None:
            compute.output_dtype = codec.dtype_to_proto(output_dtype)
        raw = len(request.raw_input_contents) > 0
        if raw and len(request.raw_input_contents) != len(request.inputs):
            raise InvalidArgument(
                f"raw_input_contents has {len(request.raw_input_contents)} entries for "
                f"{len(request.inputs)} inputs; send one per input, in order, or none"
            )
        vector_given = False
        for index, given in enumerate(request.inputs):
            what = f"input {given.name!r}"
            dtype = _datatype(given.datatype, what)
            if raw:
                if given.HasField("contents"):
                    raise InvalidArgument(
                        f"{what} has contents while the request has raw_input_contents; "
                        "send every input one way"
                    )
                data = request.raw_input_contents[index]
            else:
                data = _typed_bytes(given, dtype, what)
            tensor = hessd_pb2.Tensor(
                dtype=codec.dtype_to_proto(dtype), shape=given.shape, data=data
            )
            if given.name == VECTOR and kind.takes_vector:
                compute.vector.CopyFrom(tensor)
                vector_given = True
            else:
                compute.inputs.add(name=given.name, tensor=tensor)
        if kind.takes_vector and not vector_given:
            raise InvalidArgument(
                f"kind {kind.value} needs {kind.vector_name}: send it as the input named "
                f"{VECTOR!r}, (batch, *shape) like the points"
            )
        return compute, raw

    def add_to_server(self, server: grpc.Server) -> None:
        """Serve every method of the .proto's service under the protocol's service name."""
        handlers = {
            method.name: grpc.unary_unary_rpc_method_handler(
                getattr(self, method.name),
                request_deserializer=getattr(oip_pb2, method.input_type.name).FromString,
                response_serializer=getattr(oip_pb2, method.output_type.name).SerializeToString,
            )
            for method in _SERVICE.methods
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )


def _typed_bytes(
    given: oip_pb2.ModelInferRequest.InferInputTensor, dtype: np.dtype, what: str
) -> bytes:
    """The raw bytes of an input sent in the typed `contents` fields."""
    field = _CONTENTS.get(given.datatype)
    if field is None:
        raise InvalidArgument(
            f"{what}: datatype {given.datatype} has no typed contents field in the protocol; "
            "send it in raw_input_contents"
        )
    others = [f for f in _CONTENTS.values() if f != field and len(getattr(given.contents, f))]
    if others:
        raise InvalidArgument(
            f"{what} is {given.datatype}, which travels in contents.{field}, but "
            f"contents.{others[0]} is set"
        )
    return (
        np.asarray(getattr(given.contents, field), dtype=dtype)
        .astype(dtype.newbyteorder("<"))
        .tobytes()
    )


def _infer_response(
    request: oip_pb2.ModelInferRequest, kind: Kind, arrays: Mapping[str, np.ndarray], raw: bool
) -> oip_pb2.ModelInferResponse:
    """The response: every result, or the requested ones; raw bytes when the request sent
    raw bytes or a result has no typed contents field (FP16, BF16)."""
    wanted = [o.name for o in request.outputs] or list(arrays)
    missing = [n for n in wanted if n not in arrays]
    if missing:
        raise InvalidArgument(
            f"requested outputs {missing} are not among this request's results: "
            + ", ".join(arrays)
        )
    response = oip_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=kind.value, id=request.id
    )
    raw = raw or any(_datatype_name(arrays[n].dtype) not in _CONTENTS for n in wanted)
    for name in wanted:
        array = arrays[name]
        datatype = _datatype_name(array.dtype)
        out = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(codec.little_endian(array).tobytes())
        else:
            getattr(out.contents, _CONTENTS[datatype]).extend(array.ravel().tolist())
    return response
