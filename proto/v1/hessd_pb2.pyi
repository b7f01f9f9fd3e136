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
    BOOL: _ClassVar[DType]

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
    TAYLOR2: _ClassVar[Kind]
    TAYLOR: _ClassVar[Kind]
    DIAGONAL: _ClassVar[Kind]
    SOLVE: _ClassVar[Kind]
    GRADIENT_STATISTICS: _ClassVar[Kind]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    MEAN: _ClassVar[Reduction]
    SUM: _ClassVar[Reduction]

class CurvatureOperator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CURVATURE_OPERATOR_UNSPECIFIED: _ClassVar[CurvatureOperator]
    HESSIAN_OPERATOR: _ClassVar[CurvatureOperator]
    GGN: _ClassVar[CurvatureOperator]
    FISHER: _ClassVar[CurvatureOperator]
    EMPIRICAL_FISHER: _ClassVar[CurvatureOperator]

class BuiltinLoss(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUILTIN_LOSS_UNSPECIFIED: _ClassVar[BuiltinLoss]
    MSE: _ClassVar[BuiltinLoss]
    SOFTMAX_CROSS_ENTROPY: _ClassVar[BuiltinLoss]

class DiagonalEstimator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIAGONAL_ESTIMATOR_UNSPECIFIED: _ClassVar[DiagonalEstimator]
    EXACT_DIAGONAL: _ClassVar[DiagonalEstimator]
    HUTCHINSON_DIAGONAL: _ClassVar[DiagonalEstimator]
    DIAG_PP: _ClassVar[DiagonalEstimator]

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

class SparseColoring(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPARSE_COLORING_UNSPECIFIED: _ClassVar[SparseColoring]
    COLUMN: _ClassVar[SparseColoring]
    ROW: _ClassVar[SparseColoring]
    SYMMETRIC: _ClassVar[SparseColoring]

class SpectrumMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPECTRUM_METHOD_UNSPECIFIED: _ClassVar[SpectrumMethod]
    EXACT: _ClassVar[SpectrumMethod]
    LANCZOS: _ClassVar[SpectrumMethod]
    TRACE: _ClassVar[SpectrumMethod]
    DENSITY: _ClassVar[SpectrumMethod]

class TraceEstimator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRACE_ESTIMATOR_UNSPECIFIED: _ClassVar[TraceEstimator]
    HUTCHPP: _ClassVar[TraceEstimator]
    HUTCHINSON: _ClassVar[TraceEstimator]

class PointClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POINT_CLASS_UNSPECIFIED: _ClassVar[PointClass]
    MINIMUM: _ClassVar[PointClass]
    MAXIMUM: _ClassVar[PointClass]
    SADDLE: _ClassVar[PointClass]
    DEGENERATE: _ClassVar[PointClass]
    UNDEFINED: _ClassVar[PointClass]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
INT32: DType
INT64: DType
BOOL: DType
KIND_UNSPECIFIED: Kind
VALUE: Kind
GRADIENT: Kind
JACOBIAN: Kind
HESSIAN: Kind
HVP: Kind
JVP: Kind
VJP: Kind
TAYLOR2: Kind
TAYLOR: Kind
DIAGONAL: Kind
SOLVE: Kind
GRADIENT_STATISTICS: Kind
REDUCTION_UNSPECIFIED: Reduction
MEAN: Reduction
SUM: Reduction
CURVATURE_OPERATOR_UNSPECIFIED: CurvatureOperator
HESSIAN_OPERATOR: CurvatureOperator
GGN: CurvatureOperator
FISHER: CurvatureOperator
EMPIRICAL_FISHER: CurvatureOperator
BUILTIN_LOSS_UNSPECIFIED: BuiltinLoss
MSE: BuiltinLoss
SOFTMAX_CROSS_ENTROPY: BuiltinLoss
DIAGONAL_ESTIMATOR_UNSPECIFIED: DiagonalEstimator
EXACT_DIAGONAL: DiagonalEstimator
HUTCHINSON_DIAGONAL: DiagonalEstimator
DIAG_PP: DiagonalEstimator
JACOBIAN_MODE_UNSPECIFIED: JacobianMode
AUTO: JacobianMode
FORWARD: JacobianMode
REVERSE: JacobianMode
LAYOUT_UNSPECIFIED: Layout
NUMERATOR: Layout
DENOMINATOR: Layout
SPARSE_COLORING_UNSPECIFIED: SparseColoring
COLUMN: SparseColoring
ROW: SparseColoring
SYMMETRIC: SparseColoring
SPECTRUM_METHOD_UNSPECIFIED: SpectrumMethod
EXACT: SpectrumMethod
LANCZOS: SpectrumMethod
TRACE: SpectrumMethod
DENSITY: SpectrumMethod
TRACE_ESTIMATOR_UNSPECIFIED: TraceEstimator
HUTCHPP: TraceEstimator
HUTCHINSON: TraceEstimator
POINT_CLASS_UNSPECIFIED: PointClass
MINIMUM: PointClass
MAXIMUM: PointClass
SADDLE: PointClass
DEGENERATE: PointClass
UNDEFINED: PointClass

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "handle")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    handle: str
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., handle: _Optional[str] = ...) -> None: ...

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

