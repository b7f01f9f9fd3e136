"""Sparse Jacobians and Hessians on the client: the pattern a server detected, and the
values of each point as scipy.sparse matrices (when scipy is installed) or as arrays.

scipy is optional: the thin client stays numpy + grpc + protobuf, and without scipy (or
with sparse_format="arrays") a sparse result is ((rows, cols), values).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from hessd.client._errors import InvalidArgument
from hessd.proto import codec
from hessd.proto.kinds import JacobianMode, Kind
from hessd.proto.v1 import hessd_pb2

__all__ = [
    "SPARSE_FORMATS",
    "Sparsity",
    "check_format",
    "default_format",
    "expected_bytes",
    "remember",
    "sparse_result",
    "sparsity_of",
    "sparsity_request",
    "sparsity_result",
]

logger = logging.getLogger(__name__)

SPARSE_FORMATS = ("scipy", "arrays")
_COLORING_NAMES = {
    hessd_pb2.COLUMN: "column",
    hessd_pb2.ROW: "row",
    hessd_pb2.SYMMETRIC: "symmetric",
}

# nnz of the sparse derivatives answered so far, by what fixes their pattern: a later call
# of one knows its size and goes unary when it is small. Before that, the dense size bounds
# it, and calls whose dense result would pass the stream threshold stream.
_known_nnz: collections.OrderedDict[tuple, int] = collections.OrderedDict()
_KNOWN_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """The pattern of a function's Jacobian (m, n) or Hessian (n, n), the same at every
    point, and what computing it costs.

    rows, cols     (nnz,) each, row-major: the structural nonzeros (None with counts_only,
                   or when every_entry: detection proved no entry zero)
    coloring       "column" (JVPs), "row" (VJPs), "symmetric" (HVPs, star colouring), or
                   "none" (every_entry: nothing to colour)
    colors         colours of the pattern; passes: JVPs/VJPs/HVPs per point as computed
                   (colors, or dense_passes when the server computes dense)
    dense_passes   what the dense kind costs per point: min(m, n) or n
    bytes_per_point, dense_bytes_per_point   the values on the wire, sparse and dense
    dense_reason   empty, or why the server computes this one dense
    """

    shape: tuple[int, int]
    nnz: int
    coloring: str
    colors: int
    passes: int
    dense_passes: int
    bytes_per_point: int
    dense_bytes_per_point: int
    dense_reason: str
    every_entry: bool
    rows: np.ndarray | None = dataclasses.field(default=None, repr=False)
    cols: np.ndarray | None = dataclasses.field(default=None, repr=False)


def default_format() -> str:
    """ "scipy" when scipy is importable, else "arrays"."""
    return "scipy" if importlib.util.find_spec("scipy") is not None else "arrays"


def check_format(sparse_format: str | None) -> str:
    the_format = sparse_format or default_format()
    if the_format not in SPARSE_FORMATS:
        raise InvalidArgument(
            f"sparse_format={sparse_format!r}; use one of {', '.join(SPARSE_FORMATS)}"
        )
    return the_format


def sparsity_of(
    message: hessd_pb2.SparsityPattern, rows: np.ndarray | None, cols: np.ndarray | None
) -> Sparsity:
    m, n = message.shape
    if message.every_entry:
        rows, cols = np.repeat(np.arange(m), n), np.tile(np.arange(n), m)
    return Sparsity(
        shape=(m, n),
        nnz=message.nnz,
        coloring=_COLORING_NAMES.get(message.coloring, "none"),
        colors=message.colors,
        passes=message.passes,
        dense_passes=message.dense_passes,
        bytes_per_point=message.bytes_per_point,
        dense_bytes_per_point=message.dense_bytes_per_point,
        dense_reason=message.dense_reason,
        every_entry=message.every_entry,
        rows=rows,
        cols=cols,
    )


def sparsity_request(
    f: Any,
    kind: str = "jacobian",
    *,
    wrt: str | Sequence[str] | None = None,
    flatten: bool = False,
    mode: str = "auto",
    counts_only: bool = False,
    output_dtype: str | None = None,
) -> hessd_pb2.SparsityRequest:
    """The SparsityRequest about the registered function f (a Function)."""
    try:
        the_kind = Kind.parse(kind)
        the_mode = JacobianMode.parse(mode)
        dtype = codec.dtype_to_proto(output_dtype) if output_dtype else None
    except (ValueError, TypeError) as e:
        raise InvalidArgument(str(e)) from None
    return hessd_pb2.SparsityRequest(
        function_id=f.id,
        kind=the_kind.wire,
        wrt=[wrt] if isinstance(wrt, str) else list(wrt or ()),
        flatten=flatten,
        jacobian_mode=the_mode.wire,
        counts_only=counts_only,
        output_dtype=dtype,
    )


def sparsity_result(reply: hessd_pb2.SparsityPattern) -> Sparsity:
    rows = cols = None
    if reply.HasField("rows"):
        rows = codec.decode(reply.rows, "sparsity rows")
        cols = codec.decode(reply.cols, "sparsity cols")
    return sparsity_of(reply, rows, cols)


def _pattern_key(request: hessd_pb2.ComputeRequest) -> tuple | None:
    if not request.function_id:
        return None
    return (
        request.function_id,
        request.kind,
        tuple(request.wrt),
        request.flatten,
        request.jacobian_mode,
    )


def remember(request: hessd_pb2.ComputeRequest, nnz: int) -> None:
    key = _pattern_key(request)
    if key is not None:
        _known_nnz[key] = nnz
        _known_nnz.move_to_end(key)
        while len(_known_nnz) > _KNOWN_SIZE:
            _known_nnz.popitem(last=False)


def expected_bytes(
    request: hessd_pb2.ComputeRequest, batch: int, itemsize: int, dense_bytes: int
) -> int:
    """The bytes a sparse result will weigh (values and int32 indices), if an earlier call
    told nnz; else `dense_bytes`, the bound."""
    key = _pattern_key(request)
    nnz = _known_nnz.get(key) if key is not None else None
    return dense_bytes if nnz is None else nnz * (batch * itemsize + 8)


def sparse_result(sparsity: Sparsity, values: np.ndarray, sparse_format: str) -> Any:
    """A list of scipy.sparse.csr_array, one per point, or ((rows, cols), values)."""
    if sparsity.dense_reason:
        logger.info("the server computed this sparse result dense: %s", sparsity.dense_reason)
    assert sparsity.rows is not None and sparsity.cols is not None  # a result has them
    if sparse_format == "arrays":
        return (sparsity.rows, sparsity.cols), values
    from scipy import sparse  # optional, and only now

    m, _ = sparsity.shape
    # Rows come sorted (row-major), so each row's entries start where searchsorted says.
    indptr = np.searchsorted(sparsity.rows, np.arange(m + 1))
    return [
        sparse.csr_array((point, sparsity.cols, indptr), shape=sparsity.shape) for point in values
    ]
