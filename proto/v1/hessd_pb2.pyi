from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    VALUE: _ClassVar[Kind]
    GRADIENT: _ClassVar[Kind]
    JACOBIAN: _ClassVar[Kind]
    HESSIAN: _ClassVar[Kind]
    HVP: _ClassVar[Kind]
    JVP: _ClassVar[Kind]
    VJP: _ClassVar[Kind]

class JacobianMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JACOBIAN_MODE_UNSPECIFIED: _ClassVar[JacobianMode]
    AUTO: _ClassVar[JacobianMode]
    FORWARD: _ClassVar[JacobianMode]
    REVERSE: _ClassVar[JacobianMode]

class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYOUT_UNSPECIFIED: _ClassVar[Layout]
    NUMERATOR: _ClassVar[Layout]
    DENOMINATOR: _ClassVar[Layout]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
INT32: DType
INT64: DType
KIND_UNSPECIFIED: Kind
VALUE: Kind
GRADIENT: Kind
JACOBIAN: Kind
HESSIAN: Kind
HVP: Kind
JVP: Kind
VJP: Kind
JACOBIAN_MODE_UNSPECIFIED: JacobianMode
AUTO: JacobianMode
FORWARD: JacobianMode
REVERSE: JacobianMode
LAYOUT_UNSPECIFIED: Layout
NUMERATOR: Layout
DENOMINATOR: Layout

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class Expression(_message.Message):
    __slots__ = ("source",)
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    source: str
    def __init__(self, source: _Optional[str] = ...) -> None: ...

class FunctionSpec(_message.Message):
    __slots__ = ("expression", "inputs", "constants")
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_FIELD_NUMBER: _ClassVar[int]
    expression: Expression
    inputs: _containers.RepeatedCompositeFieldContainer[InputSpec]
    constants: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, expression: _Optional[_Union[Expression, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[InputSpec, _Mapping]]] = ..., constants: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: FunctionSpec
    def __init__(self, spec: _Optional[_Union[FunctionSpec, _Mapping]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("function_id", "output_shape", "output_dtype")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    output_dtype: DType
    def __init__(self, function_id: _Optional[str] = ..., output_shape: _Optional[_Iterable[int]] = ..., output_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("function_id", "spec", "kind", "inputs", "vector", "wrt", "jacobian_mode", "layout")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    JACOBIAN_MODE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    spec: FunctionSpec
    kind: Kind
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    vector: Tensor
    wrt: str
    jacobian_mode: JacobianMode
    layout: Layout
    def __init__(self, function_id: _Optional[str] = ..., spec: _Optional[_Union[FunctionSpec, _Mapping]] = ..., kind: _Optional[_Union[Kind, str]] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., vector: _Optional[_Union[Tensor, _Mapping]] = ..., wrt: _Optional[str] = ..., jacobian_mode: _Optional[_Union[JacobianMode, str]] = ..., layout: _Optional[_Union[Layout, str]] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("output",)
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Device(_message.Message):
    __slots__ = ("id", "platform", "kind")
    ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    id: int
    platform: str
    kind: str
    def __init__(self, id: _Optional[int] = ..., platform: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_request_bytes", "max_output_bytes", "max_batch_bucket", "max_expression_chars", "max_functions")
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BUCKET_FIELD_NUMBER: _ClassVar[int]
    MAX_EXPRESSION_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    max_request_bytes: int
    max_output_bytes: int
    max_batch_bucket: int
    max_expression_chars: int
    max_functions: int
    def __init__(self, max_request_bytes: _Optional[int] = ..., max_output_bytes: _Optional[int] = ..., max_batch_bucket: _Optional[int] = ..., max_expression_chars: _Optional[int] = ..., max_functions: _Optional[int] = ...) -> None: ...

class ServerInfoResponse(_message.Message):
    __slots__ = ("version", "jax_version", "backend", "devices", "limits")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    JAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    version: str
    jax_version: str
    backend: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    limits: Limits
    def __init__(self, version: _Optional[str] = ..., jax_version: _Optional[str] = ..., backend: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...
