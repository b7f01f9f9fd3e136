"""Resident tensors (handles) and objectives over data sets, on the client's side.

A Handle names an array the server holds (Client.put). It keeps the array, so that a call
which finds the server without it (evicted, restarted, another replica: NOT_FOUND) can put
it again and retry, as calls do with a function's spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from hessd.client._errors import InvalidArgument
from hessd.proto import codec
from hessd.proto.kinds import BuiltinLoss, Operator, Reduction
from hessd.proto.v1 import hessd_pb2

__all__ = ["Handle", "describe", "encode_objective", "handle_of"]


def handle_of(array: np.ndarray) -> str:
    """sha256 of (dtype, shape, little-endian bytes): the server's handle for `array`."""
    array = codec.little_endian(np.ascontiguousarray(array))
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True, eq=False)
class Handle:
    """An array resident on the server: pass it wherever an array goes (an input, a shared
    input, a vector, data); only the handle travels."""

    handle: str
    array: np.ndarray = dataclasses.field(repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)


def describe(handle: Handle, out: hessd_pb2.Tensor) -> None:
    """Fill `out` with the handle, its dtype and shape, and no bytes."""
    out.handle = handle.handle
    out.dtype = codec.dtype_to_proto(handle.dtype)
    out.shape[:] = handle.shape


def encode_objective(
    out: hessd_pb2.Objective,
    inputs: Mapping[str, tuple[int, ...]],
    dtype: np.dtype,
    data: Mapping[str, Any],
    *,
    loss: str | None = None,
    operator: str = "hessian",
    reduction: str = "mean",
    chunk_size: int = 0,
    target: str = "y",
    seed: int = 0,
    mc_samples: int = 0,
) -> tuple[list[np.ndarray], list[Handle]]:
    """Describe a data set in `out`; return the arrays whose bytes travel (stream order) and
    the handles it names. Inputs take the function's dtype (where that changes no value);
    the target keeps integer labels as they are."""
    if not data:
        raise InvalidArgument("data is empty: give the per-example inputs, each (N, *shape)")
    out.reduction = _parse(Reduction, reduction, "reduction").wire
    out.operator = _parse(Operator, operator, "operator").wire
    out.chunk_size = chunk_size
    out.seed = seed
    out.mc_samples = mc_samples
    if loss is not None:
        try:
            out.loss.builtin = BuiltinLoss.parse(loss).wire
        except ValueError:
            # Not a built-in name: an expression in `output` and `target`.
            out.loss.expression = loss
        out.loss.target = target
    arrays: list[np.ndarray] = []
    handles: list[Handle] = []
    for name, value in data.items():
        tensor = out.data.add(name=name).tensor
        if isinstance(value, Handle):
            describe(value, tensor)
            handles.append(value)
            continue
        array = np.asarray(value)
        if name in inputs or np.issubdtype(array.dtype, np.floating):
            try:
                array = codec.coerce(value, dtype, f"data {name!r}")
            except codec.TensorError as e:
                raise InvalidArgument(str(e)) from None
        codec.encode(array, out=tensor, data=False)
        arrays.append(array)
    return arrays, handles


def _parse(enum_type: Any, value: str, name: str) -> Any:
    try:
        return enum_type.parse(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum_type)
        raise InvalidArgument(f"{name}={value!r}; use one of {choices}") from None
