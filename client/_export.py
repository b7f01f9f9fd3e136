"""Exporting a JAX callable as a hessd function: the only part of the client that imports
JAX, and only when a callable is registered (`pip install 'hessd[jax]'`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from hessd.client._errors import InvalidArgument
from hessd.proto.v1 import hessd_pb2

__all__ = ["export_spec"]


def export_spec(
    fn: Callable, inputs: Sequence[hessd_pb2.InputSpec], dtype: np.dtype, platform: str
) -> hessd_pb2.FunctionSpec:
    """A FunctionSpec holding jax.vmap(fn) exported for `platform` with a symbolic batch
    dimension and VJPs up to order 2 (what hvp and hessian need on the server)."""
    try:
        import jax
    except ImportError:
        raise InvalidArgument(
            "registering a callable needs JAX in the client: pip install 'hessd[jax]'"
        ) from None
    if dtype == np.float64 and not jax.config.read("jax_enable_x64"):
        raise InvalidArgument(
            "dtype float64 needs JAX's x64 mode in this process: call "
            "jax.config.update('jax_enable_x64', True) first"
        )
    (batch,) = jax.export.symbolic_shape("batch")
    avals = [jax.ShapeDtypeStruct((batch, *spec.shape), dtype) for spec in inputs]
    try:
        exported = jax.export.export(jax.jit(jax.vmap(fn)), platforms=[platform])(*avals)
        serialized = exported.serialize(vjp_order=2)
    except Exception as e:  # tracing user code: its own error is the useful message
        raise InvalidArgument(f"exporting {getattr(fn, '__name__', fn)!r} failed: {e}") from e
    return hessd_pb2.FunctionSpec(
        jax_export=hessd_pb2.JaxExport(serialized=bytes(serialized), jax_version=jax.__version__),
        inputs=inputs,
    )
