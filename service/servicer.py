"""The gRPC servicer: validate and decode at the edge, hand work to the engine, map errors.

Every ServiceError raised below becomes its status code with its message; anything else is
a bug, logged with its traceback and answered INTERNAL. The server keeps serving either way.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
import jax
import numpy as np

from hessd.proto import codec, stream
from hessd.proto.kinds import (
    BuiltinLoss,
    DiagonalEstimator,
    JacobianMode,
    Kind,
    Layout,
    Method,
    Operator,
    Reduction,
    TraceEstimator,
)
from hessd.proto.v1 import hessd_pb2, hessd_pb2_grpc
from hessd.service import analysis, curvature, fastpath, kinds, objective, sparse
from hessd.service.batcher import Batcher
from hessd.service.config import ServerConfig, machine_memory
from hessd.service.engine import Engine, EngineRequest, Output
from hessd.service.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
)
from hessd.service.metrics import Metrics
from hessd.service.program import Program
from hessd.service.registry import Registry
from hessd.service.resident import ResidentStore
from hessd.service.security import EXPORT, Tokens
from hessd.service.variable import Wrt

__all__ = [
    "HessdServicer",
    "Streamed",
    "abort",
    "bounded",
    "compute_response",
    "failure_status",
    "stream_error",
    "stream_idle",
    "streams_busy",
]

logger = logging.getLogger(__name__)
E = TypeVar(
    "E",
    Kind,
    JacobianMode,
    Layout,
    Method,
    TraceEstimator,
    Operator,
    Reduction,
    BuiltinLoss,
    DiagonalEstimator,
)
_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")
# One line per call: id, method, function, kind, points, status, milliseconds.
request_log = logging.getLogger("hessd.requests")


def _rpc(
    method: Callable[[HessdServicer, _Request, grpc.ServicerContext], _Reply],
) -> Callable[[HessdServicer, _Request, grpc.ServicerContext], _Reply]:
    """Map ServiceError to its status, log and answer INTERNAL for anything else; one log
    line and the metrics for every call."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: HessdServicer, request: _Request, context: grpc.ServicerContext) -> _Reply:
        start = time.perf_counter()
        status, message = grpc.StatusCode.OK, ""
        try:
            return method(self, request, context)
        except Exception as e:
            status, message = failure_status(name, e, context.is_active())
        finally:
            summary = request.header if isinstance(request, Streamed) else request
            self.record(name, summary, context, status, time.perf_counter() - start)
        abort(context, status, message)

    return wrapper


@dataclasses.dataclass(frozen=True)
class Streamed:
    """A streamed request as received: its header, and the bytes of its tensors by stream
    name ("input 'x'", "vector", "the tensor to put"). The server's event loop reads the
    stream (service/handlers.py); the servicer computes on what it read."""

    header: Any
    data: dict[str, memoryview]

    @classmethod
    def of(cls, header: Any, buffers: list[memoryview]) -> Streamed:
        """From stream.Receiver's header and buffers, named as stream.tensors names them."""
        return cls(header, dict(zip((w for w, _ in stream.tensors(header)), buffers, strict=True)))


def streams_busy(limit: int) -> ResourceExhausted:
    """A stream refused because `limit` are being read (each transport reads at most half
    its --workers at once)."""
    return ResourceExhausted(
        f"{limit} streams are already being received, half this server's --workers; retry, "
        "or send requests under 1 MiB as unary calls"
    )


def stream_idle(seconds: float) -> Cancelled:
    """A stream cancelled for sending nothing for --stream-idle-seconds."""
    logger.info("a stream sent nothing for %g s: cancelled", seconds)
    return Cancelled(
        f"the stream sent nothing for {seconds:g} s, this server's --stream-idle-seconds; "
        "send its messages without pausing"
    )


def stream_error(error: Exception, flags: str) -> ServiceError | None:
    """The status of a failure while a stream was read: a declared size over the limit
    (`flags` names the limits), bytes that disagree with the header, or a ServiceError as
    is; None for anything else."""
    if isinstance(error, codec.LimitExceeded):
        return ResourceExhausted(f"{error}{flags}")
    if isinstance(error, codec.TensorError):
        return InvalidArgument(str(error))
    return error if isinstance(error, ServiceError) else None


# A status message travels in a header (percent-encoded beyond ASCII) under the peer's
# metadata limit (8 KiB by default): messages that echo a client's input are cut to fit.
MAX_MESSAGE_BYTES = 1536


def bounded(message: str) -> str:
    """`message`, cut with "…" to at most MAX_MESSAGE_BYTES of UTF-8."""
    if len(message.encode()) <= MAX_MESSAGE_BYTES:
        return message
    cut = message.encode()[: MAX_MESSAGE_BYTES - 3].decode(errors="ignore")
    return cut + "…"


