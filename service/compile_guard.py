"""Large programs compile first in a supervised child process, so no compile can end the
server.

XLA's compile time and memory grow much faster than a module's size: the Hessian of a chain
of `tanh(y @ W) + sin(y)` bindings measured 0.9 s at 347 lines of StableHLO, 2.5 s at 677
and 12.7 s at 1,337, and a valid 12 KB expression of 440 bindings grew the server by ~50
MB/s until `std::bad_alloc` killed it. A size bound alone cannot tell such a program from a
real one, and a compile cannot be interrupted in-process. So a module of at least
`min_lines` lines is compiled first by `python -m hessd.service.compile_guard` under an
address-space limit and a timeout (on the compile: the child's own start, an interpreter and
JAX's import, is timed apart); the child writes JAX's persistent compilation cache, and
the server's own compile then loads from it. Smaller modules (nearly all) compile in the
server directly and pay nothing. A child that runs out of time or memory is killed and the
call is answered RESOURCE_EXHAUSTED; the server never sees the compile.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import resource
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hessd.service.errors import ResourceExhausted

if TYPE_CHECKING:
    from hessd.service.engine import EngineRequest
    from hessd.service.program import Program

__all__ = ["CompileGuard"]

logger = logging.getLogger(__name__)

# The longest a child may take to start (an interpreter, JAX's import) before its compile,
# which --max-compile-seconds bounds, begins; READY is what it writes then.
STARTUP_SECONDS = 120.0
READY = b"ready\n"


@dataclasses.dataclass(frozen=True)
class CompileGuard:
    """Where and how large programs are compiled first (module doc)."""

    cache_dir: str
    min_lines: int = 2000
    max_seconds: float = 300.0
    max_bytes: int = 16 << 30

    def check(
        self,
        program: Program,
        request: EngineRequest,
        signature: Sequence[tuple[tuple[int, ...], Any, bool]],
        bucket: int,
        lines: int,
    ) -> float:
        """Compile (program, request, signature, bucket) in a child if the module has at
        least min_lines lines; returns the child's seconds (0 when none ran). Raises
        ResourceExhausted if the child ran out of time or memory, or failed."""
        if lines < self.min_lines or not program.spec:
            return 0.0
        payload = pickle.dumps(
            (self.max_bytes, program.spec, type(program).__name__, request, list(signature),
             bucket, self.cache_dir)
        )  # fmt: skip
        start = time.perf_counter()
        what = f"compiling this program ({lines} lines of StableHLO, {request.label})"
        advice = (
            "split the work: fewer or simpler bindings, a cheaper kind (hvp, jvp or vjp "
            "instead of hessian or jacobian, a lower taylor order), or fewer warmup buckets"
        )
        with tempfile.TemporaryFile() as source:
            source.write(payload)
            source.seek(0)
            child = subprocess.Popen(
                [sys.executable, "-m", "hessd.service.compile_guard"],
                stdin=source,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        # The bound is on the compile: the child's start (an interpreter and JAX's import,
        # seconds on a slow machine) is timed apart, up to STARTUP_SECONDS.
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], STARTUP_SECONDS)
        if not ready:
            _end(child)
            raise ResourceExhausted(
                f"{what} could not start: its supervised child was not ready within "
                f"{STARTUP_SECONDS:g} s (the server's machine is overloaded); retry later"
            )
        child.stdout.readline()  # READY, or b"" where the child failed first
        try:
            _, stderr = child.communicate(timeout=self.max_seconds)
        except subprocess.TimeoutExpired:
            _end(child)
            raise ResourceExhausted(
                f"{what} took more than this server's {self.max_seconds:g} s "
                f"(--max-compile-seconds); {advice}"
            ) from None
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["-"]
            logger.warning("supervised compile exited %d: %s", child.returncode, tail[0][:500])
            memory = "MemoryError" in tail[0] or "bad_alloc" in tail[0] or child.returncode < 0
            reason = (
                f"needed more than this server's {self.max_bytes} bytes (--max-compile-bytes)"
                if memory
                else f"failed ({tail[0][:200]})"
            )
            raise ResourceExhausted(f"{what} {reason}; {advice}")
        return seconds


def _end(child: subprocess.Popen) -> None:
    child.kill()
    child.communicate()


def _child() -> None:
    """Compile the payload on stdin with the server's own code into the persistent cache."""
    max_bytes, spec_bytes, kind, request, signature, bucket, cache_dir = pickle.load(
        sys.stdin.buffer
    )
    # The child bounds itself, first thing: a preexec_fn would run between fork and exec
    # in a server full of threads, which Python documents as unsafe (and which crashed the
    # child now and then here).
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    import jax

    from hessd.proto.v1 import hessd_pb2
    from hessd.service import exported
    from hessd.service.engine import Engine
    from hessd.service.expression import ExpressionLimits
    from hessd.service.program import build_program
    from hessd.service.server import enable_x64

    enable_x64()
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    # Started: --max-compile-seconds counts from here.
    sys.stdout.buffer.write(READY)
    sys.stdout.buffer.flush()
    spec = hessd_pb2.FunctionSpec.FromString(spec_bytes)
    program: Program
    if kind == "ExportProgram":
        program = exported.build_program(spec, allow=True)
    else:
        # The server has checked the spec against its own limits already.
        program = build_program(spec, ExpressionLimits(max_chars=1 << 40, max_nodes=1 << 40))
    Engine()._compile(program, request, signature, bucket)


if __name__ == "__main__":
    _child()
