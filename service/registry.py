"""The function registry: content-addressed Programs in a bounded LRU."""

from __future__ import annotations

import collections
import threading

from hessd.proto.v1 import hessd_pb2
from hessd.service import exported
from hessd.service.errors import NotFound
from hessd.service.expression import ExpressionLimits
from hessd.service.program import Program, build_program, function_id

__all__ = ["Registry"]


class Registry:
    """Programs by function id. Registering a known spec costs a hash, nothing more.

    Holds at most `max_functions`; the least recently used is dropped first, and a client
    that meets NOT_FOUND registers again (any replica can rebuild any spec).
    """

    def __init__(
        self,
        max_functions: int = 4096,
        limits: ExpressionLimits = ExpressionLimits(),
        allow_jax_export: bool = False,
    ):
        self.max_functions = max_functions
        self.limits = limits
        self.allow_jax_export = allow_jax_export
        self._programs: collections.OrderedDict[str, Program] = collections.OrderedDict()
        self._lock = threading.Lock()

    def register(self, spec: hessd_pb2.FunctionSpec) -> Program:
        """The Program of `spec`, built now unless already known.

        Raises InvalidArgument for a bad spec, PermissionDenied for a jax_export spec on a
        server that does not allow them.
        """
        fid = function_id(spec)
        with self._lock:
            program = self._touch(fid)
        if program is not None:
            return program
        if spec.WhichOneof("body") == "jax_export":
            program = exported.build_program(spec, self.allow_jax_export)
        else:
            program = build_program(spec, self.limits)
        with self._lock:
            self._programs[fid] = program
            while len(self._programs) > self.max_functions:
                self._programs.popitem(last=False)
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
