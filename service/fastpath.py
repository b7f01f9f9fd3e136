"""What a repeated Compute needs, found once: the fast path's plans.

A Compute's checks (the function, the kind and its options, the inputs' names, dtypes and
per-point shapes, the vector's) depend only on what this module calls its key, not on the
points' values or number. The first call of a key takes the full path (servicer.py), and
once it has succeeded the servicer remembers its Plan: the program, the engine request, and
where each input of such a request goes. A later call with an equal key is decoded by the
plan (a view of each tensor's bytes, their lengths and batch sizes checked) and goes
straight to the batcher. Anything the plan cannot vouch for (a handle, an inline spec, an
objective, sparse, a tensor whose bytes do not match its shape, a function no longer
registered) takes the full path, which gives the same answer or the same error.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Sequence

import numpy as np

from hessd.proto import codec
from hessd.proto.kinds import Kind
from hessd.proto.v1 import hessd_pb2
from hessd.service.engine import Engine, EngineRequest
from hessd.service.program import Program

__all__ = ["QUICK_SECONDS", "Plan", "Plans", "key"]

# The ComputeRequest fields `key` reads. A field added to the message must be added here,
# or to the ones that keep a request off the fast path (tests/test_fastpath.py checks).
KEYED = frozenset(
    {"function_id", "kind", "inputs", "vector", "wrt", "jacobian_mode", "layout", "order",
     "flatten", "shared", "output_dtype", "packed"}
)  # fmt: skip
SLOW = frozenset(
    {"spec", "objective", "diagonal_estimator", "num_matvecs", "seed", "damping", "tolerance",
     "max_iterations", "sparse"}
)  # fmt: skip


def key(request: hessd_pb2.ComputeRequest) -> tuple | None:
    """What a Compute's checks depend on; None for a request the fast path does not take."""
    if (
        not request.function_id
        or request.sparse
        or request.HasField("objective")
        or request.diagonal_estimator
        or request.num_matvecs
        or request.seed
        or request.damping
        or request.tolerance
        or request.max_iterations
    ):
        return None
    shared = tuple(request.shared)
    inputs = []
    for item in request.inputs:
        tensor = item.tensor
        if tensor.handle:
            return None
        shape = tuple(tensor.shape)
        # A shared input's whole shape; a per-point one's without its batch size.
        inputs.append(
            (item.name, tensor.dtype, shape if item.name in shared else (len(shape), shape[1:]))
        )
    vector = None
    if request.HasField("vector"):
        tensor = request.vector
        if tensor.handle:
            return None
        shape = tuple(tensor.shape)
        vector = (tensor.dtype, len(shape), shape[1:])
    return (
        request.function_id,
        request.kind,
        tuple(request.wrt),
        request.jacobian_mode,
        request.layout,
        request.order,
        request.flatten,
        shared,
        request.output_dtype,
        request.packed,
        tuple(inputs),
        vector,
    )


# The longest an engine call may be expected to take to run on the event loop itself.
QUICK_SECONDS = 0.002


@dataclasses.dataclass(eq=False)
class Plan:
    """How to run a request of one key: its program and engine request, and for each
    input of the request (in the request's order) its position among the engine's args;
    and how long its last engine call took, for how many points."""

    program: Program
    task: EngineRequest
    positions: tuple[int, ...]
    shared: frozenset[int]
    vector: bool
    point_bytes: int  # of one point's result
    label: str  # the kind, for the request log and metrics
    seconds: float = math.inf
    points: int = 1
    # By batch size: the intermediates of its executable once compiled (Engine.temp_bytes).
    temps: dict[int, int] = dataclasses.field(default_factory=dict)

    def temp_bytes(self, batch: int, engine: Engine, args: Sequence[np.ndarray]) -> int:
        """Engine.temp_bytes of a call of `batch` points, found once per batch size."""
        temp = self.temps.get(batch)
        if temp is None:
            temp = engine.temp_bytes(self.program, self.task, args)
            if temp:  # 0 until compiled
                if len(self.temps) >= 64:
                    self.temps.clear()
                self.temps[batch] = temp
        return temp

    def timed(self, seconds: float, points: int) -> None:
        self.seconds, self.points = seconds, points

    def expected_seconds(self, points: int) -> float:
        """The last engine call's time, scaled to `points` (never below it)."""
        return self.seconds * max(1.0, points / self.points)

    def decode(self, request: hessd_pb2.ComputeRequest) -> tuple[list[np.ndarray], int] | None:
        """The engine's args (views of the request's bytes) and the number of points, or
        None when the bytes do not match the shapes (the full path says how)."""
        args: list[np.ndarray] = [None] * (len(self.positions) + self.vector)  # type: ignore[list-item]
        batch = -1
        try:
            for item, position in zip(request.inputs, self.positions, strict=True):
                array = args[position] = codec.decode(item.tensor)
                if position not in self.shared:
                    if batch >= 0 and array.shape[0] != batch:
                        return None
                    batch = array.shape[0]
            if self.vector:
                array = args[-1] = codec.decode(request.vector)
                if array.shape[0] != batch:
                    return None
        except codec.TensorError:
            return None
        if batch <= 0:
            return None
        return args, batch


class Plans:
    """The plans of the keys seen, least recently used evicted past `capacity`."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._plans: collections.OrderedDict[tuple, Plan] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # calls that found their plan

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, request_key: tuple) -> Plan | None:
        with self._lock:
            plan = self._plans.get(request_key)
            if plan is not None:
                self._plans.move_to_end(request_key)
                self.hits += 1
            return plan

    def remember(
        self, request: hessd_pb2.ComputeRequest, program: Program, task: EngineRequest
    ) -> None:
        """Keep the plan of `request`, which the full path has just checked and run."""
        request_key = key(request)
        if request_key is None:
            return
        order = {spec.name: i for i, spec in enumerate(program.inputs)}
        shared = frozenset(order[name] for name in request.shared)
        positions = tuple(order[item.name] for item in request.inputs)
        shapes = task.output_shapes(program).values()
        point_bytes = (
            sum(math.prod(shape) for shape in shapes) * task.result_dtype(program).itemsize
        )
        kind = Kind.from_wire(request.kind).value
        plan = Plan(program, task, positions, shared, request.HasField("vector"), point_bytes, kind)
        with self._lock:
            self._plans[request_key] = plan
            self._plans.move_to_end(request_key)
            while len(self._plans) > self.capacity:
                self._plans.popitem(last=False)

    def forget(self, function_id: str) -> None:
        """Drop the plans of a function (evicted from the registry)."""
        with self._lock:
            for request_key in [k for k in self._plans if k[0] == function_id]:
                del self._plans[request_key]
