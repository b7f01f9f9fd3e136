"""The variable derivatives are taken with respect to: one input, or several raveled into
one flat vector, and how results over it split back into per-input blocks."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

if TYPE_CHECKING:
    from hessd.service.program import Program

__all__ = ["FunctionOfVariable", "Wrt"]

# f as a function of the variable alone, the other inputs fixed (Wrt.view).
FunctionOfVariable = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Wrt:
    """The inputs derivatives are taken with respect to.

    One input, not flattened: the variable is that input, shape as declared. Several inputs,
    or `flatten`: the variable is the concatenation of the raveled inputs, shape (p,), and
    results for several inputs without `flatten` are split back into per-input blocks.
    """

    indices: tuple[int, ...]
    flatten: bool = False

    @property
    def flat(self) -> bool:
        return self.flatten or len(self.indices) > 1

    @property
    def split(self) -> bool:
        """Whether results come back per input (several inputs, not flattened)."""
        return len(self.indices) > 1 and not self.flatten

    def shape(self, program: Program) -> tuple[int, ...]:
        """Shape of the variable at one point."""
        shapes = [program.inputs[i].shape for i in self.indices]
        return (sum(math.prod(s) for s in shapes),) if self.flat else shapes[0]

    def view(
        self, program: Program, f: Callable[..., jax.Array], inputs: Sequence[jax.Array]
    ) -> tuple[FunctionOfVariable, jax.Array]:
        """(f_x, x): f as a function of the variable alone, the other inputs fixed, and the
        variable's value at `inputs`. Works per point and on batches alike: axes of the
        inputs in front of their declared shapes are kept in front of the variable's."""
        if not self.flat:
            (i,) = self.indices
            return _replacing(f, inputs, {i: lambda x: x}), inputs[i]
        first = self.indices[0]
        leading = inputs[first].shape[: inputs[first].ndim - len(program.inputs[first].shape)]
        parts = [inputs[i].reshape(*leading, -1) for i in self.indices]
        offsets = np.cumsum([0] + [math.prod(program.inputs[i].shape) for i in self.indices])
        unflatten = {
            i: functools.partial(_unflatten, start=a, stop=b, shape=program.inputs[i].shape)
            for i, a, b in zip(self.indices, offsets[:-1], offsets[1:], strict=True)
        }
        return _replacing(f, inputs, unflatten), jnp.concatenate(parts, axis=-1)

    def blocks(self, program: Program, result: jax.Array, axes: Sequence[int]) -> dict:
        """Split a result whose `axes` run over the flat variable into per-input blocks:
        one axis gives {name: block}, two give {"a,b": block} for every pair."""
        names = [program.inputs[i].name for i in self.indices]
        shapes = [program.inputs[i].shape for i in self.indices]
        offsets = np.cumsum([0] + [math.prod(s) for s in shapes])
        pieces = list(zip(names, shapes, offsets[:-1], offsets[1:], strict=True))
        out = {}
        for combo in itertools.product(pieces, repeat=len(axes)):
            block = result
            # Later axes first, so that earlier axis numbers stay valid as shapes grow.
            for axis, (_, shape, a, b) in sorted(zip(axes, combo, strict=True), reverse=True):
                block = lax.slice_in_dim(block, int(a), int(b), axis=axis)
                block = block.reshape(*block.shape[:axis], *shape, *block.shape[axis + 1 :])
            out[",".join(name for name, *_ in combo)] = block
        return out


def _unflatten(z: jax.Array, start: int, stop: int, shape: tuple[int, ...]) -> jax.Array:
    return z[..., start:stop].reshape(*z.shape[:-1], *shape)


def _replacing(
    f: Callable[..., jax.Array],
    inputs: Sequence[jax.Array],
    replace: Mapping[int, Callable[[jax.Array], jax.Array]],
) -> FunctionOfVariable:
    """x -> f(*inputs) with input i replaced by replace[i](x)."""

    def f_x(x: jax.Array) -> jax.Array:
        return f(*(replace[i](x) if i in replace else v for i, v in enumerate(inputs)))

    return f_x
