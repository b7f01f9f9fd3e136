"""The engine: owns compilation, the executable cache and the device.

A request runs as `jit(vmap(transform))` of its Program, compiled ahead of time for a
batch bucket (the batch size rounded up to a power of two) so that a new batch size in a
known bucket reuses an executable. Executables are cached by

    (function id, request, per-point input shapes and dtypes, bucket)

in a bounded LRU. Batches above the largest bucket run in chunks of that size.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence

import jax
import numpy as np

from hessd.service import kinds
from hessd.service.program import Program

__all__ = ["Engine", "EngineStats", "bucket_for"]

logger = logging.getLogger(__name__)


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
    """Runs derivative requests on one device with cached, bucketed executables."""

    def __init__(self, *, max_bucket: int = 1024, cache_size: int = 256):
        if max_bucket < 1 or max_bucket & (max_bucket - 1):
            raise ValueError(f"max_bucket must be a power of two, got {max_bucket}")
        # The server computes in whatever dtype a spec declares, float64 included.
        jax.config.update("jax_enable_x64", True)
        self.max_bucket = max_bucket
        self.cache_size = cache_size
        self.stats = EngineStats()
        self._cache: collections.OrderedDict[tuple, jax.stages.Compiled] = collections.OrderedDict()
        self._lock = threading.Lock()
        # One lock per key being compiled, so concurrent first calls compile once.
        self._compiling: dict[tuple, threading.Lock] = {}

    def run(
        self,
        program: Program,
        request: kinds.Request,
        inputs: Sequence[np.ndarray],
        vector: np.ndarray | None = None,
    ) -> np.ndarray:
        """Compute `request` at every point.

        inputs[i] has shape (batch, *program.inputs[i].shape); vector, when the kind takes
        one, (batch, *kinds.vector_shape(...)). Returns (batch, *kinds.output_shape(...)).
        """
        args = [*inputs, vector] if request.takes_vector else list(inputs)
        batch = args[0].shape[0]
        if batch == 0:
            shape = (0, *kinds.output_shape(program, request))
            return np.empty(shape, dtype=program.output_dtype)
        chunks = [
            self._run_chunk(program, request, [a[start : start + self.max_bucket] for a in args])
            for start in range(0, batch, self.max_bucket)
        ]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def _run_chunk(
        self, program: Program, request: kinds.Request, args: list[np.ndarray]
    ) -> np.ndarray:
        batch = args[0].shape[0]
        bucket = bucket_for(batch, self.max_bucket)
        if bucket > batch:
            # Pad with copies of the last point: the padded rows are discarded, and real
            # values keep them clear of spurious inf/nan work.
            args = [np.concatenate([a, np.repeat(a[-1:], bucket - batch, axis=0)]) for a in args]
        executable = self.executable(
            program, request, [(a.shape[1:], a.dtype) for a in args], bucket
        )
        out = np.asarray(executable(*args))
        return out[:batch]

    def executable(
        self,
        program: Program,
        request: kinds.Request,
        signature: Sequence[tuple[tuple[int, ...], np.dtype]],
        bucket: int,
    ) -> jax.stages.Compiled:
        """The compiled jit(vmap(transform)) for this key, from the cache or compiled now."""
        key = (program.function_id, request, tuple(signature), bucket)
        with self._lock:
            executable = self._lookup(key)
            if executable is not None:
                return executable
            key_lock = self._compiling.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                executable = self._lookup(key, count=False)
            if executable is None:
                executable = self._compile(program, request, signature, bucket)
                with self._lock:
                    self._cache[key] = executable
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
                    self._compiling.pop(key, None)
        return executable

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

    def _compile(self, program, request, signature, bucket) -> jax.stages.Compiled:
        start = time.perf_counter()
        transform = kinds.make_transform(program, request)
        avals = [jax.ShapeDtypeStruct((bucket, *shape), dtype) for shape, dtype in signature]
        executable = jax.jit(jax.vmap(transform)).lower(*avals).compile()
        seconds = time.perf_counter() - start
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += seconds
        logger.info(
            "compiled %s %s bucket=%d in %.3f s",
            program.function_id[:12],
            request.kind.value,
            bucket,
            seconds,
        )
        return executable
