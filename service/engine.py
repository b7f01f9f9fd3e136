"""The engine: owns compilation, the executable cache and the device.

A request runs as `jit(vmap(transform))` of its Program, compiled ahead of time for a
batch bucket (the batch size rounded up to a power of two) so that a new batch size in a
known bucket reuses an executable. Executables are cached by

    (function id, request, per-point input shapes and dtypes, bucket)

in a bounded LRU. Batches above the largest bucket run in chunks of that size.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import logging
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hessd.service.errors import Cancelled, InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    from hessd.service.compile_guard import CompileGuard
    from hessd.service.program import Program

__all__ = ["Engine", "EngineRequest", "EngineStats", "Output", "bucket_for"]

logger = logging.getLogger(__name__)

Output = np.ndarray | dict[str, np.ndarray]


class EngineRequest(abc.ABC):
    """What the engine runs of a Program (kinds.Request, analysis.SpectrumRequest).

    Implementations are frozen dataclasses: hashable, since a request is part of the
    executable cache key. `shared` holds the indices of the args that have no batch axis.
    """

    shared: tuple[int, ...]

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """The kind or method, for logs and metrics ("gradient", "lanczos")."""

    @abc.abstractmethod
    def transform(self, program: Program) -> Callable[..., Any]:
        """The function of the batched args, returning an array or a dict of arrays."""

    @abc.abstractmethod
    def output_shapes(self, program: Program) -> dict[str, tuple[int, ...]]:
        """Each result's shape at one point, by name ("output" when there is one)."""

    @abc.abstractmethod
    def result_dtype(self, program: Program) -> np.dtype:
        """The dtype the results travel in."""

    def vector_signature(self, program: Program) -> list[tuple[tuple[int, ...], np.dtype]]:
        """(shape of one point, dtype) of each arg after the program's inputs."""
        return []

    def max_chunk(self, program: Program) -> int | None:
        """How many points may run at once, if fewer than the engine's largest bucket."""
        return None

    def on_host(self, result: Output) -> Output:
        """The result as it is answered, from what the device returned (packing on the CPU)."""
        return result

    @property
    def coalesces(self) -> bool:
        """Whether concurrent equal calls may share one device call (the batcher's dynamic
        batching). Requests over whole data sets say no: they are long, rarely concurrent
        and equal, and hashing their data for the batcher's key would cost more than it
        saves."""
        return True


def bucket_for(batch: int, max_bucket: int) -> int:
    """The smallest power of two ≥ batch, capped at max_bucket."""
    return min(1 << max(batch - 1, 0).bit_length(), max_bucket)


@dataclasses.dataclass
class EngineStats:
    """Counters of the executable cache; `compiles` counts XLA compilations."""

    compiles: int = 0
    compile_seconds: float = 0.0
    hits: int = 0
    misses: int = 0