class JaxExport(_message.Message):
    __slots__ = ("serialized", "jax_version")
    SERIALIZED_FIELD_NUMBER: _ClassVar[int]
    JAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    serialized: bytes
    jax_version: str
    def __init__(self, serialized: _Optional[bytes] = ..., jax_version: _Optional[str] = ...) -> None: ...

class FunctionSpec(_message.Message):
    __slots__ = ("expression", "jax_export", "inputs", "constants")
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    JAX_EXPORT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_FIELD_NUMBER: _ClassVar[int]
    expression: Expression
    jax_export: JaxExport
    inputs: _containers.RepeatedCompositeFieldContainer[InputSpec]
    constants: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, expression: _Optional[_Union[Expression, _Mapping]] = ..., jax_export: _Optional[_Union[JaxExport, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[InputSpec, _Mapping]]] = ..., constants: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class Loss(_message.Message):
    __slots__ = ("builtin", "expression", "target")
    BUILTIN_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    builtin: BuiltinLoss
    expression: str
    target: str
    def __init__(self, builtin: _Optional[_Union[BuiltinLoss, str]] = ..., expression: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class Objective(_message.Message):
    __slots__ = ("data", "reduction", "chunk_size", "operator", "loss", "seed", "mc_samples")
    DATA_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MC_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    data: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    reduction: Reduction
    chunk_size: int
    operator: CurvatureOperator
    loss: Loss
    seed: int
    mc_samples: int
    def __init__(self, data: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., chunk_size: _Optional[int] = ..., operator: _Optional[_Union[CurvatureOperator, str]] = ..., loss: _Optional[_Union[Loss, _Mapping]] = ..., seed: _Optional[int] = ..., mc_samples: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("spec", "warmup_batch_sizes", "warmup_kinds", "name")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    WARMUP_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    WARMUP_KINDS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    spec: FunctionSpec
    warmup_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    warmup_kinds: _containers.RepeatedScalarFieldContainer[Kind]
    name: str
    def __init__(self, spec: _Optional[_Union[FunctionSpec, _Mapping]] = ..., warmup_batch_sizes: _Optional[_Iterable[int]] = ..., warmup_kinds: _Optional[_Iterable[_Union[Kind, str]]] = ..., name: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("function_id", "spec", "kind", "inputs", "vector", "wrt", "jacobian_mode", "layout", "order", "flatten", "shared", "output_dtype", "packed", "objective", "diagonal_estimator", "num_matvecs", "seed", "damping", "tolerance", "max_iterations", "sparse")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    JACOBIAN_MODE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    FLATTEN_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    DIAGONAL_ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    NUM_MATVECS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DAMPING_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    spec: FunctionSpec
    kind: Kind
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    vector: Tensor
    wrt: _containers.RepeatedScalarFieldContainer[str]
    jacobian_mode: JacobianMode
    layout: Layout
    order: int
    flatten: bool
    shared: _containers.RepeatedScalarFieldContainer[str]
    output_dtype: DType
    packed: bool
    objective: Objective
    diagonal_estimator: DiagonalEstimator
    num_matvecs: int
    seed: int
    damping: float
    tolerance: float
    max_iterations: int
    sparse: bool
    def __init__(self, function_id: _Optional[str] = ..., spec: _Optional[_Union[FunctionSpec, _Mapping]] = ..., kind: _Optional[_Union[Kind, str]] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., vector: _Optional[_Union[Tensor, _Mapping]] = ..., wrt: _Optional[_Iterable[str]] = ..., jacobian_mode: _Optional[_Union[JacobianMode, str]] = ..., layout: _Optional[_Union[Layout, str]] = ..., order: _Optional[int] = ..., flatten: bool = ..., shared: _Optional[_Iterable[str]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., packed: bool = ..., objective: _Optional[_Union[Objective, _Mapping]] = ..., diagonal_estimator: _Optional[_Union[DiagonalEstimator, str]] = ..., num_matvecs: _Optional[int] = ..., seed: _Optional[int] = ..., damping: _Optional[float] = ..., tolerance: _Optional[float] = ..., max_iterations: _Optional[int] = ..., sparse: bool = ...) -> None: ...

class SparsityPattern(_message.Message):
    __slots__ = ("shape", "nnz", "rows", "cols", "every_entry", "coloring", "colors", "passes", "dense_passes", "bytes_per_point", "dense_bytes_per_point", "dense_reason")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    EVERY_ENTRY_FIELD_NUMBER: _ClassVar[int]
    COLORING_FIELD_NUMBER: _ClassVar[int]
    COLORS_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    DENSE_PASSES_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_POINT_FIELD_NUMBER: _ClassVar[int]
    DENSE_BYTES_PER_POINT_FIELD_NUMBER: _ClassVar[int]
    DENSE_REASON_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    nnz: int
    rows: Tensor
    cols: Tensor
    every_entry: bool
    coloring: SparseColoring
    colors: int
    passes: int
    dense_passes: int
    bytes_per_point: int
    dense_bytes_per_point: int
    dense_reason: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., nnz: _Optional[int] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., cols: _Optional[_Union[Tensor, _Mapping]] = ..., every_entry: bool = ..., coloring: _Optional[_Union[SparseColoring, str]] = ..., colors: _Optional[int] = ..., passes: _Optional[int] = ..., dense_passes: _Optional[int] = ..., bytes_per_point: _Optional[int] = ..., dense_bytes_per_point: _Optional[int] = ..., dense_reason: _Optional[str] = ...) -> None: ...

class SparsityRequest(_message.Message):
    __slots__ = ("function_id", "spec", "kind", "wrt", "flatten", "jacobian_mode", "counts_only", "output_dtype")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    FLATTEN_FIELD_NUMBER: _ClassVar[int]
    JACOBIAN_MODE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_ONLY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    spec: FunctionSpec
    kind: Kind
    wrt: _containers.RepeatedScalarFieldContainer[str]
    flatten: bool
    jacobian_mode: JacobianMode
    counts_only: bool
    output_dtype: DType
    def __init__(self, function_id: _Optional[str] = ..., spec: _Optional[_Union[FunctionSpec, _Mapping]] = ..., kind: _Optional[_Union[Kind, str]] = ..., wrt: _Optional[_Iterable[str]] = ..., flatten: bool = ..., jacobian_mode: _Optional[_Union[JacobianMode, str]] = ..., counts_only: bool = ..., output_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class ComputeResponse(_message.Message):
    __slots__ = ("output", "outputs", "sparsity")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SPARSITY_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    outputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    sparsity: SparsityPattern
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., outputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., sparsity: _Optional[_Union[SparsityPattern, _Mapping]] = ...) -> None: ...

class SpectrumRequest(_message.Message):
    __slots__ = ("function_id", "spec", "inputs", "shared", "wrt", "method", "eigenvectors", "k", "tol", "gtol", "num_steps", "num_probes", "num_matvecs", "trace_estimator", "seed", "grid_size", "sigma", "objective")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    WRT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    EIGENVECTORS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TOL_FIELD_NUMBER: _ClassVar[int]
    GTOL_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROBES_FIELD_NUMBER: _ClassVar[int]
    NUM_MATVECS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GRID_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    spec: FunctionSpec
    inputs: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    shared: _containers.RepeatedScalarFieldContainer[str]
    wrt: _containers.RepeatedScalarFieldContainer[str]
    method: SpectrumMethod
    eigenvectors: bool
    k: int
    tol: float
    gtol: float
    num_steps: int
    num_probes: int
    num_matvecs: int
    trace_estimator: TraceEstimator
    seed: int
    grid_size: int
    sigma: float
    objective: Objective
    def __init__(self, function_id: _Optional[str] = ..., spec: _Optional[_Union[FunctionSpec, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., shared: _Optional[_Iterable[str]] = ..., wrt: _Optional[_Iterable[str]] = ..., method: _Optional[_Union[SpectrumMethod, str]] = ..., eigenvectors: bool = ..., k: _Optional[int] = ..., tol: _Optional[float] = ..., gtol: _Optional[float] = ..., num_steps: _Optional[int] = ..., num_probes: _Optional[int] = ..., num_matvecs: _Optional[int] = ..., trace_estimator: _Optional[_Union[TraceEstimator, str]] = ..., seed: _Optional[int] = ..., grid_size: _Optional[int] = ..., sigma: _Optional[float] = ..., objective: _Optional[_Union[Objective, _Mapping]] = ...) -> None: ...

class SpectrumResponse(_message.Message):
    __slots__ = ("eigenvalues", "eigenvectors", "gradient_norm", "point_class", "stationary", "tol", "gtol", "residuals", "trace", "trace_std_error", "nodes", "weights", "grid", "density")
    EIGENVALUES_FIELD_NUMBER: _ClassVar[int]
    EIGENVECTORS_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_NORM_FIELD_NUMBER: _ClassVar[int]
    POINT_CLASS_FIELD_NUMBER: _ClassVar[int]
    STATIONARY_FIELD_NUMBER: _ClassVar[int]
    TOL_FIELD_NUMBER: _ClassVar[int]
    GTOL_FIELD_NUMBER: _ClassVar[int]
    RESIDUALS_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    TRACE_STD_ERROR_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    eigenvalues: Tensor
    eigenvectors: Tensor
    gradient_norm: Tensor
    point_class: Tensor
    stationary: Tensor
    tol: Tensor
    gtol: Tensor
    residuals: Tensor
    trace: Tensor
    trace_std_error: Tensor
    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    def __init__(self, eigenvalues: _Optional[_Union[Tensor, _Mapping]] = ..., eigenvectors: _Optional[_Union[Tensor, _Mapping]] = ..., gradient_norm: _Optional[_Union[Tensor, _Mapping]] = ..., point_class: _Optional[_Union[Tensor, _Mapping]] = ..., stationary: _Optional[_Union[Tensor, _Mapping]] = ..., tol: _Optional[_Union[Tensor, _Mapping]] = ..., gtol: _Optional[_Union[Tensor, _Mapping]] = ..., residuals: _Optional[_Union[Tensor, _Mapping]] = ..., trace: _Optional[_Union[Tensor, _Mapping]] = ..., trace_std_error: _Optional[_Union[Tensor, _Mapping]] = ..., nodes: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., grid: _Optional[_Union[Tensor, _Mapping]] = ..., density: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StreamMessage(_message.Message):
    __slots__ = ("compute_request", "compute_response", "data", "put_request")
    COMPUTE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PUT_REQUEST_FIELD_NUMBER: _ClassVar[int]
    compute_request: ComputeRequest
    compute_response: ComputeResponse
    data: bytes
    put_request: PutRequest
    def __init__(self, compute_request: _Optional[_Union[ComputeRequest, _Mapping]] = ..., compute_response: _Optional[_Union[ComputeResponse, _Mapping]] = ..., data: _Optional[bytes] = ..., put_request: _Optional[_Union[PutRequest, _Mapping]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("tensor",)
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("handle", "nbytes")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    handle: str
    nbytes: int
    def __init__(self, handle: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("max_request_bytes", "max_output_bytes", "max_batch_bucket", "max_expression_chars", "max_functions", "max_exact_n", "allow_jax_export", "stream_threshold_bytes", "max_resident_bytes")
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BUCKET_FIELD_NUMBER: _ClassVar[int]
    MAX_EXPRESSION_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_EXACT_N_FIELD_NUMBER: _ClassVar[int]
    ALLOW_JAX_EXPORT_FIELD_NUMBER: _ClassVar[int]
    STREAM_THRESHOLD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_request_bytes: int
    max_output_bytes: int
    max_batch_bucket: int
    max_expression_chars: int
    max_functions: int
    max_exact_n: int
    allow_jax_export: bool
    stream_threshold_bytes: int
    max_resident_bytes: int
    def __init__(self, max_request_bytes: _Optional[int] = ..., max_output_bytes: _Optional[int] = ..., max_batch_bucket: _Optional[int] = ..., max_expression_chars: _Optional[int] = ..., max_functions: _Optional[int] = ..., max_exact_n: _Optional[int] = ..., allow_jax_export: bool = ..., stream_threshold_bytes: _Optional[int] = ..., max_resident_bytes: _Optional[int] = ...) -> None: ...

class ServerInfoResponse(_message.Message):
    __slots__ = ("version", "jax_version", "backend", "devices", "limits", "server_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    JAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    version: str
    jax_version: str
    backend: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    limits: Limits
    server_id: str
    def __init__(self, version: _Optional[str] = ..., jax_version: _Optional[str] = ..., backend: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_id: _Optional[str] = ...) -> None: ...
