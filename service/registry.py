"""The function registry: content-addressed Programs in a bounded LRU."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from hessd.proto.v1 import hessd_pb2
from hessd.service import exported
from hessd.service.errors import NotFound, ResourceExhausted
from hessd.service.expression import ExpressionLimits
from hessd.service.program import Program, build_program, function_id

__all__ = ["Registry"]


class Registry:
    """Programs by function id. Registering a known spec costs a hash, nothing more.

    Holds at most `max_functions` specs of at most `max_bytes` together (constants and
    artifacts are most of a spec's bytes); the least recently used is dropped first, and a
    client that meets NOT_FOUND registers again (any replica can rebuild any spec). Whatever
    else keeps a Program (the engine's executables, the fast path's plans) subscribes with
    on_evict to drop it too, or the bound would hold only for the registry's own share.
    """

    def __init__(
        self,
        max_functions: int = 4096,
        limits: ExpressionLimits = ExpressionLimits(),
        allow_jax_export: bool = False,
        max_bytes: int = 1 << 62,
    ):
        self.max_functions = max_functions
        self.max_bytes = max_bytes
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self.limits = limits
        self.allow_jax_export = allow_jax_export
        self._programs: collections.OrderedDict[str, Program] = collections.OrderedDict()
        # Names (the Open Inference Protocol's model names) → function ids: per server,
        # since unlike ids they cannot be derived from a spec.
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()
        self._on_evict: list[Callable[[str], None]] = []

    def on_evict(self, forget: Callable[[str], None]) -> None:
        """Call `forget(function_id)` for each function dropped from now on (after the
        registry's lock is released, so `forget` may take locks of its own)."""
        self._on_evict.append(forget)

    def register(self, spec: hessd_pb2.FunctionSpec, name: str = "") -> Program:
        """The Program of `spec`, built now unless already known; with `name`, known by
        that name too (moved from whatever spec had it before).

        Raises InvalidArgument for a bad spec, PermissionDenied for a jax_export spec on a
        server that does not allow them.
        """
        fid = function_id(spec)
        size = spec.ByteSize()
        with self._lock:
            program = self._touch(fid)
        if program is not None:
            if name:
                with self._lock:
                    self._names[name] = fid
            return program
        if size > self.max_bytes:
            raise ResourceExhausted(
                f"the spec is {size} bytes (its constants or artifact), over this server's "
                f"bound of {self.max_bytes} bytes for all registered functions "
                "(--max-function-bytes); pass large arrays as shared inputs or resident "
                "tensors (Client.put) instead of constants"
            )
        if spec.WhichOneof("body") == "jax_export":
            program = exported.build_program(spec, self.allow_jax_export)
        else:
            program = build_program(spec, self.limits)
        evicted = []
        with self._lock:
            if fid not in self._programs:
                self._bytes += size
                self._sizes[fid] = size
            self._programs[fid] = program
            if name:
                self._names[name] = fid
            while len(self._programs) > self.max_functions or self._bytes > self.max_bytes:
                dropped, _ = self._programs.popitem(last=False)
                self._bytes -= self._sizes.pop(dropped)
                evicted.append(dropped)
        for dropped in evicted:
            for forget in self._on_evict:
                forget(dropped)
        return program

    @property
    def nbytes(self) -> int:
        """Bytes of the specs held."""
        return self._bytes

    def named(self, name: str) -> Program:
        """The Program registered under `name`; NotFound naming the known names otherwise."""
        with self._lock:
            fid = self._names.get(name)
            program = None if fid is None else self._touch(fid)
            known = sorted(self._names)
        if fid is None:
            listed = ", ".join(repr(n) for n in known[:20]) or "none"
            raise NotFound(
                f"no model named {name!r} is registered on this server (names: {listed}); "
                "register its function with a name first (Client.register(..., name=...))"
            )
        if program is None:
            raise NotFound(
                f"model {name!r} (function {fid}) was dropped from this server's registry, "
                f"which holds at most {self.max_functions} functions; register it again"
            )
        return program

    def get(self, fid: str) -> Program:
        with self._lock:
            program = self._touch(fid)
        if program is None:
            raise NotFound(
                f"no function with id {fid!r} is registered on this server; register its "
                "spec first, or send the spec inline in the request"
            )
        return program

    def __len__(self) -> int:
        return len(self._programs)

    def _touch(self, fid: str) -> Program | None:
        program = self._programs.get(fid)
        if program is not None:
            self._programs.move_to_end(fid)
        return program