def failure_status(name: str, error: Exception, active: bool) -> tuple[grpc.StatusCode, str]:
    """The status a call that raised `error` is answered with: a ServiceError's own; for
    anything else INTERNAL (logged with its traceback), unless the client has gone
    (`active` is false)."""
    if isinstance(error, ServiceError):
        return error.code, error.message
    if not active:
        # The client went away (cancelled a stream, or its deadline passed) while we read
        # from or wrote to it: not a bug, and nobody is left to answer.
        logger.info("%s: the client left (%s)", name, type(error).__name__)
        return grpc.StatusCode.CANCELLED, "the client cancelled the call"
    logger.exception("%s failed", name)
    return grpc.StatusCode.INTERNAL, "internal error in hessd; see server log"


def abort(context: grpc.ServicerContext, status: grpc.StatusCode, message: str) -> NoReturn:
    """context.abort with the message bounded; it always raises (grpc ships no types that
    say so)."""
    context.abort(status, bounded(message))
    raise AssertionError("grpc.ServicerContext.abort returned")


class HessdServicer(hessd_pb2_grpc.HessdServicer):
    """hessd.v1.Hessd over the server's parts, which server.HessdServer builds and owns."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        engine: Engine,
        batcher: Batcher,
        registry: Registry,
        metrics: Metrics,
        tokens: Tokens,
        resident: ResidentStore | None = None,
    ):
        self.config = config
        self.resident = (
            resident if resident is not None else ResidentStore(config.max_resident_bytes)
        )
        self.server_id = uuid.uuid4().hex
        self.engine = engine
        self.batcher = batcher
        self.registry = registry
        self.metrics = metrics
        self.tokens = tokens
        # What a repeated Compute needs, found by its first (service/fastpath.py).
        self.plans = fastpath.Plans()
        # A function dropped from the registry is dropped everywhere it is kept.
        registry.on_evict(self.forget)
        self._request_level = logging.INFO if config.log_requests else logging.DEBUG
        self._inflight_budget = config.max_inflight_bytes or machine_memory() // 2
        self._inflight = 0
        self._inflight_lock = threading.Lock()

    def forget(self, function_id: str) -> None:
        """Drop a function's plans, executables and batching state (registry eviction)."""
        self.plans.forget(function_id)
        self.engine.forget(function_id)
        self.batcher.forget(function_id)

    @_rpc
    def Register(
        self, request: hessd_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> hessd_pb2.RegisterResponse:
        program = self._register(request.spec, context, request.name)
        for kind_value in request.warmup_kinds:
            task = kinds.make_request(program, _enum(Kind, kind_value, "warmup kind"))
            for batch in request.warmup_batch_sizes:
                if batch < 1:
                    raise InvalidArgument(f"warmup batch sizes must be ≥ 1, got {batch}")
                self.engine.warmup(program, task, int(batch))
        return hessd_pb2.RegisterResponse(
            function_id=program.function_id,
            output_shape=program.output_shape,
            output_dtype=codec.dtype_to_proto(program.output_dtype),
        )

    @_rpc
    def Compute(
        self, request: hessd_pb2.ComputeRequest, context: grpc.ServicerContext
    ) -> hessd_pb2.ComputeResponse:
        if request.sparse:
            values, pattern, _ = self._compute_sparse(request, context)
            response = hessd_pb2.ComputeResponse(sparsity=pattern)
            codec.encode(values, out=response.output)
            return response
        planned = self._planned(request, context)
        if planned is not None:
            return compute_response(planned)
        return compute_response(self._compute(request, context))

    def _planned(
        self, request: hessd_pb2.ComputeRequest, context: grpc.ServicerContext
    ) -> Output | None:
        """The result of a Compute whose plan is known (service/fastpath.py), computed
        without redoing its checks; None when the full path must take it."""
        planned = self.plan_of(request)
        if planned is None:
            return None
        plan, args, _ = planned
        return self._run(plan.program, plan.task, args, context)

    def plan_of(
        self, request: hessd_pb2.ComputeRequest
    ) -> tuple[fastpath.Plan, list[np.ndarray], int] | None:
        """The plan of a Compute, its engine args (views of its bytes) and its number of
        points; None when the full path must take it: no plan for its key, bytes that do
        not match their shapes, or a function no longer registered as planned."""
        request_key = fastpath.key(request)
        plan = None if request_key is None else self.plans.get(request_key)
        if plan is None:
            return None
        decoded = plan.decode(request)
        if decoded is None:
            return None
        try:
            if self.registry.get(plan.program.function_id) is not plan.program:
                return None
        except NotFound:
            return None
        return plan, *decoded

    @_rpc
    def ComputeStream(self, request: Streamed, context: grpc.ServicerContext) -> Iterator[bytes]:
        """The result's StreamMessages, serialised (the transports send them as they are)."""
        header, data = request.header, request.data
        if header.sparse:
            values, pattern, indices = self._compute_sparse(header, context, data)
            response = hessd_pb2.ComputeResponse(sparsity=pattern)
            codec.encode(values, out=response.output, data=False)
            return stream.send_serialized("compute_response", response, [values, *indices])
        result = self._compute(header, context, data)
        response = hessd_pb2.ComputeResponse()
        for out, array in zip(_output_fields(response, result), _arrays(result), strict=True):
            codec.encode(array, out=out, data=False)
        return stream.send_serialized("compute_response", response, _arrays(result))

    def _compute_sparse(
        self,
        request: hessd_pb2.ComputeRequest,
        context: grpc.ServicerContext,
        data: dict[str, memoryview] | None = None,
    ) -> tuple[np.ndarray, hessd_pb2.SparsityPattern, list[np.ndarray]]:
        """A sparse jacobian or hessian: the values (batch, nnz), the pattern message (with
        its indices' bytes unless streamed) and the index arrays, for a stream."""
        program = self._program(request, context)
        kind = _enum(Kind, request.kind, "kind")
        given = [name for name in ("objective", "vector") if request.HasField(name)]
        given += [name for name in _NOT_SPARSE_OPTIONS if getattr(request, name)]
        if _enum(Layout, request.layout, "layout") is Layout.DENOMINATOR:
            given.append("layout=denominator (transpose the sparse result instead)")
        if given:
            raise InvalidArgument(
                f"sparse does not take {', '.join(given)}: a sparse {kind.value} is the "
                "(m, n) matrix of one variable in numerator layout"
            )
        output_dtype = None
        if request.output_dtype:
            output_dtype = _decode_enum(codec.dtype_from_proto, request.output_dtype)
        task = sparse.make_sparse_request(
            program,
            kind,
            tuple(request.wrt),
            _enum(JacobianMode, request.jacobian_mode, "jacobian_mode"),
            request.flatten,
            tuple(request.shared),
            output_dtype=output_dtype,
        )
        args, _ = _decode_inputs(program, request.inputs, task.shared, data, store=self.resident)
        values = self._run(program, task, args, context)
        assert isinstance(values, np.ndarray)  # one result: (batch, nnz)
        pattern, indices = sparse.to_wire(
            task.pattern, task.result_dtype(program), data=data is None
        )
        return values, pattern, indices

    @_rpc
    def Sparsity(
        self, request: hessd_pb2.SparsityRequest, context: grpc.ServicerContext
    ) -> hessd_pb2.SparsityPattern:
        program = self._program(request, context)
        kind = _enum(Kind, request.kind, "kind")
        task = sparse.make_sparse_request(
            program,
            kind,
            tuple(request.wrt),
            _enum(JacobianMode, request.jacobian_mode, "jacobian_mode"),
            request.flatten,
        )
        dtype = program.output_dtype
        if request.output_dtype:
            dtype = _decode_enum(codec.dtype_from_proto, request.output_dtype)
        return sparse.to_wire(task.pattern, dtype, indices=not request.counts_only)[0]

    def _compute(
        self,
        request: hessd_pb2.ComputeRequest,
        context: grpc.ServicerContext,
        data: dict[str, memoryview] | None = None,
    ) -> Output:
        """The result of a ComputeRequest: an array, or a dict of named arrays. `data`
        holds the bytes of streamed tensors by stream name ("input 'x'", "vector")."""
        program = self._program(request, context)
        kind = _enum(Kind, request.kind, "kind")
        if kind.is_curvature or request.HasField("objective"):
            return self._compute_curvature(program, kind, request, context, data)
        for name in ("diagonal_estimator", "num_matvecs", "seed", "damping", "tolerance",
                     "max_iterations"):  # fmt: skip
            if getattr(request, name):
                raise InvalidArgument(
                    f"{name} does not apply to kind {kind.value}; it applies to diagonal "
                    "and solve (and fisher's seed is objective.seed)"
                )
        output_dtype = None
        if request.output_dtype:
            output_dtype = _decode_enum(codec.dtype_from_proto, request.output_dtype)
        task = kinds.make_request(
            program,
            kind,
            tuple(request.wrt),
            _enum(JacobianMode, request.jacobian_mode, "jacobian_mode"),
            _enum(Layout, request.layout, "layout"),
            request.order,
            request.flatten,
            tuple(request.shared),
            output_dtype=output_dtype,
            packed=request.packed,
        )
        args, batch = _decode_inputs(
            program, request.inputs, task.shared, data, store=self.resident
        )
        vector = _decode_vector(program, task, request, batch, data, store=self.resident)
        if vector is not None:
            args.append(vector)
        result = self._run(program, task, args, context)
        if data is None:
            # Checked and computed: a call that differs only in its points' values and
            # number takes the fast path from now on.
            self.plans.remember(request, program, task)
        return result

    def _compute_curvature(
        self,
        program: Program,
        kind: Kind,
        request: hessd_pb2.ComputeRequest,
        context: grpc.ServicerContext,
        data: dict[str, memoryview] | None,
    ) -> Output:
        """A Compute over an objective, or of a curvature kind: flat variable, no layout."""
        defaults = {"jacobian_mode": JacobianMode.AUTO.wire, "layout": Layout.NUMERATOR.wire}
        for name in ("jacobian_mode", "layout", "order", "packed", "output_dtype"):
            if getattr(request, name) not in (0, defaults.get(name)):
                raise InvalidArgument(
                    f"{name} does not apply to kind {kind.value} "
                    + ("over an objective" if request.HasField("objective") else "")
                    + "; its results are over the flat variable (p,)"
                )
        estimator = None
        if request.diagonal_estimator:
            estimator = _enum(DiagonalEstimator, request.diagonal_estimator, "diagonal_estimator")
        options = objective.CurvatureOptions(
            estimator=estimator,
            num_matvecs=request.num_matvecs,
            seed=request.seed,
            damping=request.damping,
            tolerance=request.tolerance,
            max_iterations=request.max_iterations,
        )
        wrt = program.wrt(tuple(request.wrt), flatten=True)
        p = sum(math.prod(program.inputs[i].shape) for i in wrt.indices)
        columns = objective.columns(
            kind, p, estimator=estimator, num_matvecs=request.num_matvecs,
            max_exact_n=self.config.max_exact_n,
        )  # fmt: skip
        dataset = self._dataset(program, request, wrt, columns, data)
        args, shared, batch = self._point_args(program, request, wrt, dataset, data)
        task = objective.make_curvature_request(
            program,
            kind,
            wrt,
            shared,
            dataset.objective if dataset else curvature.NO_DATA,
            options,
            self.config.max_exact_n,
        )
        if task.vector_signature(program):
            what = kind.vector_name
            if not request.HasField("vector"):
                raise InvalidArgument(f"{what} is missing: set vector, one per point")
            vector = _decode(
                request.vector, "vector" if data is not None else what, data, self.resident
            )
            _check_points(vector, (p,), program.output_dtype, what)
            if vector.shape[0] != batch:
                raise InvalidArgument(
                    f"{what} has {vector.shape[0]} rows but there are {batch} points"
                )
            args.append(vector)
        elif request.HasField("vector"):
            raise InvalidArgument(f"kind {kind.value} takes no vector")
        if dataset is not None:
            task = dataclasses.replace(
                task, shared=(*shared, *range(len(args), len(args) + len(dataset.arrays)))
            )
            args.extend(dataset.arrays)
        return self._run(program, task, args, context)

    def _dataset(
        self,
        program: Program,
        request: hessd_pb2.ComputeRequest | hessd_pb2.SpectrumRequest,
        wrt: Wrt,
        columns: int,
        data: dict[str, memoryview] | None = None,
    ) -> objective.DataSet | None:
        """The request's objective, checked; None without one."""
        if not request.HasField("objective"):
            return None
        message = request.objective
        arrays: dict[str, np.ndarray] = {}
        for item in message.data:
            if item.name in arrays:
                raise InvalidArgument(f"objective.data {item.name!r} is given twice")
            what = f"data {item.name!r}"
            arrays[item.name] = _decode(item.tensor, what, data, self.resident)
        loss: BuiltinLoss | str | None = None
        if message.HasField("loss"):
            match message.loss.WhichOneof("loss"):
                case "builtin":
                    loss = _enum(BuiltinLoss, message.loss.builtin, "objective.loss.builtin")
                case "expression":
                    loss = message.loss.expression
                    if len(loss) > self.config.max_expression_chars:
                        raise ResourceExhausted(
                            f"objective.loss.expression has {len(loss)} characters, over this "
                            f"server's limit of {self.config.max_expression_chars}"
                        )
                case _:
                    raise InvalidArgument(
                        "objective.loss is set but empty: give builtin (mse, "
                        "softmax_cross_entropy) or an expression"
                    )
        options = objective.ObjectiveOptions(
            data=arrays,
            reduction=_enum(Reduction, message.reduction, "objective.reduction"),
            chunk_size=message.chunk_size,
            operator=_enum(Operator, message.operator, "objective.operator"),
            loss=loss,
            target=message.loss.target,
            seed=message.seed,
            mc_samples=message.mc_samples,
        )
        return objective.make_objective(
            program,
            options,
            wrt,
            tuple(request.shared),
            columns,
            self.config.chunk_bytes or curvature.device_budget(),
            curvature.device_memory_bytes(),
        )

    def _point_args(
        self,
        program: Program,
        request: hessd_pb2.ComputeRequest | hessd_pb2.SpectrumRequest,
        wrt: Wrt,
        dataset: objective.DataSet | None,
        data: dict[str, memoryview] | None = None,
    ) -> tuple[list[np.ndarray], tuple[int, ...], int]:
        """The inputs that are not data, decoded, with the positions of the shared ones
        among them and the number of points."""
        excluded = dataset.names if dataset else frozenset()
        shared_names = tuple(request.shared)
        program_shared = kinds.shared_indices(program, shared_names)
        for i in wrt.indices:
            if i in program_shared:
                raise InvalidArgument(
                    f"wrt input {program.inputs[i].name!r} is shared; the variable has one "
                    "value per point (checkpoints), so send it with a batch axis"
                )
        slots = [i for i, s in enumerate(program.inputs) if s.name not in excluded]
        args, batch = _decode_inputs(
            program, request.inputs, program_shared, data, store=self.resident, exclude=excluded
        )
        shared = tuple(k for k, i in enumerate(slots) if i in program_shared)
        return args, shared, batch

    @_rpc
    def Spectrum(
        self, request: hessd_pb2.SpectrumRequest, context: grpc.ServicerContext
    ) -> hessd_pb2.SpectrumResponse:
        program = self._program(request, context)
        estimator = None
        if request.trace_estimator:
            estimator = _enum(TraceEstimator, request.trace_estimator, "trace_estimator")
        method = _enum(Method, request.method, "method")
        dataset = None
        if request.HasField("objective"):
            wrt = program.wrt(tuple(request.wrt), flatten=True)
            p = sum(math.prod(program.inputs[i].shape) for i in wrt.indices)
            columns = objective.columns(None, p, method=method, num_matvecs=request.num_matvecs)
            dataset = self._dataset(program, request, wrt, columns)
        task = analysis.make_spectrum_request(
            program,
            _enum(Method, request.method, "method"),
            tuple(request.wrt),
            shared=tuple(request.shared),
            eigenvectors=request.eigenvectors,
            k=request.k,
            num_steps=request.num_steps,
            num_probes=request.num_probes,
            num_matvecs=request.num_matvecs,
            estimator=estimator,
            seed=request.seed,
            grid_size=request.grid_size,
            tol=request.tol if request.HasField("tol") else None,
            gtol=request.gtol if request.HasField("gtol") else None,
            sigma=request.sigma if request.HasField("sigma") else None,
            max_exact_n=self.config.max_exact_n,
            objective=dataset.objective if dataset else curvature.NO_DATA,
        )
        if dataset is None:
            args, _ = _decode_inputs(program, request.inputs, task.shared, store=self.resident)
        else:
            args, shared, _ = self._point_args(program, request, task.wrt, dataset)
            data_positions = range(len(args), len(args) + len(dataset.arrays))
            task = dataclasses.replace(task, shared=(*shared, *data_positions))
            args.extend(dataset.arrays)
        result = self._run(program, task, args, context)
        assert isinstance(result, dict)  # a spectrum has named fields
        response = hessd_pb2.SpectrumResponse()
        for name, array in result.items():
            codec.encode(array, out=getattr(response, name))
        return response

    def _run(
        self,
        program: Program,
        task: EngineRequest,
        args: list[np.ndarray],
        context: grpc.ServicerContext,
    ) -> Output:
        """Check the output size against the limit, then run on the engine, unless the
        caller has gone (cancelled, or its deadline passed) in the meantime."""
        batch = next(a for i, a in enumerate(args) if i not in task.shared).shape[0]
        nbytes = self.check_output(program, task, batch)
        start = time.perf_counter()
        bound = self.config.max_call_seconds
        give_up = start + bound if bound else math.inf
        expired = False

        def is_active() -> bool:
            nonlocal expired
            expired = expired or time.perf_counter() > give_up
            return context.is_active() and not expired

        # Coalesced with concurrent calls of the same computation; a caller that has gone
        # (cancelled, deadline passed, or past --max-call-seconds) is dropped before compute
        # and between chunks of points.
        # Arguments, result and the intermediates of a chunk (XLA's memory analysis, known
        # once its executable is compiled).
        temp = self.engine.temp_bytes(program, task, args)
        held = self.admit(sum(a.nbytes for a in args) + nbytes + temp)
        try:
            result = self.batcher.run(program, task, args, is_active=is_active)
        except Cancelled:
            if expired:
                raise self.overran() from None
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise self.deadline_passed() from None
            raise
        finally:
            self.release(held)
        self.metrics.observe_compute(task.label, time.perf_counter() - start)
        return result

    def overran(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the call ran past this server's bound of {self.config.max_call_seconds:g} s per "
            "call (--max-call-seconds); send fewer points per call"
        )

    @staticmethod
    def deadline_passed() -> DeadlineExceeded:
        return DeadlineExceeded(
            "the call's deadline passed before its result was computed; give it a longer "
            "timeout, or send fewer points per call"
        )

    def check_output(self, program: Program, task: EngineRequest, batch: int) -> int:
        """The bytes of the result for `batch` points; ResourceExhausted over the limit."""
        shapes = task.output_shapes(program)
        dtype = task.result_dtype(program)
        per_point = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
        nbytes = batch * per_point
        limit = self.config.max_output_bytes
        if max(nbytes, per_point) > limit:
            described = ", ".join(f"{name} {(batch, *shape)}" for name, shape in shapes.items())
            if per_point > limit:
                advice = (
                    f"one point alone is {per_point} bytes, so fewer points cannot help: "
                    + _smaller_result_advice(task)
                )
            else:
                advice = "send fewer points per request"
            raise ResourceExhausted(
                f"the result for {batch} points would be {described} of {dtype.name}, "
                f"{nbytes} bytes, over this server's limit of {limit} bytes "
                f"(--max-output-bytes); {advice}"
            )
        return nbytes

    def admit(self, need: int) -> int:
        """Hold `need` bytes of the in-flight budget (--max-inflight-bytes: requests and
        results of every call computing), or refuse the call: RESOURCE_EXHAUSTED."""
        budget = self._inflight_budget
        with self._inflight_lock:
            if need > budget or self._inflight + need > budget:
                in_flight = self._inflight
            else:
                self._inflight += need
                return need
        if need > budget:
            raise ResourceExhausted(
                f"this call holds {need} bytes of arguments and results, over this server's "
                f"budget of {budget} bytes for all calls in flight (--max-inflight-bytes); "
                "send fewer points per call"
            )
        raise ResourceExhausted(
            f"this call needs {need} bytes and {in_flight} of this server's {budget} bytes "
            "for calls in flight (--max-inflight-bytes) are taken; retry shortly"
        )

    def release(self, held: int) -> None:
        with self._inflight_lock:
            self._inflight -= held

    @_rpc
    def Put(
        self, request: hessd_pb2.PutRequest, context: grpc.ServicerContext
    ) -> hessd_pb2.PutResponse:
        array = _decode(request.tensor, "the tensor to put")
        return hessd_pb2.PutResponse(handle=self.resident.put(array), nbytes=array.nbytes)

    @_rpc
    def PutStream(self, request: Streamed, context: grpc.ServicerContext) -> hessd_pb2.PutResponse:
        array = _decode(request.header.tensor, "the tensor to put", request.data)
        return hessd_pb2.PutResponse(handle=self.resident.put(array), nbytes=array.nbytes)

    @_rpc
    def ServerInfo(
        self, request: hessd_pb2.ServerInfoRequest, context: grpc.ServicerContext
    ) -> hessd_pb2.ServerInfoResponse:
        c = self.config
        return hessd_pb2.ServerInfoResponse(
            server_id=self.server_id,
            version=importlib.metadata.version("hessd"),
            jax_version=jax.__version__,
            backend=jax.default_backend(),
            devices=[
                hessd_pb2.Device(id=d.id, platform=d.platform, kind=d.device_kind)
                for d in jax.devices()
            ],
            limits=hessd_pb2.Limits(
                max_request_bytes=c.max_request_bytes,
                max_output_bytes=c.max_output_bytes,
                max_batch_bucket=c.max_batch_bucket,
                max_expression_chars=c.max_expression_chars,
                max_functions=c.max_functions,
                max_exact_n=c.max_exact_n,
                allow_jax_export=c.allow_jax_export,
                stream_threshold_bytes=stream.CHUNK_BYTES,
                max_resident_bytes=c.max_resident_bytes,
            ),
        )

    def _program(
        self,
        request: hessd_pb2.ComputeRequest | hessd_pb2.SpectrumRequest | hessd_pb2.SparsityRequest,
        context: grpc.ServicerContext,
    ) -> Program:
        match request.WhichOneof("function"):
            case "function_id":
                return self.registry.get(request.function_id)
            case "spec":
                return self._register(request.spec, context)
        raise InvalidArgument("the request names no function: set function_id or spec")

    def _register(
        self, spec: hessd_pb2.FunctionSpec, context: grpc.ServicerContext, name: str = ""
    ) -> Program:
        if spec.WhichOneof("body") == "jax_export":
            principal = self.tokens.identify(context.invocation_metadata())
            if principal is None or EXPORT not in principal.permissions:
                raise PermissionDenied(
                    f"token {principal.name if principal else None!r} may not register "
                    "jax_export specs: it lacks the 'export' permission (tokens file)"
                )
        return self.registry.register(spec, name)

    def record(
        self,
        method: str,
        request: Any,
        context: grpc.ServicerContext,
        status: grpc.StatusCode,
        seconds: float,
    ) -> None:
        """One structured log line per call (no tensor data), and the metrics. `request` is
        the request message `method` received (a stream's header)."""
        kind = "-"
        try:
            if method in ("Compute", "ModelInfer"):  # ModelInfer: see service/oip.py
                kind = Kind.from_wire(request.kind).value
            elif method == "Spectrum":
                kind = Method.from_wire(request.method).value
        except ValueError:
            pass  # an unknown value, already refused
        points = next(
            (t.tensor.shape[0] for t in getattr(request, "inputs", ())
             if t.name not in request.shared and t.tensor.shape),
            0,
        )  # fmt: skip
        function = getattr(request, "function_id", "") or (
            "inline" if method != "ServerInfo" else "-"
        )
        self.record_call(method, kind, points, function, context, status, seconds)

    def record_call(
        self,
        method: str,
        kind: str,
        points: int,
        function: str,
        context: grpc.ServicerContext,
        status: grpc.StatusCode,
        seconds: float,
    ) -> None:
        """record() with its fields known (the fast path knows them from its plan)."""
        # The line is opt-in (--log-requests logs it at INFO; otherwise it is DEBUG): at
        # thousands of small calls a second it cost more than the engine's share of a call.
        level = self._request_level
        if request_log.isEnabledFor(level):
            request_id = (
                dict(context.invocation_metadata() or ()).get("x-request-id")
                or (uuid.uuid4().hex[:16])
            )
            request_log.log(
                level,
                "id=%s method=%s function=%s kind=%s points=%d status=%s ms=%.2f",
                request_id, method, function[:16], kind, points, status.name, 1e3 * seconds,
            )  # fmt: skip
        self.metrics.observe_call(method, kind, status.name, seconds, points)


# ComputeRequest options that a sparse jacobian or hessian does not take.
_NOT_SPARSE_OPTIONS = (
    "packed", "order", "diagonal_estimator", "num_matvecs", "seed", "damping", "tolerance",
    "max_iterations",
)  # fmt: skip


def _enum(enum_type: type[E], value: int, name: str) -> E:
    """The member of a wire enum value; InvalidArgument naming the known ones otherwise."""
    try:
        return enum_type.from_wire(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum_type)
        raise InvalidArgument(f"unknown {name} {value}; use one of {choices}") from None


def _smaller_result_advice(task: EngineRequest) -> str:
    """What makes one point's result smaller, for this request."""
    ways = []
    if isinstance(task, kinds.Request):
        if task.kind is Kind.HESSIAN and not task.packed:
            ways.append("packed=True (the upper triangle of a scalar function's Hessian)")
        if task.output_dtype is None or task.output_dtype.itemsize > 2:
            ways.append("output_dtype='float16' or 'bfloat16' (or 'float32' for float64)")
        if task.kind in (Kind.HESSIAN, Kind.JACOBIAN):
            ways.append("sparse=True, if the matrix is sparse (sparsity() tells its nonzeros)")
            ways.append("hvp, jvp or vjp, which never form the matrix")
    elif isinstance(task, sparse.SparseRequest):
        if task.output_dtype is None or task.output_dtype.itemsize > 2:
            ways.append("output_dtype='float16' or 'bfloat16' (or 'float32' for float64)")
        ways.append("hvp, jvp or vjp, which never form the matrix")
    else:
        ways.append("method lanczos, trace or density, or eigenvectors=False")
    ways.append("a server started with a larger --max-output-bytes")
    return "use " + "; or ".join(ways)


def _decode(
    tensor: hessd_pb2.Tensor,
    what: str,
    data: dict[str, memoryview] | None = None,
    store: ResidentStore | None = None,
) -> np.ndarray:
    """The array of a Tensor: its bytes (inline, or streamed in `data` under `what`), or
    the resident tensor its handle names."""
    if tensor.handle:
        if store is None:
            raise InvalidArgument(f"{what} names a resident tensor, which is not accepted here")
        if tensor.data:
            raise InvalidArgument(f"{what} has both a handle and data; send one of them")
        array = store.get(tensor.handle, what)
        if tensor.dtype and codec.dtype_to_proto(array.dtype) != tensor.dtype:
            raise InvalidArgument(
                f"{what}: the resident tensor is {array.dtype.name}, the request says "
                f"{hessd_pb2.DType.Name(tensor.dtype)}"
            )
        if tensor.shape and tuple(tensor.shape) != array.shape:
            raise InvalidArgument(
                f"{what}: the resident tensor has shape {array.shape}, the request says "
                f"{tuple(tensor.shape)}"
            )
        return array
    try:
        return codec.decode(tensor, what, None if data is None else data[what])
    except codec.TensorError as e:
        raise InvalidArgument(str(e)) from None


def _decode_enum(decode: Callable[[int], np.dtype], value: int) -> np.dtype:
    try:
        return decode(value)
    except codec.TensorError as e:
        raise InvalidArgument(f"output_dtype: {e}") from None


def compute_response(result: Output) -> hessd_pb2.ComputeResponse:
    """The ComputeResponse of a result: one array, or named ones."""
    response = hessd_pb2.ComputeResponse()
    for out, array in zip(_output_fields(response, result), _arrays(result), strict=True):
        codec.encode(array, out=out)
    return response


def _output_fields(response: hessd_pb2.ComputeResponse, result: Output) -> list[hessd_pb2.Tensor]:
    """The Tensor fields of `response` that `result` (array or dict) fills, in order."""
    if isinstance(result, dict):
        return [response.outputs.add(name=name).tensor for name in result]
    return [response.output]


def _arrays(result: Output) -> list[np.ndarray]:
    return list(result.values()) if isinstance(result, dict) else [result]


def _decode_inputs(
    program: Program,
    named: Iterable[hessd_pb2.NamedTensor],
    shared: tuple[int, ...],
    data: dict[str, memoryview] | None = None,
    *,
    store: ResidentStore | None = None,
    exclude: frozenset[str] = frozenset(),
) -> tuple[list[np.ndarray], int]:
    """One array per input of `program` not in `exclude` (which come from a data set), in
    its order, and the batch size. Each is checked: (batch, *shape), or (*shape) for the
    shared ones."""
    by_name: dict[str, hessd_pb2.Tensor] = {}
    for item in named:
        if item.name in by_name:
            raise InvalidArgument(f"input {item.name!r} is given twice")
        by_name[item.name] = item.tensor
    expected = [s.name for s in program.inputs if s.name not in exclude]
    in_data = sorted(set(by_name) & exclude)
    if in_data:
        raise InvalidArgument(
            f"inputs {in_data} are given both per point and in objective.data; give each once"
        )
    unknown = sorted(set(by_name) - set(expected))
    missing = [n for n in expected if n not in by_name]
    if unknown or missing:
        raise InvalidArgument(
            f"the function takes inputs {expected}"
            + (" besides its data" if exclude else "")
            + "; "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"unknown {unknown}" if unknown else "")
        )
    arrays = []
    batch = first = None
    for i, signature in enumerate(program.inputs):
        if signature.name in exclude:
            continue
        what = f"input {signature.name!r}"
        array = _decode(by_name[signature.name], what, data, store)
        if i in shared:
            if array.shape != signature.shape or array.dtype != signature.dtype:
                raise InvalidArgument(
                    f"shared {what} has shape {array.shape} {array.dtype.name}; a shared input "
                    f"is sent once, without a batch axis: {signature.shape} "
                    f"{signature.dtype.name}"
                )
        else:
            _check_points(array, signature.shape, signature.dtype, what)
            if batch is not None and array.shape[0] != batch:
                raise InvalidArgument(
                    f"{what} has {array.shape[0]} points but {first!r} has {batch}; every "
                    "input needs the same batch size (send parameters once with shared)"
                )
            batch, first = array.shape[0], signature.name
        arrays.append(array)
    # shared_indices keeps at least one input per point, so a batch size was read.
    assert batch is not None
    return arrays, batch


def _decode_vector(
    program: Program,
    task: kinds.Request,
    request: hessd_pb2.ComputeRequest,
    batch: int,
    data: dict[str, memoryview] | None = None,
    *,
    store: ResidentStore | None = None,
) -> np.ndarray | None:
    given = request.HasField("vector")
    if not task.takes_vector:
        if given:
            raise InvalidArgument(
                f"kind {task.kind.value} takes no vector; only "
                + ", ".join(k.value for k in Kind if k.takes_vector)
                + " do"
            )
        return None
    what = task.kind.vector_name
    if not given:
        raise InvalidArgument(f"{what} is missing: set vector, one per point")
    vector = _decode(request.vector, "vector" if data is not None else what, data, store)
    _check_points(vector, task.vector_shape(program), task.vector_dtype(program), what)
    if vector.shape[0] != batch:
        raise InvalidArgument(f"{what} has {vector.shape[0]} rows but there are {batch} points")
    return vector


def _check_points(array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    try:
        codec.check_points(array, shape, dtype, what)
    except codec.TensorError as e:
        raise InvalidArgument(str(e)) from None