class Engine:
    """Runs derivative requests with cached, bucketed executables on the local devices.

    With several devices (GPUs, or CPU devices from
    XLA_FLAGS=--xla_force_host_platform_device_count=N) the batch axis is sharded over them
    and shared inputs are replicated; buckets are then at least one point per device.
    """

    def __init__(
        self,
        *,
        max_bucket: int = 1024,
        cache_size: int = 256,
        devices: Sequence | None = None,
        guard: CompileGuard | None = None,
        max_lines: int = 0,
        max_temp_bytes: int = 0,
    ):
        if max_bucket < 1 or max_bucket & (max_bucket - 1):
            raise ValueError(f"max_bucket must be a power of two, got {max_bucket}")
        if not jax.config.read("jax_enable_x64"):
            # Without it float64 specs would silently compute in float32; the server turns it
            # on once at start (server.enable_x64), before any array exists.
            raise RuntimeError("the engine needs jax_enable_x64: call server.enable_x64() first")
        self.devices = list(devices or jax.local_devices())
        n = len(self.devices)
        if n & (n - 1):
            raise ValueError(f"the number of devices must be a power of two, got {n}")
        self._mesh = Mesh(np.array(self.devices), ("batch",)) if n > 1 else None
        self.max_bucket = max(max_bucket, n)
        self.cache_size = cache_size
        self.guard = guard
        # Bounds checked before a program compiles (its lines of StableHLO) and before an
        # executable runs (the temporary bytes XLA's memory analysis reports); 0: none.
        self.max_lines, self.max_temp_bytes = max_lines, max_temp_bytes
        self._refused: collections.OrderedDict[tuple, ResourceExhausted] = collections.OrderedDict()
        self._temp: dict[tuple, int] = {}  # by cache key: its executable's intermediates
        self.stats = EngineStats()
        self._cache: collections.OrderedDict[tuple, jax.stages.Compiled] = collections.OrderedDict()
        self._lock = threading.Lock()
        # One lock per key being compiled, so concurrent first calls compile once.
        self._compiling: dict[tuple, threading.Lock] = {}

    def run(
        self,
        program: Program,
        request: EngineRequest,
        args: Sequence[np.ndarray],
        *,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Output:
        """Compute `request` at every point, in chunks of points; `is_active` is asked
        before each chunk after the first, and Cancelled raised when it says no, so a call
        whose client has gone (or whose time is up) stops within one chunk.

        args are the arrays the request's transform takes: the program's inputs in order,
        then any vector; each has a leading batch axis except the shared inputs (indices in
        request.shared). Returns what the transform returns, as numpy with a leading batch
        axis: one array, or a dict of them.
        """
        batched = [i not in request.shared for i in range(len(args))]
        batch = next(a for a, b in zip(args, batched, strict=True) if b).shape[0]
        if batch == 0:
            return request.on_host(self._empty(program, request, args))
        size = self.max_bucket
        limit = request.max_chunk(program)
        if limit is not None:
            # Requests that hold large per-point state (Lanczos bases) say how many points
            # fit at once; round down to a bucket so the chunks share an executable.
            size = min(size, 1 << (max(limit, 1).bit_length() - 1))
        chunks = []
        start = 0
        while start < batch:
            if start and not is_active():
                raise Cancelled(
                    f"the call stopped after {start} of {batch} points: it was cancelled or "
                    "passed its deadline"
                )
            chunk = [
                a[start : start + size] if b else a for a, b in zip(args, batched, strict=True)
            ]
            try:
                chunks.append(self._run_chunk(program, request, chunk, batched, size))
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                # Device memory ran out: halve the chunk and go on, down to one point.
                if size == 1:
                    raise ResourceExhausted(
                        "one point of this request does not fit in device memory "
                        f"({self.devices[0].device_kind}): {str(e).splitlines()[0]}"
                    ) from None
                size //= 2
                logger.warning("device out of memory; chunks of %d points from now on", size)
                continue
            start += size
        if len(chunks) == 1:
            return request.on_host(chunks[0])
        return request.on_host(jax.tree.map(lambda *parts: np.concatenate(parts), *chunks))

    def compiled(
        self, program: Program, request: EngineRequest, args: Sequence[np.ndarray]
    ) -> bool:
        """Whether run(program, request, args) is one call of an executable already
        compiled: it would neither compile nor split the points into chunks."""
        key, chunked = self._key_of(program, request, args)
        return not chunked and key in self._cache

    def temp_bytes(
        self, program: Program, request: EngineRequest, args: Sequence[np.ndarray]
    ) -> int:
        """The intermediates (XLA's memory analysis) of the executable run(program,
        request, args) calls per chunk, once compiled; 0 before."""
        return self._temp.get(self._key_of(program, request, args)[0], 0)

    def _key_of(
        self, program: Program, request: EngineRequest, args: Sequence[np.ndarray]
    ) -> tuple[tuple, bool]:
        """The cache key of the executable of run(program, request, args)'s (first) chunk,
        and whether the points run in more than one chunk (or none)."""
        batched = [i not in request.shared for i in range(len(args))]
        batch = next(a for a, b in zip(args, batched, strict=True) if b).shape[0]
        size = self.max_bucket
        limit = request.max_chunk(program)
        if limit is not None:
            size = min(size, 1 << (max(limit, 1).bit_length() - 1))
        bucket = max(bucket_for(min(max(batch, 1), size), size), len(self.devices))
        signature = tuple(
            (a.shape[1:] if b else a.shape, a.dtype, b) for a, b in zip(args, batched, strict=True)
        )
        return (program.function_id, request, signature, bucket), batch > size or batch == 0

    def _run_chunk(
        self,
        program: Program,
        request: EngineRequest,
        args: Sequence[np.ndarray],
        batched: Sequence[bool],
        max_bucket: int,
    ) -> Output:
        batch = next(a for a, b in zip(args, batched, strict=True) if b).shape[0]
        bucket = max(bucket_for(batch, max_bucket), len(self.devices))
        if bucket > batch:
            # Pad with copies of the last point: the padded rows are discarded, and real
            # values keep them clear of spurious inf/nan work.
            args = [
                np.concatenate([a, np.repeat(a[-1:], bucket - batch, axis=0)]) if b else a
                for a, b in zip(args, batched, strict=True)
            ]
        # Per arg: the shape of one point (or the whole shared array), dtype, batched?
        signature = [
            (a.shape[1:] if b else a.shape, a.dtype, b) for a, b in zip(args, batched, strict=True)
        ]
        executable = self.executable(program, request, signature, bucket)
        return jax.tree.map(lambda out: np.asarray(out)[:batch], executable(*args))

    def warmup(self, program: Program, request: EngineRequest, batch: int) -> None:
        """Compile the executable a call of `batch` points would use (no shared inputs)."""
        bucket = max(bucket_for(min(batch, self.max_bucket), self.max_bucket), len(self.devices))
        signature = [(s.shape, s.dtype, True) for s in program.inputs]
        signature += [(shape, dtype, True) for shape, dtype in request.vector_signature(program)]
        self.executable(program, request, signature, bucket)

    def _empty(
        self, program: Program, request: EngineRequest, args: Sequence[np.ndarray]
    ) -> Output:
        """The result for zero points, shaped and typed by tracing alone (no compile)."""
        avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
        structure = jax.eval_shape(request.transform(program), *avals)
        return jax.tree.map(lambda s: np.empty(s.shape, s.dtype), structure)

    def executable(
        self,
        program: Program,
        request: EngineRequest,
        signature: Sequence[tuple[tuple[int, ...], np.dtype, bool]],
        bucket: int,
    ) -> jax.stages.Compiled:
        """The compiled jit(vmap(transform)) for this key, from the cache or compiled now."""
        key = (program.function_id, request, tuple(signature), bucket)
        with self._lock:
            executable = self._lookup(key)
            if executable is not None:
                return executable
            if key in self._refused:  # refused once: the same answer, without compiling
                raise self._refused[key]
            key_lock = self._compiling.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                executable = self._lookup(key, count=False)
            if executable is None:
                try:
                    executable, temp = self._compile(program, request, signature, bucket)
                except ResourceExhausted as e:
                    with self._lock:
                        self._refused[key] = e
                        while len(self._refused) > self.cache_size:
                            self._refused.popitem(last=False)
                        self._compiling.pop(key, None)
                    raise
                with self._lock:
                    self._cache[key] = executable
                    self._temp[key] = temp
                    while len(self._cache) > self.cache_size:
                        self._temp.pop(self._cache.popitem(last=False)[0], None)
                    self._compiling.pop(key, None)
        return executable

    def forget(self, function_id: str) -> None:
        """Drop the executables of a function (evicted from the registry): they hold its
        constants, so keeping them would keep every evicted function's bytes."""
        with self._lock:
            for cache in (self._cache, self._refused, self._temp):
                for key in [k for k in cache if k[0] == function_id]:
                    del cache[key]

    def _check_memory(
        self, executable: jax.stages.Compiled, request: EngineRequest, bucket: int
    ) -> int:
        """The executable's intermediates by XLA's memory analysis (0 where the backend
        does not say); ResourceExhausted over max_temp_bytes."""
        try:
            analysis = executable.memory_analysis()
        except (NotImplementedError, jax.errors.JaxRuntimeError):
            return 0  # a backend that does not say
        temp = int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis is not None else 0
        if self.max_temp_bytes and temp > self.max_temp_bytes:
            raise ResourceExhausted(
                f"this computation ({request.label}, {bucket} points a chunk) needs {temp} "
                f"bytes of intermediates by XLA's memory analysis, over this server's "
                f"{self.max_temp_bytes} (--max-temp-bytes); send fewer points per call, or "
                "use a kind that forms less (hvp instead of hessian, lanczos instead of exact)"
            )
        return temp

    def _lookup(self, key: tuple, count: bool = True) -> jax.stages.Compiled | None:
        executable = self._cache.get(key)
        if executable is not None:
            self._cache.move_to_end(key)
        if count:
            if executable is None:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
        return executable

    def _compile(
        self,
        program: Program,
        request: EngineRequest,
        signature: Sequence[tuple[tuple[int, ...], np.dtype, bool]],
        bucket: int,
    ) -> tuple[jax.stages.Compiled, int]:
        """The executable and its intermediates' bytes."""
        start = time.perf_counter()
        transform = request.transform(program)
        avals = [
            jax.ShapeDtypeStruct((bucket, *shape) if batched else shape, dtype)
            for shape, dtype, batched in signature
        ]
        if self._mesh is None:
            jitted = jax.jit(transform)
        else:
            split, whole = NamedSharding(self._mesh, P("batch")), NamedSharding(self._mesh, P())
            jitted = jax.jit(
                transform,
                in_shardings=[split if batched else whole for _, _, batched in signature],
                out_shardings=split,
            )
        try:
            executable, supervised, temp = self._lower_and_compile(
                jitted, avals, program, request, signature, bucket
            )
        except (ValueError, TypeError, jax.errors.JaxRuntimeError) as e:
            if not program.from_client_module:
                raise
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise InvalidArgument(
                f"this jax_export artifact does not compile for {request.label} ({first}); "
                "it may be corrupted or exported for another platform: export it again "
                "with jax.export and vjp_order >= 2"
            ) from None
        seconds = time.perf_counter() - start
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += seconds
        if supervised:
            logger.info(
                "compiled %s %s bucket=%d in %.3f s (%.3f s of it in a supervised child)",
                program.function_id[:12], request.label, bucket, seconds, supervised,
            )  # fmt: skip
        else:
            logger.info(
                "compiled %s %s bucket=%d in %.3f s",
                program.function_id[:12], request.label, bucket, seconds,
            )  # fmt: skip
        return executable, temp

    def _lower_and_compile(
        self,
        jitted: Any,
        avals: list[jax.ShapeDtypeStruct],
        program: Program,
        request: EngineRequest,
        signature: Sequence[tuple[tuple[int, ...], np.dtype, bool]],
        bucket: int,
    ) -> tuple[jax.stages.Compiled, float, int]:
        """The executable, after the bounds on its size; the seconds a supervised child
        spent compiling it first (0 when none did); its intermediates' bytes."""
        with warnings.catch_warnings():
            # Constant folding may overflow to inf; that is the value, not news (program.py).
            warnings.simplefilter("ignore", RuntimeWarning)
            lowered = jitted.lower(*avals)
            supervised = 0.0
            if self.guard is not None or self.max_lines:
                lines = lowered.as_text().count("\n")
                if self.max_lines and lines > self.max_lines:
                    raise ResourceExhausted(
                        f"this program is {lines} lines of StableHLO ({request.label}, "
                        f"{bucket} points a chunk), over this server's bound of "
                        f"{self.max_lines} (--max-compile-lines), which is refused before it "
                        "compiles: split the work (fewer or simpler bindings; hvp, jvp or vjp "
                        "instead of hessian or jacobian; a lower taylor order)"
                    )
            if self.guard is not None:
                # Large modules compile first in a supervised child (compile_guard.py);
                # this compile then loads its result from the persistent cache.
                supervised = self.guard.check(program, request, signature, bucket, lines)
            executable = lowered.compile()
        return executable, supervised, self._check_memory(executable, request, bucket)
